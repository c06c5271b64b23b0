"""Where backups live in the bucket, and reading them back.

Layout: ``PREFIX/DB/YYYY/MM/DD/DB-YYYYMMDDTHHMMSSZ-NONCE.dump[.zst|.gz][.gpg]`` plus
``...-NONCE.manifest.json`` beside it. The timestamp is when the backup started (UTC), so
listing sorts chronologically and retention can judge from keys alone; the nonce (6 random
hex digits) keeps two runs that start in the same second apart, so no run ever takes
another's keys. Ids without a nonce (``DB-YYYYMMDDTHHMMSSZ``, written before it existed)
are read the same way.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from opsdrill.backups.manifest import Manifest, ManifestInvalid
from opsdrill.config.inventory import Store
from opsdrill.errors import OperationFailed

if TYPE_CHECKING:  # the client is passed in: checks that only read refs load no S3 SDK
    from minio import Minio

TS_FORMAT = "%Y%m%dT%H%M%SZ"
NONCE_BYTES = 3  # 6 hex digits: two runs in one second collide once in 16.7 million
# An id, as the start of a key's last segment: ``NAME-TIMESTAMP`` and, since issue 11,
# ``-NONCE``. Shared with the secrets bundles (opsdrill.secrets.bundle), laid out the same.
ID_PATTERN = (
    r"(?P<id>(?P<name>[^/]+)-(?P<ts>\d{8}T\d{6}Z)"
    rf"(?:-(?P<nonce>[0-9a-f]{{{2 * NONCE_BYTES}}}))?)"
)
_KEY = re.compile(ID_PATTERN + r"(?P<suffix>\.manifest\.json|\.dump(?:\.zst|\.gz)?(?:\.gpg)?)$")
MANIFEST_SUFFIX = ".manifest.json"
MAX_MANIFEST = 16 * 1024 * 1024
# Parallel manifest GETs when judging every stored backup (prune, the retention audit): a
# full policy holds ~200 backups (7*24 hourly + 30 daily), a few kB of manifest each, so
# the time is round trips; 8 keep it to about a second without crowding the store.
MANIFEST_READERS = 8


@dataclass
class BackupRef:
    id: str
    database: str
    taken_at: datetime
    data_key: str | None = None
    manifest_key: str | None = None
    size: int = 0
    last_modified: datetime | None = None
    # Why a complete backup is not a good one (set by ``verify_manifests``); None: not
    # found wrong, or not looked at.
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.data_key is not None and self.manifest_key is not None

    @property
    def good(self) -> bool:
        return self.complete and self.problem is None


def db_prefix(store: Store, database: str) -> str:
    base = store.prefix.strip("/")
    return f"{base}/{database}/" if base else f"{database}/"


def new_nonce() -> str:
    """A fresh nonce for a new backup's id (``backup_id``)."""
    return secrets.token_hex(NONCE_BYTES)


def backup_id(database: str, taken_at: datetime, nonce: str | None = None) -> str:
    """``DB-YYYYMMDDTHHMMSSZ-NONCE``; without a nonce, the old form (how backups written
    before issue 11 are named, and what tests plant to stand for them)."""
    ts = f"{database}-{taken_at.astimezone(UTC).strftime(TS_FORMAT)}"
    return f"{ts}-{nonce}" if nonce else ts


def data_key(
    store: Store,
    database: str,
    taken_at: datetime,
    compression: str,
    encrypted: bool,
    nonce: str | None = None,
) -> str:
    ext = ".dump" + {"zstd": ".zst", "gzip": ".gz", "none": ""}[compression]
    ext += ".gpg" if encrypted else ""
    return _dated(store, database, taken_at, nonce) + ext


def manifest_key(store: Store, database: str, taken_at: datetime, nonce: str | None = None) -> str:
    return _dated(store, database, taken_at, nonce) + MANIFEST_SUFFIX


def _dated(store: Store, database: str, taken_at: datetime, nonce: str | None) -> str:
    t = taken_at.astimezone(UTC)
    return f"{db_prefix(store, database)}{t:%Y/%m/%d}/{backup_id(database, t, nonce)}"


def is_backup_key(database: str, key: str) -> bool:
    """Whether ``key`` names a backup object or manifest of ``database`` (any id form)."""
    m = _KEY.search(key.rsplit("/", 1)[-1])
    return m is not None and m["name"] == database


@dataclass
class Pair:
    """A timestamped data object and its manifest, as found in a listing."""

    id: str
    taken_at: datetime
    data: Any = None
    manifest: Any = None


def pair_objects(objects: Iterable[Any], pattern: re.Pattern[str], owner: str) -> list[Pair]:
    """Group ``<owner>-<timestamp>[-<nonce>]<suffix>`` objects by id, oldest first (ids of
    one second in id order: a stable order, not the order they were taken in).

    ``pattern`` matches a key's last segment with groups ``id``, ``name``, ``ts`` and
    ``suffix`` (``ID_PATTERN`` + a suffix); the manifest is the object whose suffix is
    ``.manifest.json``. Shared by database backups and secrets bundles, which are laid out
    the same way.
    """
    pairs: dict[str, Pair] = {}
    for obj in objects:
        m = pattern.search(str(obj.object_name).rsplit("/", 1)[-1])
        if not m or m["name"] != owner:
            continue
        taken = datetime.strptime(m["ts"], TS_FORMAT).replace(tzinfo=UTC)
        pair = pairs.setdefault(m["id"], Pair(m["id"], taken))
        if m["suffix"] == MANIFEST_SUFFIX:
            pair.manifest = obj
        else:
            pair.data = obj
    return sorted(pairs.values(), key=lambda p: (p.taken_at, p.id))


def parse_objects(database: str, objects: Iterable[Any]) -> list[BackupRef]:
    refs = []
    for pair in pair_objects(objects, _KEY, database):
        ref = BackupRef(pair.id, database, pair.taken_at)
        if pair.manifest is not None:
            ref.manifest_key = pair.manifest.object_name
        if pair.data is not None:
            ref.data_key = pair.data.object_name
            ref.size = int(pair.data.size or 0)
            ref.last_modified = pair.data.last_modified
        refs.append(ref)
    return refs


def list_backups(client: Minio, store: Store, database: str) -> list[BackupRef]:
    objects = client.list_objects(store.bucket, prefix=db_prefix(store, database), recursive=True)
    return parse_objects(database, objects)


def read_manifest(client: Minio, store: Store, ref: BackupRef) -> Manifest:
    """The manifest of ``ref``. A store that cannot be read raises its own errors; a
    manifest that was read but is not one (empty, truncated, not JSON, another format,
    fields missing) raises ``OperationFailed``: the backup is bad, not the store down."""
    if ref.manifest_key is None:
        raise OperationFailed("manifest", f"backup {ref.id} has no manifest")
    try:
        return Manifest.from_json(_manifest_bytes(client, store, ref.manifest_key))
    except ManifestInvalid as exc:
        raise OperationFailed(
            "manifest", f"{ref.manifest_key} is not a valid manifest: {exc}"
        ) from None


def _manifest_bytes(client: Minio, store: Store, key: str) -> bytes:
    response = client.get_object(store.bucket, key)
    try:
        raw = bytes(response.read(MAX_MANIFEST + 1))
    finally:
        response.close()
        response.release_conn()
    if len(raw) > MAX_MANIFEST:
        raise ManifestInvalid(f"it is larger than {MAX_MANIFEST // 2**20} MiB")
    return raw


def manifest_problem(client: Minio, store: Store, ref: BackupRef) -> str | None:
    """Why complete ``ref`` is not a good backup, or None: its manifest parses and names
    the listed data object with the listed size. Store errors propagate (could not look)."""
    from minio.error import S3Error

    assert ref.manifest_key is not None and ref.data_key is not None
    try:
        manifest = Manifest.from_json(_manifest_bytes(client, store, ref.manifest_key))
    except ManifestInvalid as exc:
        return f"manifest is not valid: {exc}"
    except S3Error as exc:
        if exc.code == "NoSuchKey":  # deleted between the listing and now
            return "manifest vanished after the listing"
        raise
    key, size = manifest.object.get("key"), manifest.object["size"]
    if key != ref.data_key:
        return f"manifest names object {str(key)[:200]!r}, not the stored {ref.data_key}"
    if size != ref.size:
        return f"manifest says {size} bytes, the stored object has {ref.size}"
    return None


def verify_manifests(
    client: Minio, store: Store, refs: Sequence[BackupRef], workers: int = MANIFEST_READERS
) -> None:
    """Set ``problem`` on every complete ref whose manifest does not vouch for its object:
    one GET per backup, ``workers`` at a time. The first store error is raised after the
    requests not yet started are cancelled."""
    complete = [r for r in refs if r.complete]
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="manifest")
    try:
        futures = [pool.submit(manifest_problem, client, store, r) for r in complete]
        for ref, future in zip(complete, futures, strict=True):
            ref.problem = future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def latest_complete(refs: list[BackupRef]) -> BackupRef | None:
    done = [r for r in refs if r.complete]
    return done[-1] if done else None
