"""Error types. The split matters: exit codes and Allure statuses depend on it.

- ``ConfigError``: the inventory or the command line is wrong (exit 2).
- ``TargetUnreachable``: a server could not be reached; a check that hits this is
  *broken*, not *failed* (exit 2).
- ``OperationFailed``: an operation ran and failed at a named stage (exit 1).
"""

from __future__ import annotations

from opsdrill.secrets import redact


class OpsdrillError(Exception):
    """Base class; the message is redacted of every known secret when created."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(OpsdrillError):
    exit_code = 2


class TargetUnreachable(OpsdrillError):
    exit_code = 2


class OperationFailed(OpsdrillError):
    """An operation failed; ``stage`` names where (pg_dump, compress, encrypt, upload...)."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {message}")


class RefusedError(OpsdrillError):
    """A safety guard refused to act (e.g. a drill sandbox that is the live server)."""

    exit_code = 2
