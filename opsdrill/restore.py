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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

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
    TargetUnreachable,
)
from opsdrill.gpg import GpgHome, import_drill_key
from opsdrill.inventory import Inventory, Store
from opsdrill.manifest import Comparison, Drift, Manifest, compare, drift
from opsdrill.pg import (
    Endpoint,
    SnapshotStats,
    collect_stats,
    sandbox_endpoint_of,
    server_info,
)
from opsdrill.pipeline import Pipeline, Stage
from opsdrill.progress import Progress
from opsdrill.s3 import S3_ERRORS, client, store_call, unreachable
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


def sandbox_endpoint(inv: Inventory, name: str) -> tuple[Endpoint, float]:
    db = inv.database(name)
    if db.sandbox is None:
        raise ConfigError(
            f"{inv.path}: databases.{name}.sandbox: missing (fix: add a [databases.{name}."
            "sandbox] with the dsn of a throwaway server for drills)"
        )
    return (
        sandbox_endpoint_of(inv, name, db.sandbox.dsn, db.sandbox.password_env),
        db.sandbox.max_shrink_percent,
    )


# Besides the manifest restored, the newest few: production's identity as of lately.
RECENT_MANIFESTS = 3


class SandboxRefused(RefusedError):
    """The guard refused the sandbox (exit 2); ``evidence`` is what it compared."""

    def __init__(self, message: str, evidence: dict[str, Any]) -> None:
        super().__init__(message)
        self.evidence = evidence


class SandboxIsProduction(SandboxRefused):
    """Proven: the sandbox is the live cluster (same address, or same system identifier
    as the live server or a backup's manifest). A check *fails* on this."""


class SandboxUnproven(SandboxRefused):
    """Not proven either way: the sandbox's identity, or production's, could not be read.
    A drill refuses (fail closed); a check is *broken*, nothing being known."""


@dataclass
class GuardManifests:
    """The manifests the guard compares the sandbox with: the one to restore (None when
    there is none to read) and the newest few others; ``notes`` says what was unreadable."""

    restoring: Manifest | None
    recent: list[Manifest] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def guard_manifests(
    inv: Inventory, name: str, restoring: Manifest | None, notes: list[str] | None = None
) -> GuardManifests:
    """``restoring`` plus the newest few other complete manifests, best effort: one that
    cannot be read is noted, never fatal (the restored one is what fails closed)."""
    found = GuardManifests(restoring, notes=list(notes or []))
    store_name, store = inv.store_for(name)
    try:
        s3 = client(inv, store)
        refs = store_call(store_name, store, catalog.list_backups, s3, store, name)
    except OpsdrillError as exc:
        found.notes.append(f"newest manifests not compared: {exc.message}")
        return found
    skip = restoring.id if restoring else None
    for ref in [r for r in reversed(refs) if r.complete and r.id != skip][:RECENT_MANIFESTS]:
        try:
            found.recent.append(
                store_call(store_name, store, catalog.read_manifest, s3, store, ref)
            )
        except OpsdrillError as exc:
            found.notes.append(f"manifest of {ref.id} not compared: {exc.message}")
    return found


@dataclass
class Guard:
    """What guard_sandbox compared, for the drill's notes and the check's evidence."""

    sandbox: dict[str, Any]
    live: dict[str, Any]
    manifests: list[dict[str, Any]]
    notes: list[str]

    @property
    def live_answered(self) -> bool:
        return bool(self.live.get("answered"))

    def evidence(self) -> dict[str, Any]:
        return asdict(self)


def check_address(live: Endpoint, sandbox: Endpoint) -> None:
    """The cheap half of the guard, before anything is read: the same host:port."""
    if _host_port(live) == _host_port(sandbox):
        where = {"live": live.where, "sandbox": sandbox.where}
        _refuse(
            SandboxIsProduction, sandbox, f"is the live server {live.where} (same address)", where
        )


def guard_sandbox(
    live: Endpoint,
    sandbox: Endpoint,
    manifests: GuardManifests,
    *,
    live_required: bool = True,
) -> Guard:
    """Refuse a sandbox that is, or may be, the live cluster: fail closed.

    By address, then by cluster identity (system_identifier), compared with the live
    server when it answers AND with the manifests, which recorded production's identity at
    backup time: a live server reached through another address, a DNS alias or a port
    forward is refused even while the live DSN is down, wrong or stale. Refused as well
    (``SandboxUnproven``): a sandbox whose identifier cannot be read, and a drill where
    neither the live server nor the manifest to restore names production's identifier (an
    older manifest). ``live_required`` raises the live server's error after those checks.
    Reads only; nothing is written anywhere.
    """
    check_address(live, sandbox)
    with sandbox.connect(autocommit=True) as conn:
        sandbox_info = {"address": sandbox.where, **server_info(conn)}
    live_info: dict[str, Any] = {"address": live.where, "answered": False}
    live_error: TargetUnreachable | None = None
    try:
        with live.connect(autocommit=True) as conn:
            live_info.update(server_info(conn), answered=True)
    except TargetUnreachable as exc:
        live_error = exc
        live_info["error"] = exc.message
    restoring = manifests.restoring
    seen = [m for m in [restoring, *manifests.recent] if m is not None]
    guard = Guard(
        sandbox_info,
        live_info,
        [
            {
                "backup": m.id,
                "restoring": m is restoring,
                "system_identifier": m.server.get("system_identifier"),
                "address": m.server.get("address"),
            }
            for m in seen
        ],
        list(manifests.notes),
    )
    mine = sandbox_info.get("system_identifier")
    if mine is None:
        why = sandbox_info.get("system_identifier_error", "pg_control_system() returned nothing")
        _refuse(
            SandboxUnproven,
            sandbox,
            f"cannot be proven not to be production: its system identifier is unreadable ({why}); "
            "a drill that cannot prove it is not on production does not run",
            guard.evidence(),
        )
    production = []
    if live_info.get("system_identifier"):
        production.append((f"the live server {live.where}", live_info["system_identifier"]))
    production += [(f"backup {m.id}'s manifest", m.server.get("system_identifier")) for m in seen]
    same = [source for source, ident in production if ident == mine]
    if same:
        _refuse(
            SandboxIsProduction,
            sandbox,
            f"is the live server: the same cluster (system identifier {mine}) as "
            + ", ".join(same),
            guard.evidence(),
        )
    if live_error is not None and live_required:
        raise live_error
    if not live_info.get("system_identifier") and not (
        restoring and restoring.server.get("system_identifier")
    ):
        _refuse(SandboxUnproven, sandbox, _unproven(live, live_info, restoring), guard.evidence())
    if not live_info.get("system_identifier"):
        assert restoring is not None
        others = len(manifests.recent)
        guard.notes.append(
            f"live server {live.where} "
            + ("unreachable" if live_error else "answered without its system identifier")
            + f": live identity not compared; the sandbox (system identifier {mine}) was "
            f"compared with the manifest of {restoring.id} (system identifier "
            f"{restoring.server['system_identifier']})"
            + (f" and {others} other recent manifest(s)" if others else "")
            + " only"
        )
    return guard


def _unproven(live: Endpoint, live_info: dict[str, Any], restoring: Manifest | None) -> str:
    """Why production's identity is unknown, and what to fix."""
    if live_info["answered"]:
        live_why = live_info.get("system_identifier_error", "identifier unreadable")
        live_part = f"the live server {live.where} answered but {live_why}"
    else:
        live_part = f"the live server did not answer ({live_info['error']})"
    if restoring is None:
        manifest_part = "no backup manifest could be read"
    else:
        recorded = restoring.server.get("system_identifier_error")
        manifest_part = f"the manifest of {restoring.id} records no system identifier " + (
            f"({recorded})" if recorded else "(an older format)"
        )
    return (
        f"cannot be proven not to be production: {manifest_part} and {live_part}; a drill that "
        "cannot prove it is not on production does not run (fix: make "
        f"{live.settings or 'the live DSN'} reachable for this drill, or drill a backup "
        "whose manifest records the identifier)"
    )


def _host_port(endpoint: Endpoint) -> tuple[str, str]:
    return str(endpoint.params.get("host")), str(endpoint.params.get("port", 5432))


def _refuse(
    kind: type[SandboxRefused], sandbox: Endpoint, why: str, evidence: dict[str, Any]
) -> NoReturn:
    fix = sandbox.settings or "sandbox.dsn"
    if kind is SandboxIsProduction:
        why += f"; a drill must never write to production (fix: point {fix} at a throwaway server)"
    raise kind(f"refusing the drill sandbox {sandbox.where} ({fix}): it {why}", evidence)


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
