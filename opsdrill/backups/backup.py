"""``opsdrill backup``: pg_dump -> compress -> encrypt -> S3 multipart upload, streamed.

Order of events, chosen so that nothing incomplete ever looks good:
0. take the database's lock on the live server (locks.py: one backup of a database at a
   time, on every host; exit 75 naming the holder), then abort the multipart uploads a
   killed run of this database left open (uploads.sweep);
1. export a snapshot; pg_dump uses it and the manifest's counts are taken inside it;
2. stream the dump into a multipart upload under a key no other run has (the id carries a
   random nonce) and that is never overwritten (conditional writes); any failure, an
   interrupt included, aborts the upload;
3. check the stored object's size against what we sent;
4. upload the manifest last, conditionally too. Only object + manifest together count as
   a backup.

Exit codes follow from the error types: a failing stage (pg_dump, the compressor, gpg, a
short object) is ``OperationFailed`` (1); a store that cannot be reached or refuses
opsdrill's key pair, before or in the middle of the upload, is the store's ``unreachable``
error (2), like a database that is down or refuses the backup role's password.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import psycopg

from opsdrill import __version__, pgtools
from opsdrill.backups import catalog, locks, uploads
from opsdrill.backups.manifest import Manifest
from opsdrill.backups.pgstats import collect_stats, read_sequences
from opsdrill.backups.preflight import check_privileges
from opsdrill.config.inventory import Database, Inventory, Store
from opsdrill.errors import (
    ConfigError,
    OperationFailed,
    OpsdrillError,
    PrivilegesMissing,
    TargetUnreachable,
)
from opsdrill.gpg import GpgHome
from opsdrill.pg import Endpoint, database_endpoint, server_info
from opsdrill.pipeline import HashingReader, Pipeline, Stage
from opsdrill.progress import Progress
from opsdrill.s3 import PART_SIZE, S3_ERRORS, client, unreachable

LOCK_WAIT_MS = 120_000
# zstd level 1, not zstd's default 3: an hourly dump is CPU-bound behind pg_dump, and on
# the demo CRM level 1 took 3.3 CPU-s per GB against 7.2 for level 3 (writing 3 % more bytes).
# Operators who prefer smaller objects set compression_level in the inventory.
COMPRESSORS = {
    "zstd": (["zstd", "-q", "-c", "-T0"], 1),
    "gzip": (["gzip", "-c"], 6),
}


def live_endpoint(inv: Inventory, name: str) -> Endpoint:
    return database_endpoint(inv, name)


def tool_versions(names: list[str], pg: pgtools.PgTools | None = None) -> dict[str, str]:
    """``--version`` of each tool; the PostgreSQL ones as ``pg`` (opsdrill.pgtools) says,
    with where they came from (``pg_dump_from``)."""
    versions = {"opsdrill": __version__}
    for name in names:
        if name.startswith("pg_"):
            if pg is not None:
                versions.update(pg.manifest_entries(name))
            continue
        exe = shutil.which(name)
        if not exe:
            continue
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
        versions[name] = (out.stdout or out.stderr).strip().splitlines()[0]
    return versions


def compress_stage(db: Database) -> Stage:
    argv, default_level = COMPRESSORS[db.compression]
    if db.compression == "gzip" and shutil.which("pigz"):
        argv = ["pigz", "-c"]  # same format, uses every core
    return Stage(
        f"compress ({db.compression})", [*argv, f"-{db.compression_level or default_level}"]
    )


def require_tool(stage: Stage) -> None:
    """A missing tool is opsdrill's problem (exit 2), found before anything starts."""
    if shutil.which(stage.argv[0]) is None:
        raise ConfigError(
            f"{stage.name}: {stage.argv[0]} not found on PATH (fix: install it, e.g. "
            f"apt-get install {stage.argv[0]})"
        )


def run_backup(
    inv: Inventory,
    name: str,
    *,
    now: datetime | None = None,
    progress: Progress | None = None,
    note: uploads.Say = uploads.say_on_stderr,
    on_sweep: Callable[[uploads.Swept], None] | None = None,
) -> Manifest:
    """Back up ``databases.NAME`` holding its lock (``LockHeld``, exit 75, if another run
    has it); first sweep what an interrupted run left. ``note`` gets one line per thing
    swept or left (stderr by default), ``on_sweep`` what the sweep found."""
    with locks.database_lock(live_endpoint(inv, name), "backup", name):
        swept = sweep_stale_uploads(inv, name, note)
        if swept is not None and on_sweep is not None:
            on_sweep(swept)
        return _backup(inv, name, now=now, progress=progress, note=note)


def sweep_stale_uploads(inv: Inventory, name: str, note: uploads.Say) -> uploads.Swept | None:
    """Abort the open multipart uploads of this database's backups. Only while holding the
    database's lock: then no other run can be uploading under its prefix. Housekeeping:
    a store that cannot be listed is said, and the backup goes on (its upload then meets
    the same store)."""
    store_name, store = inv.store_for(name)
    prefix = catalog.db_prefix(store, name)
    try:
        return uploads.sweep(
            client(inv, store),
            store.bucket,
            prefix,
            lambda key: catalog.is_backup_key(name, key),
            f"a backup of {name}",
            note,
        )
    except S3_ERRORS as exc:
        note(
            f"could not look for stale multipart uploads under {prefix}: "
            f"{unreachable(store_name, store, exc).message} (the backup key pair needs "
            "s3:ListBucketMultipartUploads and s3:AbortMultipartUpload)"
        )
        return None


def _backup(
    inv: Inventory, name: str, *, now: datetime | None, progress: Progress | None, note: uploads.Say
) -> Manifest:
    db = inv.database(name)
    store_name, store = inv.store_for(name)
    endpoint = live_endpoint(inv, name)
    taken_at = (now or datetime.now(UTC)).replace(microsecond=0)
    started = time.monotonic()
    s3 = client(inv, store)
    # The nonce keeps two runs that start in the same second apart (one on another host
    # through another inventory, or one right after another): never the same keys.
    nonce = catalog.new_nonce()
    key = catalog.data_key(store, name, taken_at, db.compression, db.encrypt, nonce)
    progress = progress or Progress(f"backup {name}")
    require_tool(compress_stage(db))

    with GpgHome() as home:
        key_ids: dict[str, list[str]] = {}
        if db.encrypt:
            assert inv.model.gpg is not None
            home.import_keys(
                inv.resolve_path(inv.model.gpg.public_keys_file), what="gpg.public_keys_file"
            )
            key_ids = home.encryption_key_ids(inv.model.gpg.recipients)

        snap_conn = endpoint.connect(autocommit=False)
        try:
            snap_conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            snap_conn.read_only = True
            server = server_info(snap_conn)
            # Client tools of the server's major or newer, chosen before any work: a
            # pg_dump older than the server refuses it ("server version mismatch").
            pg = pgtools.for_database(
                inv,
                name,
                pgtools.major_of(server.get("version_num")),
                "pg_dump",
                why=f"the live server {endpoint.where}",
            )
            # Before pg_dump starts: a role that cannot read a table or a large object
            # would fail halfway, after the upload began. Catalog queries only.
            found = check_privileges(snap_conn)
            if found.dump_would_fail:  # the rest (a manifest field) only the check reports
                raise PrivilegesMissing(
                    f"backup pre-flight: databases.{name} ({endpoint.where}): role "
                    f"{found.role}: {found.summary()}; nothing was dumped or uploaded"
                )
            row = snap_conn.execute("SELECT pg_export_snapshot()").fetchone()
            if row is None:  # pg_export_snapshot() always returns a row
                raise OperationFailed("snapshot", "pg_export_snapshot() returned no row")
            snapshot = str(row[0])
            dump_env = endpoint.libpq_env()
            stages = [
                Stage(
                    "pg_dump",
                    [
                        *pg.argv("pg_dump", dump_env),
                        "--format=custom",
                        "--compress=0",
                        f"--snapshot={snapshot}",
                        # a migration holding an exclusive lock fails the run, not hangs it
                        f"--lock-wait-timeout={LOCK_WAIT_MS}",
                        "--no-password",
                    ],
                    env=dump_env,
                ),
                compress_stage(db),
            ]
            if db.encrypt:
                stages.append(Stage("encrypt (gpg)", home.encrypt_argv(list(key_ids))))
            with ThreadPoolExecutor(1) as pool:
                # Sequences first, before pg_dump reads its own: see read_sequences.
                sequences = read_sequences(snap_conn)
                stats_future = pool.submit(
                    collect_stats, snap_conn, db.content_hashes, sequences=False
                )
                pipeline = Pipeline(stages)
                try:
                    reader = HashingReader(pipeline, on_bytes=progress.add)
                    _upload(s3, store_name, store, key, reader, name, db, note)
                finally:
                    pipeline.close()
                    pg.close()
                    progress.done()
                try:
                    stats = stats_future.result()
                except psycopg.Error as exc:
                    _discard(s3, store.bucket, key)
                    if snap_conn.broken:  # the server went away: not a fault of the data
                        raise TargetUnreachable(
                            f"{endpoint.label} ({endpoint.where}): the connection was lost "
                            f"while counting rows for the manifest: {str(exc).strip()[:300]} "
                            f"(fix: check that the server is up; {endpoint.settings})"
                        ) from None
                    raise OperationFailed("manifest", f"counting rows failed: {exc}") from None
        finally:
            snap_conn.close()

        try:
            stored = s3.stat_object(store.bucket, key)
        except S3_ERRORS as exc:
            _discard(s3, store.bucket, key)
            raise _store_error(store_name, store, exc, f"checking the uploaded {key}") from None
        if stored.size != reader.size:
            _discard(s3, store.bucket, key)
            raise OperationFailed(
                "upload", f"stored object has {stored.size} bytes, sent {reader.size}"
            )
        assert inv.model.gpg is not None or not db.encrypt
        manifest = Manifest(
            id=catalog.backup_id(name, taken_at, nonce),
            database=name,
            taken_at=taken_at.isoformat(),
            finished_at=datetime.now(UTC).replace(microsecond=0).isoformat()
            if now is None
            else taken_at.isoformat(),
            object={
                "key": key,
                "store": store_name,
                "bucket": store.bucket,
                "size": reader.size,
                "sha256": reader.sha256.hexdigest(),
                "compression": db.compression,
                "format": "pg_dump custom, uncompressed inside",
                "encrypted": db.encrypt,
                "recipients": sorted(key_ids),
                "recipient_key_ids": sorted(k for ids in key_ids.values() for k in ids),
            },
            # the cluster's identity (system_identifier) and where the backup reached it:
            # a drill refuses a sandbox that is this cluster even when live is down
            server={
                **server,
                "address": f"{endpoint.params.get('host', 'localhost')}:"
                f"{endpoint.params.get('port', 5432)}",
            },
            tools=tool_versions(["pg_dump", db.compression, *(["gpg"] if db.encrypt else [])], pg),
            tables=stats.tables,
            sequences=sequences,
            large_objects=stats.large_objects,
            duration_seconds=round(time.monotonic() - started, 3),
        )
    manifest_key = catalog.manifest_key(store, name, taken_at, nonce)
    body = manifest.to_json()
    try:
        uploads.put_new(s3, store.bucket, manifest_key, body, "application/json")
    except S3_ERRORS as exc:
        _discard(s3, store.bucket, key)  # best effort: without a manifest it never counts
        raise _store_error(store_name, store, exc, f"manifest upload {manifest_key}") from None
    except BaseException:  # KeyExists included: the data object is ours (its key is new)
        _discard(s3, store.bucket, key)
        raise
    return manifest


def _upload(
    s3: Any,
    store_name: str,
    store: Store,
    key: str,
    reader: HashingReader,
    name: str,
    db: Database,
    note: uploads.Say,
) -> None:
    """Stream the pipeline into a new object; any failure aborts the multipart upload.

    A failed stage surfaces as its ``OperationFailed`` (exit 1), also when the abort then
    could not reach the store (``note`` says so; the next backup sweeps it). A store error
    (down, dropped mid-upload, timed out, our key refused) becomes the store's
    ``unreachable`` error (exit 2); a key that exists, ``KeyExists`` (2).
    """
    try:
        uploads.upload_stream(
            s3,
            store.bucket,
            key,
            reader,
            part_size=PART_SIZE,
            # Two parts in flight keep the link busy; each one is buffered, so this (with
            # PART_SIZE) is what bounds the process's memory: ~120 MiB whatever the size.
            parallel=2,
            content_type="application/octet-stream",
            metadata={
                "opsdrill-database": name,
                "opsdrill-compression": db.compression,
                "opsdrill-encrypted": str(db.encrypt).lower(),
            },
            note=note,
        )
    except OpsdrillError:
        raise  # a pipeline stage failed, or the key exists; the upload was aborted
    except S3_ERRORS as exc:
        raise _store_error(store_name, store, exc, f"upload of {key}") from None


def _store_error(
    store_name: str, store: Store, exc: BaseException, doing: str
) -> TargetUnreachable:
    """The store's ``unreachable`` error (same class: refused credentials stay
    ``CredentialsRejected``), saying what was being done: nothing was left that counts."""
    err = unreachable(store_name, store, exc)
    return type(err)(f"{doing}: {err.message}; nothing from this run counts as a backup")


def _discard(s3: Any, bucket: str, key: str) -> None:
    # Best effort: without a manifest the object is never counted as good anyway.
    with contextlib.suppress(Exception):
        s3.remove_object(bucket, key)
