"""Failures of the mail probe, kept apart from "unreachable" and "refused our credentials".

The split follows opsdrill.errors:

- a server that cannot be reached (refused, timed out, TLS handshake, DNS) raises
  ``TargetUnreachable``: a check calls that *broken*;
- a server that refused opsdrill's *own* credentials (SMTP 535 to the probe's submission
  account, IMAP NO to the probe mailbox's LOGIN, Redis WRONGPASS/NOAUTH, the application's
  trigger answering 401/403 to our bearer token) raises ``AuthRejected``, a
  ``CredentialsRejected``: opsdrill could not look, so a check is *broken* too, and the
  fixtures name the inventory key and the environment variable to fix;
- a server that answered and said no to the thing being verified (a 5xx to RCPT TO, a
  message that never arrived, the application answering 500) is a *failure*:
  ``ProbeFailed``, an ``OperationFailed`` whose ``stage`` names the step (send, receive,
  trigger, ...).
"""

from __future__ import annotations

from typing import Any, Literal

from opsdrill.errors import CredentialsRejected, OperationFailed, TargetUnreachable

# Which of the inventory's secrets a server refused (the fixtures map it to the key).
Credential = Literal["smtp", "imap", "trigger", "redis"]
# Which connection's TLS certificate was not trusted (the fixtures map it to ca_file).
Endpoint = Literal["smtp", "imap", "trigger", "link", "redis"]


class ProbeFailed(OperationFailed):
    """A step of the probe ran and failed; the message says where and what was said."""


class AuthRejected(CredentialsRejected):
    """A server refused opsdrill's own credentials (SMTP 535, IMAP NO to LOGIN, Redis
    WRONGPASS, a 401/403 to the trigger's bearer token).

    Not a verdict on the target: the account opsdrill logs in with is wrong (or was
    rotated), so nothing could be judged and a check is *broken* (exit 2), never failed.
    ``stage`` names the step as for ``ProbeFailed`` (the message starts with it);
    ``credential`` says which secret was refused: ``smtp`` (the probe's submission
    password), ``imap`` (the probe mailbox's password), ``trigger`` (the bearer token),
    ``redis`` (the queue's Redis password).
    """

    def __init__(self, stage: str, message: str, *, credential: Credential) -> None:
        self.stage = stage
        self.credential: Credential = credential
        super().__init__(f"{stage}: {message}")


class TlsVerifyFailed(TargetUnreachable):
    """The server's TLS certificate did not verify against the trusted CAs: nothing was
    judged (broken). ``endpoint`` says which connection, so the fixtures can name the
    inventory's ``ca_file`` key to fix; the message never suggests ``verify = false``."""

    def __init__(self, message: str, *, endpoint: Endpoint) -> None:
        self.endpoint: Endpoint = endpoint
        super().__init__(message)


class MessageNotFound(ProbeFailed):
    """The message was not visible in any searched folder before the deadline.

    ``details`` holds what was searched where (JSON-able), and ``sent`` the evidence of
    the send (or trigger) that preceded the wait, so a check can attach both.
    """

    def __init__(self, stage: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(stage, message)
        self.details = details
        self.sent: dict[str, Any] = {}
