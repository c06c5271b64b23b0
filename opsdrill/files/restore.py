"""``opsdrill mirror-restore``: the off-site copy as it was at a time, into an empty place.

Each key gets its newest version at that time; a key whose newest entry then is a delete
marker did not exist and is not restored. Every copy is checked against the sha256 the
mirror recorded (``SHA_META``) on the way, and a copy that does not match is removed.
"""

from __future__ import annotations

import time
from datetime import datetime
from functools import partial

from opsdrill.config.inventory import Inventory
from opsdrill.errors import ConfigError, RefusedError
from opsdrill.files import s3_exact
from opsdrill.files.copying import (
    META,
    SHA_META,
    Listed,
    MirrorSummary,
    Side,
    finish,
    largest_first,
    object_sha256,
    open_side,
    relative_keys,
    remove_bad_copy,
    run_parallel,
    stream_copy,
    worker_count,
)


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
    summary, pool_size = MirrorSummary(name, kind="restore"), worker_count(workers, mirror.workers)
    if as_of is not None and as_of.tzinfo is None:
        raise ConfigError("as_of needs a timezone, e.g. 2024-05-01T12:00:00+00:00")
    src, dst = open_side(inv, mirror.target), open_side(inv, to_store)
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
    run_parallel(pool_size, largest_first(jobs, wanted), done, summary, src.prefix)
    return finish(summary, started, src, dst)


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


def _restore_one(src: Side, dst: Side, rel: str, version: Listed) -> int:
    headers = s3_exact.metadata(src.s3, src.bucket, version.key, version.version_id).items()
    metadata = {k.lower()[len(META) :]: v for k, v in headers if k.lower().startswith(META)}
    # What the mirror wrote carries its hash; anything else is hashed first.
    sha = metadata.get(SHA_META) or object_sha256(
        src.s3, src.bucket, version.key, version.version_id
    )
    metadata[SHA_META] = sha
    key = dst.prefix + rel
    sent, version_id = stream_copy(src, version, dst, key, metadata, etag=None)
    if sent != sha:
        remove_bad_copy(dst, key, version_id, "does not match its recorded sha256 off-site")
    return version.size


def _prepare_destination(side: Side) -> None:
    if not side.s3.bucket_exists(side.bucket):
        side.s3.make_bucket(side.bucket)
    for obj in side.s3.list_objects(side.bucket, prefix=side.prefix or None, recursive=True):
        raise RefusedError(
            f"store {side.name}: {side.bucket}/{side.prefix} already holds objects "
            f"(e.g. {obj.object_name}) (fix: restore into an empty bucket or prefix)"
        )
