"""Failures of the mail probe, kept apart from "unreachable".

The split follows opsdrill.errors: a server that cannot be reached (refused, timed out,
TLS handshake, DNS) raises ``TargetUnreachable`` and a check calls that *broken*. A
server that answered and said no (SMTP 535, IMAP LOGIN rejected, a 5xx to RCPT TO, a
message that never arrived) is a *failure* of the thing being verified: ``ProbeFailed``,
an ``OperationFailed`` whose ``stage`` names the step (send, receive, trigger, ...).
"""

from __future__ import annotations

from typing import Any

from opsdrill.errors import OperationFailed


class ProbeFailed(OperationFailed):
    """A step of the probe ran and failed; the message says where and what was said."""


class AuthRejected(ProbeFailed):
    """The server refused our credentials (SMTP 535, IMAP NO to LOGIN, Redis WRONGPASS).

    Not "unreachable": the server is up and answered, so the probe's configuration or the
    account is wrong, which is exactly what a check must report as a failure.
    """


class MessageNotFound(ProbeFailed):
    """The message was not visible in any searched folder before the deadline.

    ``details`` holds what was searched where (JSON-able), and ``sent`` the evidence of
    the send (or trigger) that preceded the wait, so a check can attach both.
    """

    def __init__(self, stage: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(stage, message)
        self.details = details
        self.sent: dict[str, Any] = {}
