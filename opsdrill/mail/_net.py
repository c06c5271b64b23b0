"""What the mail clients share: TLS contexts, the loopback rule, and the mapping of
socket-level failures to ``TargetUnreachable`` with one message shape:

    SMTP 127.0.0.1:2525: connection refused (while connecting, tls=starttls)

The message names the protocol, host:port and the step being attempted; it never
contains a password (none is passed in, and OpsdrillError redacts registered secrets).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from typing import Any, Literal

from opsdrill.errors import ConfigError, TargetUnreachable
from opsdrill.mail.errors import Endpoint, TlsVerifyFailed

TlsMode = Literal["starttls", "tls", "none"]
TLS_MODES: tuple[str, ...] = ("starttls", "tls", "none")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tls_mode(protocol: str, host: str, port: int, mode: str) -> None:
    """Plain text is only for the local stack: credentials must not cross a network
    unencrypted, so ``none`` to a non-loopback host is a configuration error."""
    if mode not in TLS_MODES:
        raise ConfigError(
            f"{protocol} {host}:{port}: tls mode {mode!r}: expected one of {', '.join(TLS_MODES)}"
        )
    if mode == "none" and not is_loopback(host):
        raise ConfigError(
            f"{protocol} {host}:{port}: tls mode 'none' is allowed only for 127.0.0.1 "
            "(fix: use 'starttls' or 'tls')"
        )


def tls_context(ca_file: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """The default context (system CAs, hostname checked), or one trusting ``ca_file``
    (the local stack's self-signed certificate); ``verify=False`` turns checking off."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def describe(exc: BaseException, timeout: float) -> str:
    """A short, secret-free reason for a connection-level failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, ConnectionResetError):
        return exc.strerror or "connection reset by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_cert_failure(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps: urllib3 and redis-py wrap the ssl error) is a
    certificate that did not verify, as opposed to a refused or timed-out connection."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
            return True
        exc = getattr(exc, "reason", None) or exc.__cause__ or exc.__context__
        seen += 1
    return False


def unreachable(
    protocol: str, host: str, port: int, doing: str, exc: BaseException, timeout: float
) -> TargetUnreachable:
    text = f"{protocol} {host}:{port}: {describe(exc, timeout)} (while {doing})"
    if is_cert_failure(exc):
        endpoint: Endpoint = "smtp" if protocol == "SMTP" else "imap"
        return TlsVerifyFailed(text, endpoint=endpoint)
    return TargetUnreachable(text)


def excerpt(data: bytes | str, limit: int = 300) -> str:
    """A server's answer, one line, shortened: enough to diagnose, never a flood."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EndpointFields:
    """``where`` and the evidence shared by the SMTP and IMAP endpoint dataclasses.

    Never the password: evidence goes to Allure and into failure messages.
    """

    host: str
    port: int
    tls: str
    user: str | None
    ca_file: str | None
    verify: bool
    timeout: float

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def evidence(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "tls": self.tls,
            "user": self.user,
            "ca_file": self.ca_file,
            "verify": self.verify,
            "timeout_seconds": self.timeout,
        }
