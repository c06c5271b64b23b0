"""Making the application send mail (an HTTP request), and following a link from it.

urllib3 with explicit connect/read timeouts and no retries: a retried POST could invite
the same user twice, and a probe must report the first failure as it happened. The bearer
token and the secret headers' values are registered as secrets (masked by ``redact``
everywhere) and never put in a message or in evidence; neither is the request body, nor
any header.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3

from opsdrill.errors import ConfigError, TargetUnreachable
from opsdrill.mail._net import excerpt, is_cert_failure, tls_context
from opsdrill.mail.errors import AuthRejected, Endpoint, ProbeFailed, TlsVerifyFailed
from opsdrill.redact import redact, register

STAGE = "trigger"
EXCERPT_BYTES = 2048
MAX_REDIRECTS = 5
# with a bearer token or a secret header sent: our credential, not the application, is wrong
REFUSED = (401, 403)


@dataclass(frozen=True)
class TriggerResponse:
    method: str
    url: str  # redacted
    status: int
    excerpt: str
    started_utc: datetime
    started_monotonic: float
    answered_utc: datetime
    answered_monotonic: float

    @property
    def elapsed_seconds(self) -> float:
        return self.answered_monotonic - self.started_monotonic

    def evidence(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "url": self.url,
            "status": self.status,
            "body_excerpt": self.excerpt,
            "started_utc": self.started_utc.isoformat(),
            "answered_utc": self.answered_utc.isoformat(),
            "elapsed_seconds": round(self.elapsed_seconds, 3),
        }


@dataclass(frozen=True)
class LinkFetch:
    url: str  # redacted
    status: int
    final_url: str  # after redirects, redacted
    redirects: int
    elapsed_seconds: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def evidence(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "final_url": self.final_url,
            "redirects": self.redirects,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
        }


def _pool(url: str, timeout: float, ca_file: str | None, verify: bool) -> urllib3.PoolManager:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"URL {redact(url)!r}: expected http(s)://host/...")
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        retries=False,
        ssl_context=tls_context(ca_file, verify) if parts.scheme == "https" else None,
    )


def _unreachable(
    what: str, url: str, exc: Exception, timeout: float, endpoint: Endpoint
) -> TargetUnreachable:
    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    kind = type(reason).__name__
    text = excerpt(str(reason), 200)
    if isinstance(reason, urllib3.exceptions.TimeoutError):
        text = f"timed out after {timeout:g} s"
    if is_cert_failure(reason):
        return TlsVerifyFailed(
            f"{what} {redact(url)}: TLS certificate verification failed: {text}",
            endpoint=endpoint,
        )
    return TargetUnreachable(f"{what} {redact(url)}: {kind}: {text}")


def trigger_app(
    url: str,
    method: str = "POST",
    json_body: Mapping[str, Any] | None = None,
    bearer_token: str | None = None,
    timeout: float = 10.0,
    *,
    headers: Mapping[str, str] | None = None,
    secret_headers: Mapping[str, str] | None = None,
    ca_file: str | None = None,
    verify: bool = True,
) -> TriggerResponse:
    """Send the request that makes the application send mail, with ``headers`` and
    ``secret_headers`` (values that are credentials, e.g. an API key). A non-2xx answer
    raises ``ProbeFailed`` with the status and a body excerpt, except a 401 or 403 to a
    request carrying ``bearer_token`` or ``secret_headers``: that is our credential
    refused, ``AuthRejected`` (broken, not a verdict on the application). No answer
    raises ``TargetUnreachable``."""
    credentials = [*(secret_headers or {}).values(), *([bearer_token] if bearer_token else [])]
    for value in credentials:
        register(value)
    send_headers = {**(headers or {}), **(secret_headers or {})}
    if bearer_token:
        send_headers["Authorization"] = f"Bearer {bearer_token}"
    pool = _pool(url, timeout, ca_file, verify)
    started_utc, started = datetime.now(UTC), time.monotonic()
    try:
        response = pool.request(
            method.upper(),
            url,
            json=dict(json_body) if json_body is not None else None,
            headers=send_headers,
            redirect=False,
            preload_content=False,
        )
        try:
            body = response.read(EXCERPT_BYTES, decode_content=True)
        finally:
            response.release_conn()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _unreachable(
            f"application trigger {method.upper()}", url, exc, timeout, "trigger"
        ) from None
    answered = time.monotonic()
    result = TriggerResponse(
        method=method.upper(),
        url=redact(url),
        status=response.status,
        excerpt=redact(excerpt(body or b"", 500)),
        started_utc=started_utc,
        started_monotonic=started,
        answered_utc=datetime.now(UTC),
        answered_monotonic=answered,
    )
    if credentials and response.status in REFUSED:
        what = " and ".join(
            [*(["the bearer token"] if bearer_token else []), *sorted(secret_headers or {})]
        )
        raise AuthRejected(
            STAGE,
            f"{result.method} {result.url} answered {response.status}: the application "
            f"refused {what}: {result.excerpt or 'empty body'}",
            credential="trigger",
        )
    if not 200 <= response.status < 300:
        raise ProbeFailed(
            STAGE,
            f"{result.method} {result.url} answered {response.status} (expected 2xx): "
            f"{result.excerpt or 'empty body'}",
        )
    return result


def fetch_link(
    url: str,
    timeout: float = 10.0,
    *,
    ca_file: str | None = None,
    verify: bool = True,
    max_redirects: int = MAX_REDIRECTS,
) -> LinkFetch:
    """GET ``url``, following up to ``max_redirects`` redirects (an activation link
    typically redirects to a login page). Returns the final status; does not judge it.
    Raises ``TargetUnreachable`` when the server does not answer."""
    pool = _pool(url, timeout, ca_file, verify)
    started = time.monotonic()
    try:
        response = pool.request(
            "GET",
            url,
            retries=urllib3.Retry(
                total=None, connect=0, read=0, redirect=max_redirects, raise_on_redirect=False
            ),
            preload_content=False,
        )
        try:
            response.read(EXCERPT_BYTES)
        finally:
            response.release_conn()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _unreachable("link", url, exc, timeout, "link") from None
    history = response.retries.history if response.retries else ()
    final = urljoin(url, response.geturl() or url)  # urllib3 may give only the path
    return LinkFetch(
        url=redact(url),
        status=response.status,
        final_url=redact(final),
        redirects=len(history),
        elapsed_seconds=time.monotonic() - started,
    )
