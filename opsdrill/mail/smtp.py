"""Submitting the probe over SMTP (smtplib), bounded and with errors that say which step
failed on which server.

We drive MAIL/RCPT/DATA ourselves instead of ``sendmail()`` because ``sendmail()``
discards the final 250 reply, and that reply carries the queue id (Postfix:
``250 2.0.0 Ok: queued as 4XyZ``) that ties the probe to the server's log.

TLS modes: ``starttls`` requires the server to offer STARTTLS (a server that stops
offering it is a finding, not something to fall back from), ``tls`` is implicit TLS
(port 465), ``none`` is plain text and allowed only to a loopback address.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opsdrill.mail._net import (
    EndpointFields,
    TlsMode,
    check_tls_mode,
    excerpt,
    tls_context,
    unreachable,
)
from opsdrill.mail.errors import AuthRejected, ProbeFailed
from opsdrill.mail.message import ProbeMessage, bare_address, build_probe_message, new_token

STAGE = "send"
_QUEUE_ID = re.compile(r"queued as ([A-Za-z0-9._-]+)", re.I)


@dataclass(frozen=True)
class SmtpEndpoint(EndpointFields):
    """A submission server. ``password`` is never shown (repr, evidence, messages)."""

    host: str
    port: int = 587
    tls: TlsMode = "starttls"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    verify: bool = True
    timeout: float = 10.0
    # EHLO name; the default avoids smtplib's getfqdn(), a reverse DNS lookup that can
    # hang for seconds on a machine without working DNS.
    helo: str | None = None


@dataclass(frozen=True)
class SendReceipt:
    """The server accepted the message: when (UTC and monotonic), and what it said."""

    message: ProbeMessage
    accepted_utc: datetime
    accepted_monotonic: float
    reply: str
    queue_id: str | None
    tls_version: str | None
    elapsed_seconds: float

    @property
    def token(self) -> str:
        return self.message.token

    def evidence(self) -> dict[str, Any]:
        return {
            **self.message.evidence(),
            "accepted_utc": self.accepted_utc.isoformat(),
            "reply": self.reply,
            "queue_id": self.queue_id,
            "tls_version": self.tls_version,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
        }


def _connect(endpoint: SmtpEndpoint) -> smtplib.SMTP:
    helo = endpoint.helo or socket.gethostname() or "localhost"
    if endpoint.tls == "tls":
        context = tls_context(endpoint.ca_file, endpoint.verify)
        return smtplib.SMTP_SSL(
            endpoint.host,
            endpoint.port,
            local_hostname=helo,
            timeout=endpoint.timeout,
            context=context,
        )
    return smtplib.SMTP(endpoint.host, endpoint.port, local_hostname=helo, timeout=endpoint.timeout)


def _reply(code: int, text: bytes | str) -> str:
    return f"{code} {excerpt(text)}"


def _require(ok: bool, endpoint: SmtpEndpoint, what: str, code: int, text: bytes) -> None:
    if not ok:
        raise ProbeFailed(STAGE, f"SMTP {endpoint.where} refused {what}: {_reply(code, text)}")


def submit(endpoint: SmtpEndpoint, message: ProbeMessage) -> SendReceipt:
    """Submit ``message`` and return once the server has accepted it (250 to DATA).

    Raises ``TargetUnreachable`` (refused, timeout, TLS, DNS, disconnect),
    ``AuthRejected`` (535 and other AUTH refusals of our credentials: broken, not failed),
    ``ProbeFailed`` (no STARTTLS offered,
    no AUTH offered, sender/recipient/data refused).
    """
    check_tls_mode("SMTP", endpoint.host, endpoint.port, endpoint.tls)
    sender, recipient = bare_address(message.sender), bare_address(message.recipient)
    where = endpoint.where
    doing = f"connecting, tls={endpoint.tls}"
    started = time.monotonic()
    smtp: smtplib.SMTP | None = None
    try:
        smtp = _connect(endpoint)
        doing = "EHLO"
        smtp.ehlo()
        if endpoint.tls == "starttls":
            if not smtp.has_extn("starttls"):
                raise ProbeFailed(
                    STAGE, f"SMTP {where} does not offer STARTTLS (required by tls=starttls)"
                )
            doing = "STARTTLS"
            smtp.starttls(context=tls_context(endpoint.ca_file, endpoint.verify))
            smtp.ehlo()
        if endpoint.user is not None:
            doing = f"AUTH as {endpoint.user}"
            if not smtp.has_extn("auth"):
                raise ProbeFailed(
                    STAGE, f"SMTP {where} does not offer AUTH (after tls={endpoint.tls})"
                )
            smtp.login(endpoint.user, endpoint.password or "")
        doing = "MAIL FROM"
        code, text = smtp.mail(sender)
        _require(code == 250, endpoint, f"MAIL FROM:<{sender}>", code, text)
        doing = "RCPT TO"
        code, text = smtp.rcpt(recipient)
        _require(code in (250, 251), endpoint, f"RCPT TO:<{recipient}>", code, text)
        doing = "DATA"
        code, text = smtp.data(message.raw)
        accepted_monotonic = time.monotonic()
        accepted_utc = datetime.now(UTC)
        _require(code == 250, endpoint, f"the message (token {message.token})", code, text)
        reply = _reply(code, text)
        tls_version = smtp.sock.version() if isinstance(smtp.sock, ssl.SSLSocket) else None
    except smtplib.SMTPAuthenticationError as exc:
        raise AuthRejected(
            STAGE,
            f"SMTP {where} rejected AUTH for user {endpoint.user}: "
            f"{_reply(exc.smtp_code, exc.smtp_error)}",
            credential="smtp",
        ) from None
    except smtplib.SMTPNotSupportedError as exc:
        raise ProbeFailed(STAGE, f"SMTP {where}: {doing}: not supported: {exc}") from None
    except smtplib.SMTPServerDisconnected as exc:  # smtplib's wrapper for read errors
        cause: OSError = ConnectionResetError(0, "connection closed by the server")
        if "timed out" in str(exc):
            cause = TimeoutError()
        raise unreachable(
            "SMTP", endpoint.host, endpoint.port, doing, cause, endpoint.timeout
        ) from None
    except smtplib.SMTPResponseException as exc:  # greeting, EHLO, STARTTLS, DATA refused
        raise ProbeFailed(
            STAGE, f"SMTP {where} refused {doing}: {_reply(exc.smtp_code, exc.smtp_error)}"
        ) from None
    except smtplib.SMTPException as exc:
        raise ProbeFailed(STAGE, f"SMTP {where}: {doing}: {excerpt(str(exc))}") from None
    except OSError as exc:  # refused, timeout, TLS (ssl.SSLError), DNS (gaierror)
        raise unreachable(
            "SMTP", endpoint.host, endpoint.port, doing, exc, endpoint.timeout
        ) from None
    finally:
        if smtp is not None:
            _close(smtp)
    match = _QUEUE_ID.search(reply)
    return SendReceipt(
        message=message,
        accepted_utc=accepted_utc,
        accepted_monotonic=accepted_monotonic,
        reply=reply,
        queue_id=match.group(1) if match else None,
        tls_version=tls_version,
        elapsed_seconds=accepted_monotonic - started,
    )


def _close(smtp: smtplib.SMTP) -> None:
    """QUIT politely; the message is already accepted, so failures here do not matter."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def send_probe(
    endpoint: SmtpEndpoint,
    sender: str,
    recipient: str,
    *,
    token: str | None = None,
    body: str | None = None,
) -> SendReceipt:
    """Build a probe message with a fresh (or the given) token and submit it."""
    message = build_probe_message(sender, recipient, token or new_token(), body=body)
    return submit(endpoint, message)
