"""Error types. The split matters: exit codes and Allure statuses depend on it.

- ``ConfigError``: the inventory or the command line is wrong (exit 2).
- ``TargetUnreachable``: a server could not be reached; a check that hits this is
  *broken*, not *failed* (exit 2). ``CredentialsRejected`` is its kind for a server that
  answered but refused opsdrill's *own* credentials: opsdrill could not judge either.
- ``OperationFailed``: an operation ran and failed at a named stage (exit 1).
"""

from __future__ import annotations

from opsdrill.redact import redact


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


class CredentialsRejected(TargetUnreachable):
    """A server refused opsdrill's own credentials (the backup role's password, the S3 key,
    the probe mailbox's password, the drill key's passphrase).

    Not a verdict on the target: opsdrill could not look, so a check is *broken* and the
    message names the inventory key and the environment variable to fix (exit 2).
    """


class PrivilegesMissing(CredentialsRejected):
    """opsdrill's backup role cannot read what pg_dump must read (a table, a large object,
    rows hidden by row-level security): found before anything runs, with the GRANT."""


class OperationFailed(OpsdrillError):
    """An operation failed; ``stage`` names where (pg_dump, compress, encrypt, upload...)."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {message}")


class RefusedError(OpsdrillError):
    """A safety guard refused to act (e.g. a drill sandbox that is the live server)."""

    exit_code = 2


class LockHeld(OpsdrillError):
    """Another run of the same operation on the same target holds its lock: this run did
    nothing (exit 75, the code the cron wrappers already use for "skipped"). The message
    names the holder."""

    exit_code = 75
