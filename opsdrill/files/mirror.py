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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from minio.error import S3Error
from urllib3.response import BaseHTTPResponse

from opsdrill import workspace
from opsdrill.config.inventory import Inventory
from opsdrill.errors import OperationFailed
from opsdrill.files import s3_exact, spool
from opsdrill.files.copying import (
    INDEX_PREFIX,
    META,
    NETWORK_ERRORS,
    SHA_META,
    CopyFailed,
    Listed,
    MirrorSummary,
    Side,
    finish,
    largest_first,
    normalise_prefix,
    object_sha256,
    open_side,
    part_size,
    record,
    relative_keys,
    remove_bad_copy,
    run_parallel,
    stream_copy,
    worker_count,
)
from opsdrill.s3 import PART_SIZE, iter_chunks

INDEX_FORMAT = 1
Entry = dict[str, Any]  # index entry: {"etag", "size", "sha256"} of the source as copied


def target_key(inv: Inventory, name: str, rel: str) -> str:
    return normalise_prefix(inv.store(inv.mirror(name).target).prefix) + rel


def index_key(inv: Inventory, name: str) -> str:
    return target_key(inv, name, f"{INDEX_PREFIX}index-{name}.json")


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
    pool_size = worker_count(workers, mirror.workers)
    src, dst = open_side(inv, mirror.source), open_side(inv, mirror.target)
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
        run_parallel(pool_size, largest_first(todo, source), done, summary, src.prefix)
    if mirror.delete_mode == "propagate":  # the deliberately wrong mode; see Mirror
        for rel in sorted(target.keys() - source.keys()):
            try:
                s3_exact.remove(dst.s3, dst.bucket, dst.prefix + rel)
                summary.deleted += 1
            except NETWORK_ERRORS as exc:
                record(summary, f"{dst.prefix}{rel}", exc)
    if fresh != index:
        body = json.dumps({"format": INDEX_FORMAT, "objects": fresh}, sort_keys=True).encode()
        try:
            dst.s3.put_object(dst.bucket, index_name, io.BytesIO(body), len(body))
        except NETWORK_ERRORS as exc:
            record(summary, index_name, exc, " (the next run re-hashes)")
    return finish(summary, started, src, dst)


@dataclass(frozen=True)
class _Read:
    """An object as read for its copy: in memory (one part at most), spooled (more), or, with
    no room to spool, only hashed (it is read again to be sent)."""

    sha256: str
    content_type: str | None
    body: bytes | None = None
    spooled: spool.Spooled | None = None


def _read_source(src: Side, obj: Listed, done: contextlib.ExitStack) -> _Read:
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
        raise CopyFailed(f"read {read} bytes, the listing said {obj.size}")


def _mirror_one(
    src: Side, dst: Side, rel: str, obj: Listed, versioned: bool, listed_off_site: bool
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
                recorded = s3_exact.metadata(dst.s3, dst.bucket, key).get(META + SHA_META, "")
            except S3Error as exc:
                if exc.code != "NoSuchKey":
                    raise
        if recorded == sha:
            return False, entry
        if recorded is not None and not versioned:
            raise CopyFailed(
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
                    part_size(obj.size),
                )  # fmt: skip
        else:
            sent, version_id = stream_copy(src, obj, dst, key, metadata, etag=obj.etag)
            if sent != sha:
                remove_bad_copy(dst, key, version_id, "changed while being copied")
        return True, entry


def _load_index(side: Side, key: str) -> dict[str, Entry]:
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
