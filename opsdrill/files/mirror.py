"""``opsdrill mirror``: copy new and changed objects from the live bucket to the off-site one.

Why it is shaped this way:
- by content: multipart ETags are not MD5s, so each copy carries the sha256 of its bytes in
  user metadata (SHA_META), and an index of the source as last copied makes a run with no
  changes cost three listings and one small GET;
- streamed: memory is a few parts per worker whatever the object size. An object above
  PART_SIZE is read once into a private spool while hashed (opsdrill.files.spool), since its
  sha256 goes with the upload's first request; without room to spool it is read twice
  (hash, then upload while re-hashing);
- never destructive: in the versioned target bucket an overwrite keeps the previous copy (an
  unversioned one gets new keys only; changed ones are refused, loudly), and nothing is
  deleted unless ``delete_mode = "propagate"`` (a test-only wrong mode);
- one bad object never stops the others: its error is collected and the run goes on;
  an object that failed because a store could not be reached or refused opsdrill's key
  (``store_errors``) says nothing about the data, so such a run exits 2, not 1;
- every key exactly as listed, "." and ".." path segments included (``exact_client``): a
  store that cannot hold such a name fails that object alone, naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
import uuid
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

from opsdrill import workspace
from opsdrill.config.inventory import Inventory, Store
from opsdrill.errors import (
    ConfigError,
    OperationFailed,
    OpsdrillError,
    RefusedError,
    TargetUnreachable,
)
from opsdrill.files import s3_exact, spool
from opsdrill.files.s3_exact import ShortRead
from opsdrill.redact import redact
from opsdrill.s3 import CREDENTIAL_CODES, PART_SIZE, iter_chunks, unreachable

SHA_META = "opsdrill-sha256"
INDEX_PREFIX = ".opsdrill-mirror/"
INDEX_FORMAT = 1
_META = "x-amz-meta-"
_CHUNK = 1024 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NETWORK = (MinioException, HTTPError, OSError)
# What a store that cannot hold a key name answers (MinIO refuses "." and ".." segments).
_BAD_NAME = frozenset({"XMinioInvalidObjectName", "InvalidObjectName"})
T = TypeVar("T")
Entry = dict[str, Any]  # index entry: {"etag", "size", "sha256"} of the source as copied


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
class _Side:
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
        except _NETWORK as exc:
            raise unreachable(self.name, self.store, exc) from None


class _Failure(Exception):
    """An object-level failure whose message is already fit for the summary."""


def normalise_prefix(prefix: str) -> str:
    """A store prefix names a folder: "files", "files/" and "/files/" all mean "files/"."""
    core = prefix.strip("/")
    return f"{core}/" if core else ""


def target_key(inv: Inventory, name: str, rel: str) -> str:
    return normalise_prefix(inv.store(inv.mirror(name).target).prefix) + rel


def index_key(inv: Inventory, name: str) -> str:
    return target_key(inv, name, f"{INDEX_PREFIX}index-{name}.json")


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
    for chunk in iter_chunks(s3_exact.get(client, bucket, key, version_id, etag), _CHUNK):
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

    def read(self, size: int = _CHUNK) -> bytes:
        data = self.response.read(size if size > 0 else _CHUNK)
        self.digest.update(data)
        return data


def _read_all(response: BaseHTTPResponse) -> bytes:
    """A small object's body in one read: one buffer, no pieces to join."""
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def run_mirror(inv: Inventory, name: str, *, workers: int | None = None) -> MirrorSummary:
    """Copy what is new or changed; a listing failure raises, an object failure is recorded."""
    mirror, started, summary = inv.mirror(name), time.monotonic(), MirrorSummary(name)
    pool_size = _pool_size(workers, mirror.workers)
    src, dst = _side(inv, mirror.source), _side(inv, mirror.target)
    index_name = index_key(inv, name)
    # The requests the whole run depends on, all at once: the two listings come from two
    # stores and are most of a no-change run. Their failures are raised in this order.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="opsdrill-list") as pool:
        # Unversioned, an overwrite would destroy the only off-site copy: such keys are refused.
        status = pool.submit(dst.whole_run, lambda: dst.s3.get_bucket_versioning(dst.bucket).status)
        source_listing = pool.submit(
            src.whole_run, lambda: relative_keys(src.s3, src.bucket, src.prefix)
        )
        target_listing = pool.submit(
            dst.whole_run, lambda: relative_keys(dst.s3, dst.bucket, dst.prefix)
        )
        loaded = pool.submit(dst.whole_run, lambda: _load_index(dst, index_name))
        versioned, source = status.result(), dict(source_listing.result())
        target, index = dict(target_listing.result()), loaded.result()

    fresh = {rel: index[rel] for rel in source if rel in index}  # a failed copy keeps its entry
    todo: dict[str, Callable[[], tuple[bool, Entry]]] = {}
    for rel, obj in source.items():
        summary.examined += 1
        known, there = index.get(rel), target.get(rel)
        unchanged = known is not None and (known["etag"], known["size"]) == (obj.etag, obj.size)
        if unchanged and there is not None and there.size == obj.size:
            summary.skipped += 1
        else:
            todo[rel] = partial(
                _mirror_one, src, dst, rel, obj, versioned == "Enabled", there is not None
            )

    def done(rel: str, result: tuple[bool, Entry]) -> None:
        copied, fresh[rel] = result
        summary.copied += copied
        summary.same_content += not copied
        summary.bytes_copied += fresh[rel]["size"] if copied else 0

    with workspace.run("mirror") as ws:  # where objects over one part are spooled (spool.py)
        if any(source[rel].size > PART_SIZE for rel in todo):
            ws.path  # noqa: B018 - its directory made once, before the workers share it
        _parallel(pool_size, _largest_first(todo, source), done, summary, src.prefix)
    if mirror.delete_mode == "propagate":  # the deliberately wrong mode; see Mirror
        for rel in sorted(target.keys() - source.keys()):
            try:
                s3_exact.remove(dst.s3, dst.bucket, dst.prefix + rel)
                summary.deleted += 1
            except _NETWORK as exc:
                _record(summary, f"{dst.prefix}{rel}", exc)
    if fresh != index:
        body = json.dumps({"format": INDEX_FORMAT, "objects": fresh}, sort_keys=True).encode()
        try:
            dst.s3.put_object(dst.bucket, index_name, io.BytesIO(body), len(body))
        except _NETWORK as exc:
            _record(summary, index_name, exc, " (the next run re-hashes)")
    return _finish(summary, started, src, dst)


@dataclass(frozen=True)
class _Read:
    """An object as read for its copy: in memory (one part at most), spooled (more), or, with
    no room to spool, only hashed (it is read again to be sent)."""

    sha256: str
    content_type: str | None
    body: bytes | None = None
    spooled: spool.Spooled | None = None


def _read_source(src: _Side, obj: Listed, done: contextlib.ExitStack) -> _Read:
    """One read of ``obj``, pinned to its listed ETag; a spool lives as long as ``done``."""
    if obj.size <= PART_SIZE:
        response = s3_exact.get(src.s3, src.bucket, obj.key, None, obj.etag)
        content_type = response.headers.get("content-type")
        body = _read_all(response)
        _check_size(len(body), obj)
        return _Read(hashlib.sha256(body).hexdigest(), content_type, body=body)
    if spool.room_for(obj.size):
        response = s3_exact.get(src.s3, src.bucket, obj.key, None, obj.etag)
        spooled = done.enter_context(spool.spool(response, f"object-{uuid.uuid4().hex}"))
        if spooled is not None:
            _check_size(spooled.size, obj)
            return _Read(spooled.sha256, spooled.content_type, spooled=spooled)
    return _Read(object_sha256(src.s3, src.bucket, obj.key, etag=obj.etag), None)


def _check_size(read: int, obj: Listed) -> None:
    if read != obj.size:
        raise _Failure(f"read {read} bytes, the listing said {obj.size}")


def _mirror_one(
    src: _Side, dst: _Side, rel: str, obj: Listed, versioned: bool, listed_off_site: bool
) -> tuple[bool, Entry]:
    """Copy one new or changed object unless the target already holds its bytes.

    Reads are pinned to the listed ETag (If-Match), so the hash, the bytes sent and the
    index entry all describe the object that was listed. Returns (copied, index entry).
    """
    key = dst.prefix + rel
    with contextlib.ExitStack() as done:
        read = _read_source(src, obj, done)
        sha = read.sha256
        entry = {"etag": obj.etag, "size": obj.size, "sha256": sha}
        recorded: str | None = None
        # A key the target listing lacks needs no HEAD; in an unversioned bucket we look
        # anyway, since a write there after the listing would otherwise be overwritten
        # without history.
        if listed_off_site or not versioned:
            try:
                recorded = s3_exact.metadata(dst.s3, dst.bucket, key).get(_META + SHA_META, "")
            except S3Error as exc:
                if exc.code != "NoSuchKey":
                    raise
        if recorded == sha:
            return False, entry
        if recorded is not None and not versioned:
            raise _Failure(
                "not overwritten: the target bucket is not versioned, so this would destroy "
                "the previous off-site copy (fix: enable versioning on it)"
            )
        metadata: Any = {SHA_META: sha, "opsdrill-source-etag": obj.etag}
        metadata["opsdrill-source-last-modified"] = obj.last_modified.isoformat()
        ctype = read.content_type or "application/octet-stream"
        if read.body is not None:
            s3_exact.put(
                dst.s3, dst.bucket, key, io.BytesIO(read.body), obj.size, ctype, metadata,
                PART_SIZE, sha256=sha,
            )  # fmt: skip
        elif read.spooled is not None:  # the bytes hashed are the bytes sent: nothing to compare
            with read.spooled.path.open("rb") as source:
                s3_exact.put(
                    dst.s3, dst.bucket, key, source, obj.size, ctype, metadata,
                    _part_size(obj.size),
                )  # fmt: skip
        else:
            sent, version_id = _stream_copy(src, obj, dst, key, metadata, etag=obj.etag)
            if sent != sha:
                _remove_bad_copy(dst, key, version_id, "changed while being copied")
        return True, entry


def restore_mirror(
    inv: Inventory,
    name: str,
    *,
    to_store: str,
    as_of: datetime | None = None,
    workers: int | None = None,
) -> MirrorSummary:
    """Copy the off-site copy as it was at ``as_of`` (default: now) into an empty place.

    Each key gets its newest version with last_modified <= as_of; a key whose newest entry
    then is a delete marker did not exist at that time and is not restored. Every copy is
    checked against its recorded sha256 on the way.
    """
    mirror, started = inv.mirror(name), time.monotonic()
    summary, pool_size = MirrorSummary(name, kind="restore"), _pool_size(workers, mirror.workers)
    if as_of is not None and as_of.tzinfo is None:
        raise ConfigError("as_of needs a timezone, e.g. 2024-05-01T12:00:00+00:00")
    src, dst = _side(inv, mirror.target), _side(inv, to_store)
    if (dst.store.endpoint, dst.bucket) == (src.store.endpoint, src.bucket) and (
        dst.prefix.startswith(src.prefix) or src.prefix.startswith(dst.prefix)
    ):
        raise RefusedError(
            f"store {to_store} overlaps the off-site copy in store {mirror.target} "
            "(fix: restore into another bucket, or a prefix outside the mirror's)"
        )
    listing = src.whole_run(lambda: relative_keys(src.s3, src.bucket, src.prefix, versions=True))
    skip = (mirror.canary_prefix,) if mirror.canary_prefix else ()  # "" would skip everything
    chosen = _as_of([(rel, v) for rel, v in listing if not rel.startswith(skip)], as_of)
    wanted = {rel: v for rel, v in chosen.items() if not v.delete_marker}
    dst.whole_run(lambda: _prepare_destination(dst))
    summary.examined = len(wanted)

    def done(rel: str, size: int) -> None:
        summary.copied += 1
        summary.bytes_copied += size

    jobs = {rel: partial(_restore_one, src, dst, rel, v) for rel, v in wanted.items()}
    _parallel(pool_size, _largest_first(jobs, wanted), done, summary, src.prefix)
    return _finish(summary, started, src, dst)


def _as_of(listing: list[tuple[str, Listed]], when: datetime | None) -> dict[str, Listed]:
    """Each key's newest entry at ``when``; "now" is what the server marks latest.

    Stamps have one-second resolution and the minio SDK lists delete markers after versions,
    so on equal stamps the latest entry wins, then the first listed (the newer version).
    """
    chosen: dict[str, Listed] = {}
    for rel, entry in listing:
        best = chosen.get(rel)
        if when is None:
            if entry.latest:
                chosen[rel] = entry
        elif entry.last_modified <= when and (
            best is None or (entry.last_modified, entry.latest) > (best.last_modified, best.latest)
        ):
            chosen[rel] = entry
    return chosen


def _restore_one(src: _Side, dst: _Side, rel: str, version: Listed) -> int:
    headers = s3_exact.metadata(src.s3, src.bucket, version.key, version.version_id).items()
    metadata = {k.lower()[len(_META) :]: v for k, v in headers if k.lower().startswith(_META)}
    # What the mirror wrote carries its hash; anything else is hashed first.
    sha = metadata.get(SHA_META) or object_sha256(
        src.s3, src.bucket, version.key, version.version_id
    )
    metadata[SHA_META] = sha
    key = dst.prefix + rel
    sent, version_id = _stream_copy(src, version, dst, key, metadata, etag=None)
    if sent != sha:
        _remove_bad_copy(dst, key, version_id, "does not match its recorded sha256 off-site")
    return version.size


def _stream_copy(
    src: _Side, obj: Listed, dst: _Side, key: str, metadata: Any, *, etag: str | None
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
            _part_size(obj.size),
        )  # fmt: skip
    finally:
        response.close()
        response.release_conn()
    return reader.digest.hexdigest(), version_id


def _part_size(size: int) -> int:
    return max(PART_SIZE, -(-size // 10_000))  # S3 allows 10,000 parts


def _remove_bad_copy(dst: _Side, key: str, version_id: str | None, why: str) -> None:
    """A copy whose bytes are not the ones hashed must not stay labelled with that hash."""
    try:
        s3_exact.remove(dst.s3, dst.bucket, key, version_id)
    except _NETWORK as exc:
        raise _Failure(f"{why}; removing the bad copy failed too: {_reason(exc)}") from None
    raise _Failure(f"{why}; the bad copy was removed, the next run retries")


def _largest_first(jobs: Mapping[str, T], listed: Mapping[str, Listed]) -> dict[str, T]:
    """Big objects start first: started last (listing order), one kept a single worker busy
    for the last quarter of a run while the others idled."""
    return dict(sorted(jobs.items(), key=lambda job: -listed[job[0]].size))


def _parallel(
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
                    _record(summary, f"{prefix}{futures[future]}", exc)
                else:
                    done(futures[future], result)
        except BaseException:  # Ctrl-C, SIGTERM: finish the copies under way, start no more
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _record(summary: MirrorSummary, key: str, exc: BaseException, note: str = "") -> None:
    summary.errors.append(f"{key}: {_reason(exc)}{note}")
    if _store_level(exc):
        summary.store_errors += 1


def _store_level(exc: BaseException) -> bool:
    """Whether a store, not the object, failed the request: the transport (refused, reset,
    timed out), a reply that is not S3, our key refused, the bucket gone."""
    if isinstance(exc, S3Error):
        return exc.code in CREDENTIAL_CODES or exc.code == "NoSuchBucket"
    return isinstance(exc, _NETWORK)


def _pool_size(workers: int | None, configured: int) -> int:
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    return configured if workers is None else workers


def _side(inv: Inventory, name: str) -> _Side:
    store = inv.store(name)
    return _Side(
        name, store, s3_exact.exact_client(inv, store), store.bucket, normalise_prefix(store.prefix)
    )


def _finish(summary: MirrorSummary, started: float, *sides: _Side) -> MirrorSummary:
    summary.errors.sort()
    if summary.store_errors:
        summary.unreachable = _which_store(summary.store_errors, sides)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _which_store(count: int, sides: tuple[_Side, ...]) -> str:
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


def _prepare_destination(side: _Side) -> None:
    if not side.s3.bucket_exists(side.bucket):
        side.s3.make_bucket(side.bucket)
    for obj in side.s3.list_objects(side.bucket, prefix=side.prefix or None, recursive=True):
        raise RefusedError(
            f"store {side.name}: {side.bucket}/{side.prefix} already holds objects "
            f"(e.g. {obj.object_name}) (fix: restore into an empty bucket or prefix)"
        )


def _load_index(side: _Side, key: str) -> dict[str, Entry]:
    """The source as last copied; without an index every object is hashed once more."""
    try:
        raw = b"".join(iter_chunks(side.s3.get_object(side.bucket, key)))
    except S3Error as exc:
        if exc.code == "NoSuchKey":
            return {}
        raise
    try:
        data = json.loads(raw)
        objects: dict[str, Entry] = data["objects"]
        if data["format"] == INDEX_FORMAT and all(
            e.keys() >= {"etag", "size", "sha256"} for e in objects.values()
        ):
            return objects
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    raise OperationFailed(
        "mirror index",
        f"{side.bucket}/{key} is not an opsdrill mirror index "
        "(fix: remove it; the next run hashes every object again)",
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _Failure | ShortRead | OpsdrillError):
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
