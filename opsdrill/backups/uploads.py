"""Writing objects that never overwrite, and multipart uploads that are never left open.

A multipart upload that is neither completed nor aborted keeps its parts on the store, and
costs for them, for ever (1 GiB after five faults). So:

- ``upload_stream`` aborts its upload on *every* failure, ``BaseException`` included (Ctrl-C,
  and the exception the CLI raises for SIGTERM and SIGHUP); only SIGKILL, a crash or a
  store that cannot be reached for the abort leave one open;
- ``sweep`` removes what those left: the backup calls it while it holds the database's
  lock (locks.py), when no other run of that database can be uploading;
- ``older_than`` is what ``pg.backup.dangling_uploads`` flags.

Every write is conditional (``If-None-Match: *``, on the PUT and on
CompleteMultipartUpload): S3, MinIO and moto refuse it (412) when the key exists, so no run
can replace an object another one wrote, even if two ever computed the same key. A store
that ignores the header (an old MinIO), or rejects it as not implemented (then we write
without it), is still protected by the unique ids (catalog.py) and the lock.

Why the part loop is ours and not minio's ``put_object``: that call hides the upload id
(the sweep could not tell ours from a stale one), aborts on ``Exception`` only (an
interrupt left the upload open) and cannot make CompleteMultipartUpload conditional. Nor
does minio have a public call to list uploads (its ListMultipartUploadsResult also drops
NextUploadIdMarker, so the listing is parsed here). We use the client's own request
methods instead (``_create_multipart_upload``, ``_upload_part``, ``_abort_multipart_upload``,
``_complete_multipart_upload``, ``_put_object``, ``_execute``): private in minio 7.2
(pyproject: ``minio>=7.2,<8``; 7.2.20 here); tests/faults/test_uploads.py fails when an upgrade
changes them. Signing, retries and timeouts stay the client's.
"""

from __future__ import annotations

import hashlib
import io
import sys
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO
from urllib.parse import unquote_plus

from minio import Minio
from minio.datatypes import Part
from minio.error import S3Error
from minio.helpers import DictType, md5sum_hash, normalize_headers

from opsdrill.errors import RefusedError
from opsdrill.redact import redact

Say = Callable[[str], None]
# What "dangling" means for pg.backup.dangling_uploads: no backup runs anywhere near a day.
DANGLING_AFTER = timedelta(days=1)
# The answers that mean "the key exists" to a conditional write (409: a concurrent one won).
EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
# A store that rejects the header rather than ignoring it (HTTP 501): write without it, the
# unique ids (catalog.new_nonce) and the lock still keep runs apart.
UNSUPPORTED = "NotImplemented"
MAX_LISTING_PAGES = 100  # 1000 uploads a page: more than any bucket of ours should hold


def say_on_stderr(line: str) -> None:
    print(f"opsdrill: {redact(line)}", file=sys.stderr, flush=True)


class KeyExists(RefusedError):
    """A conditional write found the key taken: nothing was overwritten (exit 2)."""


@dataclass(frozen=True)
class OpenUpload:
    key: str
    upload_id: str
    initiated: datetime | None  # as the store reports it; None if it did not say

    def describe(self) -> str:
        if self.initiated is None:
            return f"{self.key} (upload {self.upload_id[:12]}..., start not reported)"
        started = self.initiated.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return f"{self.key} (upload {self.upload_id[:12]}..., started {started})"


# ----------------------------------------------------------------------------- writing


def put_new(
    s3: Minio,
    bucket: str,
    key: str,
    body: bytes,
    content_type: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """One PUT that only creates: ``KeyExists`` if ``key`` holds another object.

    The same bytes already there count as written: that is our own PUT, retried by the
    HTTP client after its answer was lost, not someone else's object."""
    headers = _headers(content_type, metadata)
    headers["If-None-Match"] = "*"
    try:
        s3._put_object(bucket, key, body, headers)
    except S3Error as exc:
        if exc.code == UNSUPPORTED:
            del headers["If-None-Match"]
            s3._put_object(bucket, key, body, headers)
            return
        if exc.code not in EXISTS_CODES:
            raise
        if _etag_of(s3, bucket, key) != _md5(body):
            raise _exists(bucket, key) from None


def upload_stream(
    s3: Minio,
    bucket: str,
    key: str,
    reader: IO[bytes] | io.RawIOBase,
    *,
    part_size: int,
    parallel: int,
    content_type: str = "application/octet-stream",
    metadata: dict[str, str] | None = None,
    note: Say = say_on_stderr,
) -> None:
    """Stream ``reader`` into a new object ``key``: one conditional PUT when it fits in a
    part, else a multipart upload with ``parallel`` parts in flight (memory: about
    ``parallel + 1`` parts) completed conditionally.

    Whatever ends it early (the reader's exception, a store error, ``KeyExists``, an
    interrupt) aborts the upload after the parts in flight have finished, then propagates.
    An abort that fails is said through ``note``: the next backup's sweep removes it."""
    # A list, emptied by _send_parts: no reference keeps the first part in memory.
    first = [_read_part(reader, part_size)]
    carry = _read_part(reader, 1) if len(first[0]) == part_size else b""  # is there more?
    if not carry:
        put_new(s3, bucket, key, first[0], content_type, metadata)
        return
    headers = _headers(content_type, metadata)
    upload_id = str(s3._create_multipart_upload(bucket, key, headers))
    pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="part")
    try:
        etags = _send_parts(
            s3, bucket, key, upload_id, pool, parallel, first, carry, reader, part_size
        )
        pool.shutdown(wait=True)
        _complete(s3, bucket, key, upload_id, etags)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # abort only once no part is in flight
        try:
            s3._abort_multipart_upload(bucket, key, upload_id)
        except Exception as exc:  # the first error is the one to report
            note(
                f"could not abort the multipart upload of {key} ({_reason(exc)}); the next "
                "backup of this database removes it"
            )
        raise


def _send_parts(
    s3: Minio,
    bucket: str,
    key: str,
    upload_id: str,
    pool: ThreadPoolExecutor,
    parallel: int,
    first: list[bytes],
    carry: bytes,
    reader: IO[bytes] | io.RawIOBase,
    part_size: int,
) -> list[str]:
    """Upload every part, at most ``parallel`` in flight; the etags in part order.
    ``first`` holds the first part (read by the caller), ``carry`` the bytes read past it."""
    etags: list[str] = []
    pending: deque[Future[str]] = deque()
    number = 0
    limit = max(1, parallel)
    while True:
        if first:
            data = first.pop()
        else:
            data = carry + _read_part(reader, part_size - len(carry))
            carry = b""
        if not data:
            break
        number += 1
        pending.append(pool.submit(s3._upload_part, bucket, key, data, None, upload_id, number))
        del data
        while len(pending) >= limit or (pending and pending[0].done()):
            etags.append(str(pending.popleft().result()))
    etags += [str(f.result()) for f in pending]
    return etags


def _complete(s3: Minio, bucket: str, key: str, upload_id: str, etags: Sequence[str]) -> None:
    """CompleteMultipartUpload, only if ``key`` does not exist yet (minio's own
    ``_complete_multipart_upload`` cannot send the header). A 412 for an object whose etag
    is this upload's is our own completion, retried by the HTTP client."""
    root = ET.Element("CompleteMultipartUpload")
    for number, etag in enumerate(etags, 1):
        part = ET.SubElement(root, "Part")
        ET.SubElement(part, "PartNumber").text = str(number)
        ET.SubElement(part, "ETag").text = f'"{etag}"'
    body = ET.tostring(root)
    headers: DictType = {
        "Content-Type": "application/xml",
        "Content-MD5": str(md5sum_hash(body)),
        "If-None-Match": "*",
    }
    try:
        response = s3._execute(
            "POST", bucket, key, body=body, headers=headers, query_params={"uploadId": upload_id}
        )
    except S3Error as exc:
        if exc.code == UNSUPPORTED:
            parts = [Part(number, etag) for number, etag in enumerate(etags, 1)]
            s3._complete_multipart_upload(bucket, key, upload_id, parts)
            return
        if exc.code in EXISTS_CODES and _etag_of(s3, bucket, key) == _multipart_etag(etags):
            return
        if exc.code in EXISTS_CODES:
            raise _exists(bucket, key) from None
        raise
    # S3 may answer 200 with an error document when completing fails late.
    if b"<Error>" in response.data[:512]:
        raise S3Error.fromxml(response)


# ----------------------------------------------------------------------------- finding


def list_open(s3: Minio, bucket: str, prefix: str) -> list[OpenUpload]:
    """Every multipart upload open under ``prefix``, all pages. ``prefix`` must end with
    ``/`` to mean a folder: ``pg/crm`` would also list ``pg/crm2/``."""
    found: list[OpenUpload] = []
    markers: dict[str, str] = {}
    for _ in range(MAX_LISTING_PAGES):
        query = {"uploads": "", "prefix": prefix, "max-uploads": "1000", "encoding-type": "url"}
        response = s3._execute("GET", bucket, query_params={**query, **markers})
        root = ET.fromstring(response.data)
        encoded = (_text(root, "EncodingType") or "").lower() == "url"
        for upload in _children(root, "Upload"):
            key = _text(upload, "Key") or ""
            found.append(
                OpenUpload(
                    unquote_plus(key) if encoded else key,
                    _text(upload, "UploadId") or "",
                    _parse_time(_text(upload, "Initiated")),
                )
            )
        if (_text(root, "IsTruncated") or "").lower() != "true":
            break
        key_marker = _text(root, "NextKeyMarker") or ""
        id_marker = _text(root, "NextUploadIdMarker") or ""
        if not key_marker or markers == {"key-marker": key_marker, "upload-id-marker": id_marker}:
            break  # a store that says "truncated" without a way on
        markers = {"key-marker": unquote_plus(key_marker) if encoded else key_marker}
        markers["upload-id-marker"] = id_marker
    return found


def older_than(
    uploads: Iterable[OpenUpload], age: timedelta, now: datetime | None = None
) -> list[OpenUpload]:
    """The uploads started more than ``age`` before ``now``; one whose start the store did
    not report counts as old (it cannot be shown to be recent)."""
    at = now or datetime.now(UTC)
    return [u for u in uploads if u.initiated is None or at - u.initiated > age]


def parts_size(s3: Minio, bucket: str, upload: OpenUpload) -> int:
    """Bytes the upload's parts hold on the store (what leaving it open costs)."""
    total = 0
    marker = ""
    for _ in range(MAX_LISTING_PAGES):
        query: DictType = {"uploadId": upload.upload_id, "max-parts": "1000"}
        if marker:
            query["part-number-marker"] = marker
        response = s3._execute("GET", bucket, upload.key, query_params=query)
        root = ET.fromstring(response.data)
        total += sum(int(_text(p, "Size") or 0) for p in _children(root, "Part"))
        marker = _text(root, "NextPartNumberMarker") or ""
        if (_text(root, "IsTruncated") or "").lower() != "true" or not marker:
            break
    return total


@dataclass
class Swept:
    aborted: list[OpenUpload]
    left: list[OpenUpload]  # under the prefix but not ours to judge: reported, kept
    failed: list[tuple[OpenUpload, str]]
    freed: int  # bytes of parts the aborted uploads held


def sweep(
    s3: Minio,
    bucket: str,
    prefix: str,
    ours: Callable[[str], bool],
    whose: str,
    note: Say = say_on_stderr,
) -> Swept:
    """Abort every open upload under ``prefix`` whose key ``ours`` claims (``whose``
    names the owner in messages: "a backup of crm"), and say so.

    Only safe while nothing else can be uploading those keys: the backup calls it holding
    the database's lock, before its own upload starts, so every one of them is a leftover
    (a killed run, an abort that could not reach the store), whatever its age."""
    result = Swept([], [], [], 0)
    for upload in list_open(s3, bucket, prefix):
        if not ours(upload.key):
            result.left.append(upload)
            continue
        try:
            size = parts_size(s3, bucket, upload)
            s3._abort_multipart_upload(bucket, upload.key, upload.upload_id)
        except S3Error as exc:
            if exc.code != "NoSuchUpload":  # gone meanwhile: nothing left to do
                result.failed.append((upload, _reason(exc)))
            continue
        result.aborted.append(upload)
        result.freed += size
    if result.aborted:
        n = len(result.aborted)
        note(
            f"aborted {n} stale multipart upload{'s' if n > 1 else ''} "
            f"({result.freed / 2**20:.1f} MiB of parts) left by an interrupted run: "
            f"{'; '.join(u.describe() for u in result.aborted)}"
        )
    for upload, reason in result.failed:
        note(f"could not abort the stale multipart upload {upload.describe()}: {reason}")
    if result.left:
        n = len(result.left)
        note(
            f"left {n} upload{'s' if n > 1 else ''} under {prefix} that "
            f"{'is' if n == 1 else 'are'} not {whose} (abort by hand if dangling): "
            f"{'; '.join(u.describe() for u in result.left)}"
        )
    return result


# ----------------------------------------------------------------------------- helpers


def _read_part(reader: IO[bytes] | io.RawIOBase, size: int) -> bytes:
    """Exactly ``size`` bytes, fewer only at the end of the stream."""
    buf = bytearray()
    while len(buf) < size:
        chunk = reader.read(size - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _headers(content_type: str, metadata: dict[str, str] | None) -> DictType:
    headers = normalize_headers(dict(metadata or {}))  # x-amz-meta-*, as minio sends them
    headers["Content-Type"] = content_type
    return headers


def _etag_of(s3: Minio, bucket: str, key: str) -> str | None:
    try:
        return str(s3.stat_object(bucket, key).etag or "").strip('"') or None
    except S3Error:
        return None


def _md5(body: bytes) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def _multipart_etag(etags: Sequence[str]) -> str:
    """S3's etag of a completed multipart object: md5 of the parts' md5s, "-", count."""
    joined = b"".join(bytes.fromhex(e.strip('"')) for e in etags)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(etags)}"


def _exists(bucket: str, key: str) -> KeyExists:
    return KeyExists(
        f"refusing to overwrite {bucket}/{key}: the key already exists and was not "
        "overwritten (another run wrote it; its backup is untouched)"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, S3Error):
        return f"S3 {exc.code}"
    return f"the store could not be reached: {type(exc).__name__}"


def _children(root: ET.Element, name: str) -> list[ET.Element]:
    return [el for el in root if el.tag.rsplit("}", 1)[-1] == name]


def _text(root: ET.Element, name: str) -> str | None:
    for el in _children(root, name):
        return el.text
    return None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
