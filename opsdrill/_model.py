"""The strict pydantic base every inventory section is built on.

Its own module so that the inventory's section modules (backups in ``inventory``, mail and
DNS in ``inventory_mail``) share one definition without importing each other in a circle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# extra="forbid": a misspelt key is an error, never a silently ignored expectation.
# strict: "60" is not 60; TOML has real types, so a string there is a mistake.
STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class StrictModel(BaseModel):
    model_config = STRICT
