"""Build weeks of backup history fast: server-side copies of one real backup under past
timestamps, each with its own manifest, shaped the way prune would leave them."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from minio.commonconfig import CopySource

from opsdrill.backups import catalog
from tests.conftest import Env

# What a planted manifest holds: the correct manifest (a dict) -> the bytes to store.
ManifestBody = Callable[[dict[str, Any]], bytes]


def good_manifest(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest).encode()


def corrupt_manifest(manifest: dict[str, Any]) -> bytes:
    """Cut off mid-way, as a crashed writer or a broken disk would leave it."""
    body = good_manifest(manifest)
    return body[: len(body) // 2]


def empty_manifest(manifest: dict[str, Any]) -> bytes:
    return b""


def size_mismatch_manifest(manifest: dict[str, Any]) -> bytes:
    """Valid JSON, but it vouches for an object of another size than the one stored."""
    obj = dict(manifest["object"], size=manifest["object"]["size"] + 1)
    return good_manifest(dict(manifest, object=obj))


def plant_at(env: Env, times: Iterable[datetime], body: ManifestBody = good_manifest) -> list[str]:
    """A backup of "crm" at each of ``times`` (copies of the newest good one, which the test
    made first), with the manifest ``body`` makes of the right one; returns the ids."""
    inv = env.inv
    s3, store = env.s3()
    source, template = _newest_good(env)
    assert source.data_key is not None
    db = inv.database("crm")
    ids = []
    for t in times:
        t = t.replace(microsecond=0)
        key = catalog.data_key(store, "crm", t, db.compression, db.encrypt)
        s3.copy_object(store.bucket, key, CopySource(store.bucket, source.data_key))
        manifest = dict(
            template,
            id=catalog.backup_id("crm", t),
            taken_at=t.isoformat(),
            finished_at=t.isoformat(),
        )
        manifest["object"] = dict(template["object"], key=key)
        raw = body(manifest)
        s3.put_object(
            store.bucket, catalog.manifest_key(store, "crm", t), io.BytesIO(raw), len(raw)
        )
        ids.append(manifest["id"])
    return ids


def _newest_good(env: Env) -> tuple[catalog.BackupRef, dict[str, Any]]:
    """The newest backup whose manifest is right: the source of every planted copy."""
    s3, store = env.s3()
    for ref in reversed(env.refs()):
        if ref.manifest_key is None or ref.data_key is None:
            continue
        resp = s3.get_object(store.bucket, ref.manifest_key)
        try:
            manifest = json.loads(resp.read())
        except ValueError:
            continue
        finally:
            resp.close()
            resp.release_conn()
        if manifest["object"]["key"] == ref.data_key and manifest["object"]["size"] == ref.size:
            return ref, manifest
    raise AssertionError("no good backup to copy: take a real one first")


def plant_history(
    env: Env,
    now: datetime,
    *,
    days: int,
    hourly_days: int = 7,
    skip_hours: Iterable[datetime] = (),
    extra: Iterable[datetime] = (),
) -> int:
    """Hourly copies for ``hourly_days``, then one a day back to ``days``, none in
    ``skip_hours``; plus one at each of ``extra`` (skipped hours or not); returns count."""
    skipped = {h.replace(minute=0, second=0, microsecond=0) for h in skip_hours}
    times = [now - timedelta(hours=h) for h in range(1, hourly_days * 24)]
    times += [now - timedelta(days=d) for d in range(hourly_days, days + 1)]
    times = [t for t in times if t.replace(minute=0, second=0, microsecond=0) not in skipped]
    return len(plant_at(env, [*times, *extra]))
