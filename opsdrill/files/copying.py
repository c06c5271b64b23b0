"""One copy run between two buckets, as the mirror and its restore both make it.

Each object is a job on a bounded pool; one that fails is recorded under its key and the
run goes on (``run_parallel``, ``record``). A failure a store caused (unreachable, timed
out, our key refused) is counted apart, since it says nothing about the data
(``MirrorSummary.store_errors``). Keys are used exactly as listed (``s3_exact``). The
mirror (``opsdrill.files.mirror``) adds its index and reads a source object once for its
copy; the restore (``opsdrill.files.restore``) picks each key's version at a time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from minio import Minio
from minio.error import MinioException, S3Error
from urllib3.exceptions import HTTPError
from urllib3.response import BaseHTTPResponse

from opsdrill.config.inventory import Inventory, Store
from opsdrill.errors import ConfigError, OpsdrillError, TargetUnreachable
from opsdrill.files import s3_exact
from opsdrill.files.s3_exact import ShortRead
from opsdrill.redact import redact
from opsdrill.s3 import CREDENTIAL_CODES, PART_SIZE, iter_chunks, unreachable

SHA_META = "opsdrill-sha256"
INDEX_PREFIX = ".opsdrill-mirror/"  # the mirror's own index: never listed as data
META = "x-amz-meta-"
CHUNK = 1024 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NETWORK_ERRORS = (MinioException, HTTPError, OSError)
# What a store that cannot hold a key name answers (MinIO refuses "." and ".." segments).
_BAD_NAME = frozenset({"XMinioInvalidObjectName", "InvalidObjectName"})
T = TypeVar("T")


@dataclass
class MirrorSummary:
    name: str
    examined: int = 0
    copied: int = 0
    skipped: int = 0  # unchanged: the index says so
    same_content: int = 0  # new source ETag, identical bytes: not re-copied
    deleted: int = 0  # only in propagate mode
    bytes_copied: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # "key: reason", never a secret
    kind: str = "mirror"  # or "restore": the first word of line()
    # how many of ``errors`` a store caused (unreachable, timed out, our key refused),
    # and then which store and what to fix: the data was not judged
    store_errors: int = 0
    unreachable: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        """0 all copied; 1 an object failed for its own sake (it changed while copied, an
        overwrite refused, a copy that does not match its hash); else 2 when only stores
        failed objects (opsdrill could not do its job: see ``unreachable``)."""
        if len(self.errors) > self.store_errors:
            return 1
        return 2 if self.store_errors else 0

    def line(self) -> str:
        deleted = f", deleted {self.deleted}" if self.deleted else ""
        return (
            f"{self.kind} {self.name}: examined {self.examined}, copied {self.copied} "
            f"({self.bytes_copied / 2**20:.1f} MiB), skipped {self.skipped}, same content "
            f"{self.same_content}{deleted}, errors {len(self.errors)} in {self.seconds:.1f}s"
        )


@dataclass(frozen=True)
class Listed:
    """What a listing says about one object, or one version of it."""

    key: str
    etag: str
    size: int
    last_modified: datetime
    version_id: str | None = None
    delete_marker: bool = False
    latest: bool = True


@dataclass(frozen=True)
class Side:
    """One end of a copy: a store, its client, and its prefix normalised."""

    name: str
    store: Store
    s3: Minio
    bucket: str
    prefix: str

    def whole_run(self, call: Callable[[], T]) -> T:
        """A request the whole run depends on: its failure is the store's and stops the run."""
        try:
            return call()
        except NETWORK_ERRORS as exc:
            raise unreachable(self.name, self.store, exc) from None


class CopyFailed(Exception):
    """An object-level failure whose message is already fit for the summary."""


def normalise_prefix(prefix: str) -> str:
    """A store prefix names a folder: "files", "files/" and "/files/" all mean "files/"."""
    core = prefix.strip("/")
    return f"{core}/" if core else ""


def relative_keys(
    s3: Minio, bucket: str, prefix: str, *, versions: bool = False
) -> list[tuple[str, Listed]]:
    """Objects (or all versions and delete markers) under ``prefix``, keyed relative to it.

    Our own index is not data: it is never listed, so never mirrored or restored.
    """
    found = []
    for o in s3.list_objects(
        bucket, prefix=prefix or None, recursive=True, include_version=versions
    ):
        key = str(o.object_name)
        if not key[len(prefix) :].startswith(INDEX_PREFIX):
            found.append((key[len(prefix) :], Listed(
                key, o.etag or "", o.size or 0, o.last_modified or _EPOCH, o.version_id,
                o.is_delete_marker, o.is_latest in (None, "true"),
            )))  # fmt: skip
    return found


def object_sha256(
    client: Minio, bucket: str, key: str, version_id: str | None = None, *, etag: str | None = None
) -> str:
    """Hash an object as it streams by; with ``etag``, only that exact object (If-Match)."""
    digest = hashlib.sha256()
    for chunk in iter_chunks(s3_exact.get(client, bucket, key, version_id, etag), CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


class _HashingReader:
    """The upload pass's source: hashes exactly the bytes the upload consumes.

    minio asks for one whole part per read; answering in smaller pieces made it concatenate
    them one by one (a quadratic copy: 8.5 times each part's bytes at 1 MiB pieces, the
    mirror's largest CPU cost). A part is in memory either way.
    """

    def __init__(self, response: BaseHTTPResponse) -> None:
        self.response, self.digest = response, hashlib.sha256()

    def read(self, size: int = CHUNK) -> bytes:
        data = self.response.read(size if size > 0 else CHUNK)
        self.digest.update(data)
        return data


def stream_copy(
    src: Side, obj: Listed, dst: Side, key: str, metadata: Any, *, etag: str | None
) -> tuple[str, str | None]:
    """Stream one object across; returns (sha256 of what was sent, the new version id).

    One part upload at a time (parallelism is across objects): minio then holds about three
    parts (the last one sent, the one being read, a copy), however big the object.
    """
    response = s3_exact.get(src.s3, src.bucket, obj.key, obj.version_id, etag)
    reader = _HashingReader(response)
    try:
        version_id = s3_exact.put(
            dst.s3, dst.bucket, key, reader, obj.size,  # type: ignore[arg-type]
            response.headers.get("content-type") or "application/octet-stream", metadata,
            part_size(obj.size),
        )  # fmt: skip
    finally:
        response.close()
        response.release_conn()
    return reader.digest.hexdigest(), version_id


def part_size(size: int) -> int:
    return max(PART_SIZE, -(-size // 10_000))  # S3 allows 10,000 parts


def remove_bad_copy(dst: Side, key: str, version_id: str | None, why: str) -> None:
    """A copy whose bytes are not the ones hashed must not stay labelled with that hash."""
    try:
        s3_exact.remove(dst.s3, dst.bucket, key, version_id)
    except NETWORK_ERRORS as exc:
        raise CopyFailed(f"{why}; removing the bad copy failed too: {reason(exc)}") from None
    raise CopyFailed(f"{why}; the bad copy was removed, the next run retries")


def largest_first(jobs: Mapping[str, T], listed: Mapping[str, Listed]) -> dict[str, T]:
    """Big objects start first: started last (listing order), one kept a single worker busy
    for the last quarter of a run while the others idled."""
    return dict(sorted(jobs.items(), key=lambda job: -listed[job[0]].size))


def run_parallel(
    workers: int,
    jobs: Mapping[str, Callable[[], T]],
    done: Callable[[str, T], None],
    summary: MirrorSummary,
    prefix: str,
) -> None:
    """Run per-object jobs on a bounded pool; a failure is recorded under its key, not raised."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opsdrill-mirror") as pool:
        try:  # from the first submit: an interrupt there too must cancel what was queued
            futures = {pool.submit(job): rel for rel, job in jobs.items()}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as exc:  # one object's failure must not stop the others
                    record(summary, f"{prefix}{futures[future]}", exc)
                else:
                    done(futures[future], result)
        except BaseException:  # Ctrl-C, SIGTERM: finish the copies under way, start no more
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def record(summary: MirrorSummary, key: str, exc: BaseException, note: str = "") -> None:
    summary.errors.append(f"{key}: {reason(exc)}{note}")
    if _store_level(exc):
        summary.store_errors += 1


def _store_level(exc: BaseException) -> bool:
    """Whether a store, not the object, failed the request: the transport (refused, reset,
    timed out), a reply that is not S3, our key refused, the bucket gone."""
    if isinstance(exc, S3Error):
        return exc.code in CREDENTIAL_CODES or exc.code == "NoSuchBucket"
    return isinstance(exc, NETWORK_ERRORS)


def worker_count(workers: int | None, configured: int) -> int:
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    return configured if workers is None else workers


def open_side(inv: Inventory, name: str) -> Side:
    store = inv.store(name)
    return Side(
        name, store, s3_exact.exact_client(inv, store), store.bucket, normalise_prefix(store.prefix)
    )


def finish(summary: MirrorSummary, started: float, *sides: Side) -> MirrorSummary:
    summary.errors.sort()
    if summary.store_errors:
        summary.unreachable = _which_store(summary.store_errors, sides)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _which_store(count: int, sides: tuple[Side, ...]) -> str:
    """Name the store that failed objects mid-run, and what to fix: ask each once."""
    for side in sides:
        try:
            side.whole_run(partial(side.s3.bucket_exists, side.bucket))
        except TargetUnreachable as exc:
            return f"{count} object(s) not copied: {exc.message}"
    names = " and ".join(f"store {side.name}" for side in sides)
    return (
        f"{count} object(s) not copied: {names} dropped connections, timed out or refused "
        "opsdrill's key for them (see the errors above), and answer again now (fix: the "
        "network or the key's permissions, then run it again)"
    )


def reason(exc: BaseException) -> str:
    if isinstance(exc, CopyFailed | ShortRead | OpsdrillError):
        text = str(exc)
    elif isinstance(exc, S3Error) and exc.code == "PreconditionFailed":
        text = "changed since it was listed; the next run copies it"
    elif isinstance(exc, S3Error) and exc.code in _BAD_NAME:
        text = (
            f"S3 error {exc.code}: {exc.message} (the store cannot hold this key name; the "
            "other objects are copied; fix: rename it at the source, or use a store that "
            "accepts it)"
        )
    elif isinstance(exc, S3Error):
        text = f"S3 error {exc.code}: {exc.message}"
    else:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return redact(text)
