"""S3 access through the minio SDK (MinIO in production, moto locally), with timeouts."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error

from opsdrill.errors import TargetUnreachable
from opsdrill.inventory import Inventory, Store

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


def unreachable(store_name: str, store: Store, exc: BaseException) -> TargetUnreachable:
    kind = type(exc).__name__
    if isinstance(exc, S3Error):
        return TargetUnreachable(
            f"store {store_name} ({store.endpoint}/{store.bucket}): S3 error {exc.code}: "
            f"{exc.message}"
        )
    reason = str(exc).splitlines()[0][:300] if str(exc) else kind
    return TargetUnreachable(
        f"store {store_name} ({store.endpoint}): unreachable: {kind}: {reason}"
    )


def iter_chunks(response: Any, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    try:
        yield from response.stream(chunk)
    finally:
        response.close()
        response.release_conn()
