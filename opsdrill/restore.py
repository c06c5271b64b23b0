"""``opsdrill restore``: fetch, verify, decrypt, decompress, pg_restore; and the drill.

The object streams from S3 through Python (hashing it) into ``gpg | zstd | pg_restore``.
With ``restore_jobs > 1`` a ``tee`` also spools the decompressed dump to a temporary file:
the schema and the data load from the stream while it arrives, and only the post-data
section (indexes, constraints), where most of the time goes, runs as ``pg_restore -j`` on
the file, which needs a seekable input. With 1 job nothing touches local disk. The sha256
is compared with the manifest before a restore is declared good; a mismatch drops what was
restored.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from opsdrill import catalog
from opsdrill.backup import live_endpoint
from opsdrill.catalog import BackupRef
from opsdrill.errors import (
    ConfigError,
    OperationFailed,
    OpsdrillError,
    RefusedError,
)
from opsdrill.gpg import GpgHome, import_drill_key
from opsdrill.inventory import Inventory, Store
from opsdrill.manifest import Comparison, Drift, Manifest, compare, drift
from opsdrill.pg import (
    Endpoint,
    SnapshotStats,
    collect_stats,
)
from opsdrill.pipeline import Pipeline, Stage
from opsdrill.progress import Progress
from opsdrill.s3 import S3_ERRORS, client, store_call, unreachable
from opsdrill.sandbox_guard import (
    check_address,
    guard_manifests,
    guard_sandbox,
    sandbox_endpoint,
)
from opsdrill.stack.postgres import pg_bindir

CHUNK = 1024 * 1024
DECOMPRESS = {"zstd": ["zstd", "-d", "-q", "-c"], "gzip": ["gzip", "-d", "-c"]}


@dataclass
class RestoreResult:
    backup_id: str
    target: str
    bytes_fetched: int
    seconds: float


@dataclass
class DrillReport:
    database: str
    backup_id: str
    manifest: Manifest
    sandbox: str
    restore_seconds: float
    verify_seconds: float
    total_seconds: float
    rto_seconds: float
    comparison: Comparison
    drift: Drift | None
    notes: list[str] = field(default_factory=list)

    @property
    def within_rto(self) -> bool:
        return self.total_seconds <= self.rto_seconds

    @property
    def ok(self) -> bool:
        suspicious = self.drift is not None and bool(self.drift.suspicious)
        return self.comparison.exact and self.within_rto and not suspicious


def pick_backup(inv: Inventory, name: str, backup_id: str | None) -> tuple[BackupRef, Manifest]:
    store_name, store = inv.store_for(name)
    s3 = client(inv, store)
    refs = store_call(store_name, store, catalog.list_backups, s3, store, name)
    if backup_id:
        matches = [r for r in refs if r.id == backup_id]
        if not matches:
            raise ConfigError(f"no backup {backup_id!r} for {name} in store {store_name}")
        ref = matches[0]
        if not ref.complete:
            raise OperationFailed("select", f"backup {backup_id} is incomplete (no manifest)")
    else:
        found = catalog.latest_complete(refs)
        if found is None:
            raise OperationFailed("select", f"no complete backup of {name} in store {store_name}")
        ref = found
    return ref, store_call(store_name, store, catalog.read_manifest, s3, store, ref)


def restore_into(
    inv: Inventory,
    name: str,
    ref: BackupRef,
    manifest: Manifest,
    target: Endpoint,
    *,
    jobs: int,
    keep_owners: bool,
    progress: Progress | None = None,
) -> RestoreResult:
    """Restore one backup into ``target`` (an existing, empty database)."""
    store_name, store = inv.store_for(name)
    s3 = client(inv, store)
    progress = progress or Progress(f"restore {ref.id}")
    started = time.monotonic()
    compression = manifest.object["compression"]
    with GpgHome() as home, tempfile.TemporaryDirectory(prefix="opsdrill-restore-") as work:
        stages: list[Stage] = []
        pass_r: int | None = None
        if manifest.object.get("encrypted"):
            pass_r = _import_drill_key(inv, home)
            stages.append(Stage("decrypt (gpg)", home.decrypt_argv(pass_r), pass_fds=(pass_r,)))
        stages.append(Stage(f"decompress ({compression})", DECOMPRESS[compression]))
        restore_argv = [
            str(pg_bindir() / "pg_restore"),
            "--exit-on-error",
            "--no-password",
            f"--dbname={target.dbname}",
        ]
        if not keep_owners:
            restore_argv += ["--no-owner", "--no-privileges"]
        spool = Path(work) / "dump"
        if jobs == 1:
            stages.append(Stage("pg_restore", restore_argv, env=target.libpq_env()))
        else:
            # warn-nopipe: should pg_restore stop reading early, tee still completes the file
            stages.append(Stage("spool (tee)", ["tee", "--output-error=warn-nopipe", str(spool)]))
            stages.append(
                Stage(
                    "pg_restore (schema and data)",
                    [*restore_argv, "--section=pre-data", "--section=data"],
                    env=target.libpq_env(),
                )
            )
        fetched = _stream_object(s3, (store_name, store), ref, manifest, stages, progress, pass_r)
        if jobs > 1:
            progress.set_stage(f"pg_restore -j{jobs} post-data")
            pipe = Pipeline(
                [
                    Stage(
                        "pg_restore (indexes and constraints)",
                        [*restore_argv, f"--jobs={jobs}", "--section=post-data", str(spool)],
                        env=target.libpq_env(),
                    )
                ]
            )
            try:
                pipe.wait(timeout=24 * 3600)
            finally:
                pipe.close()
        progress.done()
    return RestoreResult(ref.id, target.where, fetched, time.monotonic() - started)


def _import_drill_key(inv: Inventory, home: GpgHome) -> int:
    """Import the drill key and prove its passphrase before anything is downloaded (a
    wrong one is ``CredentialsRejected``, exit 2); return a pipe holding it for gpg."""
    _, _, passphrase = import_drill_key(home, inv)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, passphrase.encode() + b"\n")  # far below the pipe buffer size
    os.close(write_fd)
    return read_fd


def _stream_object(
    s3: Any,
    where: tuple[str, Store],
    ref: BackupRef,
    manifest: Manifest,
    stages: list[Stage],
    progress: Progress,
    pass_r: int | None,
) -> int:
    import hashlib
    import subprocess

    assert ref.data_key is not None
    store_name, store = where
    digest = hashlib.sha256()
    size = 0
    pipe = Pipeline(stages, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    if pass_r is not None:
        os.close(pass_r)
    try:
        response = store_call(store_name, store, s3.get_object, store.bucket, ref.data_key)
        feed = pipe.procs[0].stdin
        assert feed is not None
        try:
            for chunk in _from_store(response.stream(CHUNK), store_name, store):
                digest.update(chunk)
                size += len(chunk)
                progress.add(len(chunk))
                try:
                    feed.write(chunk)
                except BrokenPipeError:
                    break  # a stage died; pipe.wait() below names it
        finally:
            response.close()
            response.release_conn()
            with contextlib.suppress(BrokenPipeError):
                feed.close()
        integrity = _integrity_error(manifest, size, digest.hexdigest())
        try:
            pipe.wait(timeout=24 * 3600)
        except OperationFailed as exc:
            if integrity:  # a corrupt object explains the stage failure better
                raise OperationFailed("verify", integrity) from exc
            if exc.stage.startswith("decrypt") and "secret key" in exc.message.lower():
                # The passphrase was proven on import: the backup is not for this key.
                raise OperationFailed(
                    exc.stage,
                    f"{exc.message.split(': ', 1)[-1]} (the backup was encrypted to recipients "
                    f"{', '.join(manifest.object.get('recipients') or []) or 'unknown'} and "
                    "the drill key in gpg.drill_private_key_file is none of them)",
                ) from exc
            raise
        if integrity:
            raise OperationFailed("verify", integrity)
    finally:
        pipe.close()
    return size


def _from_store(chunks: Iterator[bytes], store_name: str, store: Store) -> Iterator[bytes]:
    """The download's chunks; a store that goes away mid-download is ``unreachable`` (exit
    2), not a fault of the object. Errors of the consumer (a dead stage) are not caught."""
    try:
        yield from chunks
    except S3_ERRORS as exc:
        raise unreachable(store_name, store, exc) from None


def _integrity_error(manifest: Manifest, size: int, sha256: str) -> str | None:
    want_size, want_sha = manifest.object["size"], manifest.object["sha256"]
    if size != want_size:
        return f"object is {size} bytes, manifest says {want_size} (truncated or replaced)"
    if sha256 != want_sha:
        return f"object sha256 {sha256[:16]}... differs from manifest {want_sha[:16]}..."
    return None


def verify_restored(target: Endpoint, manifest: Manifest) -> Comparison:
    """Count (and hash, if the manifest has hashes) the restored database; compare."""
    hashes = any("content_hash" in t for t in manifest.tables.values())
    with target.connect(autocommit=True) as conn:
        restored = collect_stats(conn, hashes)
    return compare(manifest, restored)


def create_database(server: Endpoint, dbname: str) -> None:
    """Create the restore target; never reuse an existing database (it may be production)."""
    with server.connect(autocommit=True) as conn:
        try:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname))
            )
        except psycopg.errors.DuplicateDatabase:
            raise RefusedError(
                f"database {dbname!r} already exists on {server.where.rsplit('/', 1)[0]}; "
                "a restore never writes into an existing database (fix: choose --new-name)"
            ) from None


def drop_database(server: Endpoint, dbname: str) -> None:
    with server.connect(autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def _live_stats(live: Endpoint) -> SnapshotStats:
    with live.connect(autocommit=True) as conn:
        return collect_stats(conn, content_hashes=False)


def drill(
    inv: Inventory,
    name: str,
    *,
    backup_id: str | None = None,
    progress: Progress | None = None,
    live_required: bool = True,
) -> DrillReport:
    """Restore into a throwaway database on the sandbox, verify exactly, measure, drop it.

    ``live_required=False`` lets an operator drill while production is down (cold restore):
    the sandbox is then proven not to be production by the manifests' system identifier
    alone, the drift comparison is skipped, and the report says both.
    """
    db = inv.database(name)
    live = live_endpoint(inv, name)
    sandbox, max_shrink = sandbox_endpoint(inv, name)
    check_address(live, sandbox)
    picking = time.monotonic()
    ref, manifest = pick_backup(inv, name, backup_id)
    picked = time.monotonic() - picking
    # The guard needs the manifests (production's identity at backup time): read them
    # first, and nothing is written to the sandbox before it has passed.
    guard = guard_sandbox(
        live, sandbox, guard_manifests(inv, name, manifest), live_required=live_required
    )
    started = time.monotonic() - picked  # the guard's connections are not restore time
    # Count live rows for the drift report while the restore runs: it reads another
    # server, so overlapping it costs the drill nothing.
    pool = ThreadPoolExecutor(1, thread_name_prefix="opsdrill-drift")
    live_counts = pool.submit(_live_stats, live) if guard.live_answered else None
    scratch = f"opsdrill_drill_{name}_{datetime.now(UTC):%Y%m%d%H%M%S}_{secrets.token_hex(3)}"
    target = sandbox.with_dbname(scratch)
    try:
        create_database(sandbox, scratch)
        result = restore_into(
            inv,
            name,
            ref,
            manifest,
            target,
            jobs=db.restore_jobs,
            keep_owners=False,
            progress=progress,
        )
        verify_started = time.monotonic()
        comparison = verify_restored(target, manifest)
        verify_seconds = time.monotonic() - verify_started
    finally:
        with contextlib.suppress(OpsdrillError):
            drop_database(sandbox, scratch)
        pool.shutdown(wait=True)
    notes = [*guard.notes, *comparison.notes]
    drift_report: Drift | None = None
    if live_counts is not None:
        drift_report = drift(manifest, live_counts.result(), max_shrink)
    else:
        notes.append(f"live server {live.where} unreachable: drift not compared")
    total = time.monotonic() - started
    return DrillReport(
        database=name,
        backup_id=ref.id,
        manifest=manifest,
        sandbox=sandbox.where,
        restore_seconds=result.seconds,
        verify_seconds=verify_seconds,
        total_seconds=total,
        rto_seconds=db.rto_minutes * 60.0,
        comparison=comparison,
        drift=drift_report,
        notes=notes,
    )
