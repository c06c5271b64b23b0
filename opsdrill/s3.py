"""S3 access through the minio SDK (MinIO in production, moto locally), with timeouts."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error, ServerError

from opsdrill.config.inventory import Inventory, Store
from opsdrill.errors import CredentialsRejected, TargetUnreachable

T = TypeVar("T")
PART_SIZE = 16 * 1024 * 1024  # minio buffers one part in memory: bounds our RSS


def client(inv: Inventory, store: Store, *, retries: int = 3) -> Minio:
    timeout = urllib3.Timeout(connect=min(10.0, store.timeout_seconds), read=store.timeout_seconds)
    kwargs: dict[str, Any] = {}
    if store.ca_file:
        kwargs["ssl_context"] = ssl.create_default_context(
            cafile=str(inv.resolve_path(store.ca_file))
        )
    http = urllib3.PoolManager(
        timeout=timeout,
        maxsize=32,  # mirror workers share one client: up to 32 connections per host
        retries=urllib3.Retry(
            total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
        **kwargs,
    )
    return Minio(
        store.endpoint,
        access_key=inv.secret(store.access_key_env),
        secret_key=inv.secret(store.secret_key_env),
        secure=store.secure,
        region=store.region,
        http_client=http,
    )


# What a request to a store can raise; anything else is a bug or a bad object, not "the
# store is unreachable", and must not be reported as such.
S3_ERRORS: tuple[type[BaseException], ...] = (
    MinioException,
    urllib3.exceptions.HTTPError,
    OSError,
)
# S3 error codes that mean "these are not good credentials for this bucket": opsdrill's own
# key pair (or its region) is wrong, which says nothing about the store's contents.
CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidSecurity",
        "AuthorizationHeaderMalformed",
        "AllAccessDisabled",
    }
)


def unreachable(store_name: str, store: Store, exc: BaseException) -> TargetUnreachable:
    """Why a store could not be used, in words naming the inventory key to fix.

    Always a ``TargetUnreachable`` (a check is broken, an operation exits 2): refused
    credentials are ``CredentialsRejected``; the message never shows the HTTP library's
    exception (``MaxRetryError(...)``) but what it means.
    """
    where = f"store {store_name} ({_url(store)}/{store.bucket})"
    if isinstance(exc, S3Error):
        said = f"S3 {exc.code}: {exc.message}" if exc.message else f"S3 {exc.code}"
        if exc.code in CREDENTIAL_CODES:
            return CredentialsRejected(
                f"{where} refused opsdrill's credentials: {said} (fix: check the key pair "
                f"named by stores.{store_name}.access_key_env = {store.access_key_env} and "
                f"stores.{store_name}.secret_key_env = {store.secret_key_env}, its "
                f"permissions on bucket {store.bucket}, and stores.{store_name}.region)"
            )
        if exc.code == "NoSuchBucket":
            return TargetUnreachable(
                f"{where}: bucket {store.bucket} does not exist (fix: check "
                f"stores.{store_name}.bucket and stores.{store_name}.endpoint)"
            )
        return TargetUnreachable(f"{where}: {said}")
    if isinstance(exc, ServerError):
        return TargetUnreachable(
            f"{where}: the server answered HTTP {exc.status_code} (is it an S3 API?)"
        )
    return TargetUnreachable(
        f"{where} unreachable: {_transport_reason(exc, store_name, store)} (fix: check "
        f"stores.{store_name}.endpoint, stores.{store_name}.secure and that the S3 server "
        "is up and reachable from this host)"
    )


def _url(store: Store) -> str:
    return f"{'https' if store.secure else 'http'}://{store.endpoint}"


def _transport_reason(exc: BaseException, store_name: str, store: Store) -> str:
    """What a urllib3 or socket error means, in words: refused, no answer, TLS, DNS."""
    reason: BaseException = exc
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        reason = exc.reason
    text = str(reason)
    if isinstance(reason, urllib3.exceptions.SSLError | ssl.SSLError):
        return (
            f"TLS failed: {_first_line(text)} (if the server's certificate is signed by a "
            f"private CA, set stores.{store_name}.ca_file to that CA's PEM file)"
        )
    # NewConnectionError (refused, no route) and NameResolutionError subclass
    # ConnectTimeoutError in urllib3 2: test the specific ones first.
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return f"the host name of {store.endpoint} does not resolve"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        # "<HTTPConnection object at 0x..>: Failed to establish...": drop the object
        return (
            "connection refused"
            if "refused" in text.lower()
            else _first_line(text.split(">: ", 1)[-1])
        )
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return f"no answer to connect within {min(10.0, store.timeout_seconds):g} s"
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return f"no answer within {store.timeout_seconds:g} s (stores.{store_name}.timeout_seconds)"
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(reason, urllib3.exceptions.ProtocolError):
        return f"the connection was dropped: {_first_line(text)}"
    return f"{type(reason).__name__}: {_first_line(text)}" if text else type(reason).__name__


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def store_call(store_name: str, store: Store, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn(*args, **kw)`` with the store's transport and S3 errors turned into
    ``unreachable`` ones; any other exception (a corrupt object, a bug) passes unchanged."""
    try:
        return fn(*args, **kw)
    except S3_ERRORS as exc:
        raise unreachable(store_name, store, exc) from None


def iter_chunks(response: Any, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    try:
        yield from response.stream(chunk)
    finally:
        response.close()
        response.release_conn()
