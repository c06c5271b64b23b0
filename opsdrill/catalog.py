"""Where backups live in the bucket, and reading them back.

Layout: ``PREFIX/DB/YYYY/MM/DD/DB-YYYYMMDDTHHMMSSZ.dump[.zst|.gz][.gpg]`` plus
``...Z.manifest.json`` beside it. The timestamp is when the backup started (UTC), so
listing sorts chronologically and retention can judge from keys alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from minio import Minio

from opsdrill.inventory import Store
from opsdrill.manifest import Manifest

TS_FORMAT = "%Y%m%dT%H%M%SZ"
_KEY = re.compile(
    r"(?P<id>(?P<db>[^/]+)-(?P<ts>\d{8}T\d{6}Z))"
    r"(?P<suffix>\.manifest\.json|\.dump(?:\.zst|\.gz)?(?:\.gpg)?)$"
)
MANIFEST_SUFFIX = ".manifest.json"


@dataclass
class BackupRef:
    id: str
    database: str
    taken_at: datetime
    data_key: str | None = None
    manifest_key: str | None = None
    size: int = 0
    last_modified: datetime | None = None

    @property
    def complete(self) -> bool:
        return self.data_key is not None and self.manifest_key is not None


def db_prefix(store: Store, database: str) -> str:
    base = store.prefix.strip("/")
    return f"{base}/{database}/" if base else f"{database}/"


def backup_id(database: str, taken_at: datetime) -> str:
    return f"{database}-{taken_at.astimezone(UTC).strftime(TS_FORMAT)}"


def data_key(
    store: Store, database: str, taken_at: datetime, compression: str, encrypted: bool
) -> str:
    ext = ".dump" + {"zstd": ".zst", "gzip": ".gz", "none": ""}[compression]
    ext += ".gpg" if encrypted else ""
    return _dated(store, database, taken_at) + ext


def manifest_key(store: Store, database: str, taken_at: datetime) -> str:
    return _dated(store, database, taken_at) + MANIFEST_SUFFIX


def _dated(store: Store, database: str, taken_at: datetime) -> str:
    t = taken_at.astimezone(UTC)
    return f"{db_prefix(store, database)}{t:%Y/%m/%d}/{backup_id(database, t)}"


def parse_objects(database: str, objects: Iterable[Any]) -> list[BackupRef]:
    refs: dict[str, BackupRef] = {}
    for obj in objects:
        name = obj.object_name
        m = _KEY.search(name.rsplit("/", 1)[-1])
        if not m or m["db"] != database:
            continue
        taken = datetime.strptime(m["ts"], TS_FORMAT).replace(tzinfo=UTC)
        ref = refs.setdefault(m["id"], BackupRef(m["id"], database, taken))
        if m["suffix"] == MANIFEST_SUFFIX:
            ref.manifest_key = name
        else:
            ref.data_key = name
            ref.size = int(obj.size or 0)
            ref.last_modified = obj.last_modified
    return sorted(refs.values(), key=lambda r: r.taken_at)


def list_backups(client: Minio, store: Store, database: str) -> list[BackupRef]:
    objects = client.list_objects(store.bucket, prefix=db_prefix(store, database), recursive=True)
    return parse_objects(database, objects)


def read_manifest(client: Minio, store: Store, ref: BackupRef) -> Manifest:
    assert ref.manifest_key is not None
    response = client.get_object(store.bucket, ref.manifest_key)
    try:
        raw = response.read(16 * 1024 * 1024 + 1)
    finally:
        response.close()
        response.release_conn()
    if len(raw) > 16 * 1024 * 1024:
        raise ValueError(f"manifest {ref.manifest_key} is larger than 16 MiB")
    return Manifest.from_json(raw)


def latest_complete(refs: list[BackupRef]) -> BackupRef | None:
    done = [r for r in refs if r.complete]
    return done[-1] if done else None
