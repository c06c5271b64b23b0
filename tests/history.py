"""Build weeks of backup history fast: server-side copies of one real backup under past
timestamps, each with its own manifest, shaped the way prune would leave them."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from datetime import datetime, timedelta

from minio.commonconfig import CopySource

from opsdrill import catalog
from tests.conftest import Env


def plant_history(
    env: Env,
    now: datetime,
    *,
    days: int,
    hourly_days: int = 7,
    skip_hours: Iterable[datetime] = (),
    extra: Iterable[datetime] = (),
) -> int:
    """Hourly copies for ``hourly_days``, then one a day back to ``days``; returns count."""
    inv = env.inv
    s3, store = env.s3()
    source = catalog.latest_complete(env.refs())
    assert source is not None and source.manifest_key and source.data_key
    resp = s3.get_object(store.bucket, source.manifest_key)
    template = json.loads(resp.read())
    resp.close()
    resp.release_conn()
    skipped = {h.replace(minute=0, second=0, microsecond=0) for h in skip_hours}
    times = [now - timedelta(hours=h) for h in range(1, hourly_days * 24)]
    times += [now - timedelta(days=d) for d in range(hourly_days, days + 1)]
    times += list(extra)
    planted = 0
    db = inv.database("crm")
    for t in times:
        t = t.replace(microsecond=0)
        if t.replace(minute=0, second=0) in skipped:
            continue
        key = catalog.data_key(store, "crm", t, db.compression, db.encrypt)
        s3.copy_object(store.bucket, key, CopySource(store.bucket, source.data_key))
        manifest = dict(
            template,
            id=catalog.backup_id("crm", t),
            taken_at=t.isoformat(),
            finished_at=t.isoformat(),
        )
        manifest["object"] = dict(template["object"], key=key)
        body = json.dumps(manifest).encode()
        s3.put_object(
            store.bucket, catalog.manifest_key(store, "crm", t), io.BytesIO(body), len(body)
        )
        planted += 1
    return planted
