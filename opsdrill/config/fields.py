"""The strict pydantic base every inventory section is built on, and the field types the
sections share (secret variable names, host names, host:port endpoints).

Its own module so that the inventory's section modules (backups in ``inventory``, mail and
DNS in ``inventory_mail``, probes in ``inventory_probe``) share one definition without
importing each other in a circle.
"""

from __future__ import annotations

import ipaddress
import re
import string
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

# extra="forbid": a misspelt key is an error, never a silently ignored expectation.
# strict: "60" is not 60; TOML has real types, so a string there is a mistake.
STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

# The error type of a secret variable name that is not one; its message never holds the
# value (inventory._format_validation never shows the input of a ``*_env`` key either).
NOT_AN_ENV_NAME = "env_name"
NOT_AN_ENV_NAME_MESSAGE = (
    "is not an environment variable name (it looks like a value: never put a secret in the "
    "inventory)"
)
# Names of variables holding secrets are upper case, as every shell and .env convention
# has them: "Hunter2" or "s3cret_pw" fit the shell's syntax for a name but are far likelier
# a password pasted in, and "environment variable Hunter2 is not set" would print it.
_SECRET_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class StrictModel(BaseModel):
    model_config = STRICT


def _looks_like_a_value(name: str) -> bool:
    """Upper case letters and digits with no word break, 16 or more of them, is the shape
    of a generated key (an AWS access key id: AKIAIOSFODNN7EXAMPLE), not of a name."""
    return "_" not in name and len(name) >= 16 and any(c.isdigit() for c in name)


def _secret_env_name(value: str) -> str:
    if not _SECRET_NAME.match(value) or _looks_like_a_value(value):
        raise PydanticCustomError(NOT_AN_ENV_NAME, NOT_AN_ENV_NAME_MESSAGE)
    return value


# The name of the environment variable holding a secret (``password_env = "CRM_DB_PW"``).
SecretEnvName = Annotated[str, AfterValidator(_secret_env_name)]

_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def host_problem(host: str) -> str | None:
    """Why ``host`` is no host name or IP address a socket can connect to, or None."""
    if not host:
        return "empty (fix: give the server's host name or IP address)"
    if any(c.isspace() for c in host):
        return "contains whitespace (fix: remove it)"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host.removesuffix(".")
    if len(name) <= 253 and name and all(_HOST_LABEL.match(lb) for lb in name.split(".")):
        return None
    return "not a host name or IP address"


def _bare_host(value: str) -> str:
    """A host alone, for the sections with a ``port`` key of their own."""
    if "/" in value or value.count(":") == 1:
        raise ValueError("a host name or IP address alone: the port is its own key")
    problem = host_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Host = Annotated[str, AfterValidator(_bare_host)]


def port_problem(port: str) -> str | None:
    """Why the text after ``host:`` is no TCP port, or None."""
    if not port.isascii() or not port.isdigit():
        return f"port {port!r} is not a number"
    if not 1 <= int(port) <= 65535:
        return f"port {int(port)} is out of range (1-65535)"
    return None


def _host_port(value: str) -> str:
    """``host``, ``host:port`` or ``[IPv6]:port``, as the S3 client takes an endpoint."""
    if not value:
        raise ValueError("empty (fix: host:port of the S3 API, e.g. minio.example.net:9000)")
    if any(c.isspace() for c in value):
        raise ValueError("contains whitespace (fix: remove it)")
    if "://" in value:
        raise ValueError("endpoint is host:port without a scheme; use secure = true/false")
    if "@" in value:
        raise ValueError(
            "host:port only, without credentials (they go in access_key_env and secret_key_env)"
        )
    if any(c in value for c in "/?#"):
        raise ValueError(
            "host:port only, without a path (bucket and prefix have keys of their own)"
        )
    if value.startswith("["):
        inside, _, rest = value[1:].partition("]")
        try:
            if ipaddress.ip_address(inside).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError("not an IPv6 address between the brackets") from None
        if rest and not rest.startswith(":"):
            raise ValueError("after [IPv6] comes :port, e.g. [::1]:9000")
        port = rest[1:] if rest else None
    elif value.count(":") > 1:
        raise ValueError("an IPv6 address goes in brackets, e.g. [::1]:9000")
    else:
        host, sep, after = value.partition(":")
        port = after if sep else None
        problem = host_problem(host)
        if problem:
            raise ValueError(problem)
    if port is not None and (problem := port_problem(port)):
        raise ValueError(problem)
    return value


# An S3 endpoint: host[:port], IPv6 in brackets; no scheme, path, credentials or spaces.
HostPort = Annotated[str, AfterValidator(_host_port)]


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a container image name pattern (``postgres:{major}``: only
    ``{major}`` is substituted, by ``opsdrill.containers.image_for``), or None."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as exc:  # an unmatched brace
        return f"not a pattern: {exc}"
    other = [f for f in fields if f != "major"]
    if other:
        return f"only {{major}} may be substituted, found {{{other[0]}}}"
    if not pattern.strip() or any(c.isspace() for c in pattern):
        return "an image name has no spaces, e.g. postgres:{major}"
    return None
