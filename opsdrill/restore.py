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
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from opsdrill import catalog, workspace
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
SCRATCH_PREFIX = "opsdrill_drill_"
SCRATCH_COMMENT = "opsdrill drill scratch database; owner: "
# A scratch database whose owner cannot be proven gone (it ran on another host, or left no
# owner comment) is dropped only once no drill can still be using it: a drill running for
# a day has missed any RTO by far. Never less: it may be a concurrent drill's.
SCRATCH_MAX_AGE = timedelta(hours=24)
# How long dropping a database waits for the sessions in it to go (autovacuum, a
# monitoring agent) before the error names them; each plain DROP waits up to 5 s itself.
DROP_WITHIN_SECONDS = 60.0


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
    # The run's private directory (0700) holds the GnuPG home and the spool (0600); the
    # spool, a plaintext dump, goes as soon as pg_restore is done with it.
    with workspace.run("restore") as ws, GpgHome() as home:
        spool = ws.new_file(f"spool-{ref.id}.dump") if jobs > 1 else None
        try:
            stages, pass_r, restore_argv = _stages(inv, manifest, target, home, keep_owners, spool)
            fetched = _stream_object(
                s3, (store_name, store), ref, manifest, stages, progress, pass_r
            )
            if spool is not None:
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
        except OperationFailed as exc:
            full = _full_disk(exc, spool, name)
            if full is None:
                raise
            raise full from None
        finally:
            if spool is not None:
                spool.unlink(missing_ok=True)
        progress.done()
    return RestoreResult(ref.id, target.where, fetched, time.monotonic() - started)


def _stages(
    inv: Inventory,
    manifest: Manifest,
    target: Endpoint,
    home: GpgHome,
    keep_owners: bool,
    spool: Path | None,
) -> tuple[list[Stage], int | None, list[str]]:
    """decrypt | decompress | [tee spool |] pg_restore; the passphrase pipe; pg_restore argv.
    With a spool, the post-data section (indexes) is left for ``pg_restore -j`` on it."""
    stages: list[Stage] = []
    pass_r: int | None = None
    if manifest.object.get("encrypted"):
        pass_r = _import_drill_key(inv, home)
        stages.append(Stage("decrypt (gpg)", home.decrypt_argv(pass_r), pass_fds=(pass_r,)))
    compression = manifest.object["compression"]
    stages.append(Stage(f"decompress ({compression})", DECOMPRESS[compression]))
    restore_argv = [
        str(pg_bindir() / "pg_restore"),
        "--exit-on-error",
        "--no-password",
        f"--dbname={target.dbname}",
    ]
    if not keep_owners:
        restore_argv += ["--no-owner", "--no-privileges"]
    if spool is None:
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
    return stages, pass_r, restore_argv


def _full_disk(exc: OperationFailed, spool: Path | None, name: str) -> OperationFailed | None:
    """A stage that ran out of room for the spool, said with where and what to do."""
    if spool is None or "no space left on device" not in exc.message.lower():
        return None
    return OperationFailed(
        exc.stage,
        f"{exc.message.removeprefix(exc.stage + ': ')}: the restore spool {spool} (in "
        f"TMPDIR={tempfile.gettempdir()}) is on a full filesystem ({_filesystem(spool)}) "
        "(fix: free space there, set TMPDIR to a filesystem with room for the decompressed "
        f"dump, or set databases.{name}.restore_jobs = 1 to restore without a spool)",
    )


def _filesystem(path: Path) -> str:
    """The mount point ``path`` is on, with its free space."""
    mount = path.resolve()
    with contextlib.suppress(OSError):
        dev = os.stat(mount).st_dev
        while mount != mount.parent and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
        st = os.statvfs(path)
        free, size = st.f_bavail * st.f_frsize / 2**20, st.f_blocks * st.f_frsize / 2**20
        return f"{mount}: {free:.1f} MiB free of {size:.1f} MiB"
    return str(mount)


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
        restored = collect_stats(conn, hashes, column_extremes=True)
    return compare(manifest, restored)


def create_database(server: Endpoint, dbname: str, *, comment: str | None = None) -> None:
    """Create the restore target; never reuse an existing database (it may be production).
    ``comment`` goes on it at once (the drill's owner record: see sweep_scratch)."""
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
        if comment is not None:
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(dbname), sql.Literal(comment)
                )
            )


def drop_database(server: Endpoint, dbname: str, *, within: float = DROP_WITHIN_SECONDS) -> None:
    """Drop ``dbname``, waiting out the sessions that hold it; cleanup no signal cuts short.

    ``WITH (FORCE)`` ends the other sessions only if this role may signal each of them: a
    sandbox role that is not a superuser may not end autovacuum's or another role's
    (unless it has pg_signal_backend). A plain DROP then makes autovacuum workers exit by
    itself and waits up to 5 s for the rest; both are retried with a backoff for
    ``within`` seconds, after which the error names what still holds the database.
    """
    drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname))
    deadline = time.monotonic() + within
    delay = 0.5
    with workspace.shielded():
        while True:
            with server.connect(autocommit=True) as conn:
                try:
                    held = _try_drop(conn, drop)
                    if held is None:
                        return
                    if time.monotonic() + delay > deadline:
                        raise _still_held(server, conn, dbname, within, held)
                except psycopg.errors.InsufficientPrivilege as exc:  # not its owner
                    raise ConfigError(
                        f"{server.label} ({server.where}): cannot drop database {dbname}: "
                        f"{_first_line(exc)} (fix: drop it by hand as its owner)"
                    ) from None
                except psycopg.Error as exc:
                    raise TargetUnreachable(
                        f"{server.label} ({server.where}): cannot drop database {dbname}: "
                        f"{_first_line(exc)} (fix: drop it by hand; the next drill removes "
                        "it once this run is gone)"
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _try_drop(conn: psycopg.Connection[Any], drop: sql.Composed) -> str | None:
    """None once dropped, else why not: FORCE, refused when a session is one this role may
    not end, then a plain DROP, which ends autovacuum itself and fails on other sessions.
    A plain DROP refused for privileges (not the owner) raises."""
    try:
        conn.execute(drop + sql.SQL(" WITH (FORCE)"))
        return None
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectInUse) as exc:
        forced = _first_line(exc)
    try:
        conn.execute(drop)
        return None
    except psycopg.errors.ObjectInUse as exc:
        return f"{forced}; without FORCE: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _still_held(
    server: Endpoint, conn: psycopg.Connection[Any], dbname: str, within: float, why: str
) -> ConfigError:
    """What holds ``dbname`` (sessions, prepared transactions), for the operator."""
    sessions = conn.execute(
        "SELECT pid, backend_type, usename, application_name, host(client_addr), state "
        "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY pid",
        (dbname,),
    ).fetchall()
    holders = []
    for pid, kind, user, app, addr, state in sessions:
        if kind is None:  # all a role without pg_read_all_stats sees of others' sessions
            facts = [f"a session of role {user}" if user else "autovacuum or another process"]
        else:
            facts = [kind, *([f"role {user}"] if user else [])]
            facts += [f"application {app!r}"] if app else []
            facts += [f"from {addr}"] if addr else []
            facts += [state] if state else []
        holders.append(f"pid {pid} ({', '.join(facts)})")
    prepared = conn.execute(
        "SELECT gid, owner FROM pg_prepared_xacts WHERE database = %s", (dbname,)
    ).fetchall()
    holders += [f"prepared transaction {gid!r} of role {owner}" for gid, owner in prepared]
    role = server.params.get("user", "the sandbox role")
    return ConfigError(
        f"{server.label} ({server.where}): could not drop database {dbname} within "
        f"{within:g}s ({why}); held by "
        f"{', '.join(holders) or 'sessions gone by now'} (fix: let {role} end them, "
        f"GRANT pg_signal_backend TO {role}, or stop what connects to it; then drop it by "
        "hand, or let the next drill remove it)"
    )


def scratch_name(name: str, now: datetime) -> str:
    """``opsdrill_drill_<db>_<timestamp>_<hex>``, within PostgreSQL's 63 bytes: a longer
    name would be truncated on CREATE and then missed by the DROP."""
    room = 63 - len(SCRATCH_PREFIX) - len("_YYYYmmddHHMMSS_hhhhhh")
    short = name.encode()[:room].decode(errors="ignore")
    return f"{SCRATCH_PREFIX}{short}_{now:%Y%m%d%H%M%S}_{secrets.token_hex(3)}"


_SCRATCH_TS = re.compile(r"_(\d{14})_[0-9a-f]{6}$")


def sweep_scratch(sandbox: Endpoint, say: workspace.Say = workspace.say_on_stderr) -> list[str]:
    """Drop the scratch databases killed drills left on the sandbox; one line each.

    Only those provably abandoned: the owner recorded in the comment ran on this host and
    its process is gone, or the database is older than SCRATCH_MAX_AGE. Never a concurrent
    drill's, from this host or another.
    """
    with sandbox.connect(autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE datname LIKE %s ORDER BY datname",
            (SCRATCH_PREFIX.replace("_", "\\_") + "%",),
        ).fetchall()
    done = []
    for dbname, comment in rows:
        who = _abandoned(str(dbname), comment, datetime.now(UTC))
        if who is None:
            continue
        try:
            drop_database(sandbox, dbname)
        except OpsdrillError as exc:
            line = f"could not remove scratch database {dbname} left by {who}: {exc.message}"
        else:
            line = f"removed scratch database {dbname} from the sandbox, left by {who}"
        say(line)
        done.append(line)
    return done


def _abandoned(dbname: str, comment: str | None, now: datetime) -> str | None:
    """Whose the scratch database was, if it is provably abandoned; else None."""
    owner = None
    if comment and comment.startswith(SCRATCH_COMMENT):
        owner = workspace.Owner.from_json(comment.removeprefix(SCRATCH_COMMENT))
    if owner is not None and owner.on_this_host():  # judged: gone, or a concurrent drill
        return owner.describe() if owner.provably_dead() else None
    created: datetime | None = None
    with contextlib.suppress(ValueError):
        if owner is not None:
            created = datetime.fromisoformat(owner.started)
        elif match := _SCRATCH_TS.search(dbname):
            created = datetime.strptime(match[1], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    if created is not None and now - created > SCRATCH_MAX_AGE:
        hours = SCRATCH_MAX_AGE.total_seconds() / 3600
        return f"a drill started {created:%Y-%m-%d %H:%M}Z, more than {hours:g} h ago"
    return None


def _drop_after_failure(sandbox: Endpoint, scratch: str) -> None:
    """Drop the scratch database of a drill that failed or was interrupted; a failure to
    is said on stderr, and the drill's own error goes on."""
    try:
        drop_database(sandbox, scratch)
    except OpsdrillError as exc:
        workspace.say_on_stderr(f"the drill's scratch database was not dropped: {exc.message}")


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

    What killed drills left (their private directory and gpg-agent, their scratch
    database) is removed first, once the guard has passed, and listed in the notes.
    """
    with workspace.run("drill") as ws:
        return _drill(inv, name, ws, backup_id, progress, live_required)


def _drill(
    inv: Inventory,
    name: str,
    ws: workspace.Workspace,
    backup_id: str | None,
    progress: Progress | None,
    live_required: bool,
) -> DrillReport:
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
    cleaned = [*ws.cleaned, *sweep_scratch(sandbox)]  # only now: the guard has passed
    started = time.monotonic() - picked  # the guard's connections are not restore time
    # Count live rows for the drift report while the restore runs: it reads another
    # server, so overlapping it costs the drill nothing.
    pool = ThreadPoolExecutor(1, thread_name_prefix="opsdrill-drift")
    live_counts = pool.submit(_live_stats, live) if guard.live_answered else None
    scratch = scratch_name(name, datetime.now(UTC))
    target = sandbox.with_dbname(scratch)
    owner = workspace.Owner.of_this_process("drill")
    created = False
    try:
        with workspace.shielded():  # a signal now must not leave it unrecorded
            create_database(sandbox, scratch, comment=SCRATCH_COMMENT + owner.to_json())
            created = True
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
    except BaseException:
        if created:
            _drop_after_failure(sandbox, scratch)
        raise
    finally:
        pool.shutdown(wait=True)
    # The scratch database holds a full copy of production's data: failing to drop it is
    # an error naming what holds it, never silence.
    drop_database(sandbox, scratch)
    notes = [*cleaned, *guard.notes, *comparison.notes]
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
