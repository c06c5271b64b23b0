"""S3 object calls that keep every key exactly as listed, "." and ".." segments included.

Used by the files mirror (opsdrill.files.mirror) and what reads its stores for the checks
(opsdrill.files.stores).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import MinioException
from minio.helpers import DictType, normalize_headers, read_part_data
from urllib3.exceptions import HTTPError
from urllib3.response import BaseHTTPResponse

from opsdrill.config.inventory import Inventory, Store
from opsdrill.s3 import client

_NETWORK = (MinioException, HTTPError, OSError)


class ShortRead(Exception):
    """The source gave fewer bytes than its listing said: that object failed, no other."""


# -- keys exactly as listed ----------------------------------------------------------------
# An S3 key is a name, not a path: "a/../c.txt" is an object of its own, legal, and written
# by some upload code. Two layers below us would change or refuse it:
# - urllib3's PoolManager.urlopen parses every URL with parse_url, which removes "." and
#   ".." segments (RFC 3986 5.2.4, right for web pages): the request would read or
#   overwrite "c.txt" instead. _ExactPaths sends such a path as given, through the
#   connection pool's own urlopen (which only percent-encodes), as botocore does;
# - that is why the minio SDK refuses every key with such a segment (check_object_name, at
#   the top of each public object call). For those keys alone we call the client's own
#   request methods below that check (_execute, _put_object and the multipart ones, as
#   opsdrill.backups.uploads does: private in minio 7.2, pinned <8 in pyproject; test_uploads.py
#   fails when an upgrade changes them). Signing, retries and timeouts stay the client's;
#   every other key takes the public calls.


def has_dot_segment(key: str) -> bool:
    """Whether ``key`` has a "." or ".." path segment (see above)."""
    return any(part in (".", "..") for part in key.split("/"))


class _ExactPaths(urllib3.PoolManager):
    """A PoolManager that sends a path with "." or ".." segments exactly as given."""

    def urlopen(  # type: ignore[override]
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> BaseHTTPResponse:
        parts = urlsplit(url)
        if not has_dot_segment(parts.path):
            return super().urlopen(method, url, redirect=redirect, **kw)
        pool = self.connection_from_host(parts.hostname, port=parts.port, scheme=parts.scheme)
        kw.setdefault("headers", self.headers)
        target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        return pool.urlopen(method, target, redirect=False, assert_same_host=False, **kw)


# -- a payload hash computed once --------------------------------------------------------
# Over plain HTTP, minio signs every request with the sha256 of its body, computing it in
# _build_headers even when the caller already holds that hash. The mirror does: it hashed
# each single-part object to record its sha256. PAYLOAD_SHA256 is that header, given by the
# caller for a single PUT. The signature then covers the caller's hash, and AWS and MinIO
# refuse a body that does not match it (XAmzContentSHA256Mismatch; moto does not check).
# The mirror hashes the very buffer it sends, so the two cannot differ. Each single-part
# object is hashed once instead of twice.
PAYLOAD_SHA256 = "x-amz-content-sha256"


def _build_headers_known_payload(
    s3: Minio, original: Callable[..., tuple[DictType, Any]], host: str,
    headers: DictType | None = None, body: bytes | None = None, creds: Any = None,
) -> tuple[DictType, Any]:  # fmt: skip
    known = (headers or {}).get(PAYLOAD_SHA256)
    if not isinstance(known, str) or not creds or s3._base_url.is_https or body is None:
        return original(host, headers, body, creds)
    built, date = original(host, headers, None, creds)  # signs nothing yet: no body hashed
    built["Content-Length"] = str(len(body))
    built[PAYLOAD_SHA256] = known
    return built, date


def exact_client(inv: Inventory, store: Store) -> Minio:
    """``opsdrill.s3.client`` whose requests keep "." and ".." key segments and take a
    known payload hash (PAYLOAD_SHA256)."""
    s3 = client(inv, store)
    # Minio takes a ready pool, not a factory: the same settings (timeouts, retries, CA)
    # in a pool that keeps paths exact.
    s3._http = _ExactPaths(**s3._http.connection_pool_kw)
    s3._build_headers = partial(  # type: ignore[method-assign]
        _build_headers_known_payload, s3, s3._build_headers
    )
    return s3


def _query(version: str | None) -> DictType | None:
    return {"versionId": version} if version else None


def get(s3: Minio, bucket: str, key: str, version: str | None, etag: str | None) -> Any:
    headers: Any = {"If-Match": f'"{etag}"'} if etag else None
    if has_dot_segment(key):
        return s3._execute(
            "GET", bucket, key, headers=headers, query_params=_query(version),
            preload_content=False,
        )  # fmt: skip
    return s3.get_object(bucket, key, version_id=version, request_headers=headers)


def metadata(s3: Minio, bucket: str, key: str, version: str | None = None) -> Mapping[str, str]:
    """The object's headers (its ``x-amz-meta-*`` among them), as ``stat_object`` has them."""
    if has_dot_segment(key):
        return s3._execute("HEAD", bucket, key, query_params=_query(version)).headers
    return s3.stat_object(bucket, key, version_id=version).metadata or {}


def put(
    s3: Minio, bucket: str, key: str, data: BinaryIO, length: int, content_type: str,
    metadata: Any, part_size: int, *, sha256: str | None = None,
) -> str | None:  # fmt: skip
    """Upload ``length`` bytes of ``data`` in parts of ``part_size``, one at a time;
    returns the new version id. ``sha256``, the hash of those bytes, spares the client
    hashing them again when they go in one PUT (PAYLOAD_SHA256)."""
    if sha256 is not None and length <= part_size:
        metadata = {**metadata, PAYLOAD_SHA256: sha256}
    if not has_dot_segment(key):
        result = s3.put_object(
            bucket, key, data, length, content_type, metadata, part_size=part_size,
            num_parallel_uploads=1,
        )  # fmt: skip
        return result.version_id
    headers = normalize_headers(metadata)
    headers["Content-Type"] = content_type
    if length <= part_size:
        return s3._put_object(bucket, key, read_exactly(data, length), headers).version_id
    upload_id = s3._create_multipart_upload(bucket, key, headers)
    try:
        parts = []
        for number, start in enumerate(range(0, length, part_size), start=1):
            body = read_exactly(data, min(part_size, length - start))
            parts.append(Part(number, s3._upload_part(bucket, key, body, None, upload_id, number)))
        return s3._complete_multipart_upload(bucket, key, upload_id, parts).version_id
    except BaseException:
        # an upload left open keeps its parts (and their cost) on the store
        with contextlib.suppress(*_NETWORK):
            s3._abort_multipart_upload(bucket, key, upload_id)
        raise


def read_exactly(data: BinaryIO, size: int) -> bytes:
    body = read_part_data(data, size)
    if len(body) != size:
        raise ShortRead(f"read {len(body)} bytes, the listing said {size}")
    return body


def remove(s3: Minio, bucket: str, key: str, version: str | None = None) -> None:
    if has_dot_segment(key):
        s3._execute("DELETE", bucket, key, query_params=_query(version))
    else:
        s3.remove_object(bucket, key, version_id=version)
