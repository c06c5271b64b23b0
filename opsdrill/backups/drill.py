"""``opsdrill restore --drill`` and the drill checks: restore the newest good backup into a
throwaway database on the sandbox, verify it exactly against its manifest, measure it
against the RTO, compare the manifest with live (drift), drop the scratch database.

Which backup was drilled, and why a newer one was passed over, is part of the report: a
drill never silently restores an older backup.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from opsdrill import workspace
from opsdrill.backups import catalog
from opsdrill.backups.backup import live_endpoint
from opsdrill.backups.catalog import BackupRef
from opsdrill.backups.manifest import Comparison, Drift, Manifest, drift
from opsdrill.backups.pgstats import SnapshotStats, collect_stats
from opsdrill.backups.restore import restore_into, restore_tools, verify_restored
from opsdrill.backups.sandbox_guard import (
    check_address,
    guard_manifests,
    guard_sandbox,
    require_major,
    sandbox_endpoint,
)
from opsdrill.backups.scratch import (
    SCRATCH_COMMENT,
    create_database,
    drop_after_failure,
    drop_database,
    scratch_name,
    sweep_scratch,
)
from opsdrill.config.inventory import Inventory
from opsdrill.errors import ConfigError, OperationFailed, OpsdrillError
from opsdrill.pg import Endpoint
from opsdrill.pgtools import PgTools, major_of
from opsdrill.progress import Progress
from opsdrill.s3 import client, store_call


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
    # Newer backups that were not drilled, and why (incomplete, manifest unreadable).
    passed_over: list[str] = field(default_factory=list)
    scratch: str = ""  # the scratch database it restored into (dropped since)
    started_utc: str = ""
    # A container sandbox: image, image id (its digest), container; removed since.
    container: dict[str, Any] | None = None
    guard: dict[str, Any] = field(default_factory=dict)  # what the sandbox guard compared
    tools: str = ""  # the pg_restore used, and where it came from

    def evidence(self) -> dict[str, object]:
        """Which drill this was: every drill check of a run attaches the same one."""
        found: dict[str, object] = {
            "backup": self.backup_id,
            "passed_over": self.passed_over,
            "sandbox": self.sandbox,
            "scratch_database": self.scratch,
            "started_utc": self.started_utc,
            "total_seconds": round(self.total_seconds, 3),
            "pg_restore": self.tools,
        }
        if self.container is not None:
            found["sandbox_container"] = self.container
        return found

    @property
    def within_rto(self) -> bool:
        return self.total_seconds <= self.rto_seconds

    @property
    def ok(self) -> bool:
        suspicious = self.drift is not None and bool(self.drift.suspicious)
        return self.comparison.exact and self.within_rto and not suspicious


@dataclass
class Picked:
    ref: BackupRef
    manifest: Manifest
    passed_over: list[str] = field(default_factory=list)


def pick_for_drill(inv: Inventory, name: str, backup_id: str | None) -> Picked:
    """The backup to drill: ``backup_id``, or the newest good one, saying why each newer
    one was passed over. A newer backup without a manifest (failed, or still uploading) or
    with one that cannot be read is never drilled and never hidden: the completeness check
    fails on it, and the drill report names it."""
    store_name, store = inv.store_for(name)
    s3 = client(inv, store)
    refs = store_call(store_name, store, catalog.list_backups, s3, store, name)
    if backup_id:
        matches = [r for r in refs if r.id == backup_id]
        if not matches:
            raise ConfigError(f"no backup {backup_id!r} for {name} in store {store_name}")
        if not matches[0].complete:
            raise OperationFailed("select", f"backup {backup_id} is incomplete (no manifest)")
        manifest = store_call(store_name, store, catalog.read_manifest, s3, store, matches[0])
        return Picked(matches[0], manifest)
    passed_over: list[str] = []
    for ref in reversed(refs):
        if not ref.complete:
            missing = "manifest" if ref.manifest_key is None else "data object"
            passed_over.append(f"{ref.id}: no {missing} (the run failed or is still uploading)")
            continue
        try:
            manifest = store_call(store_name, store, catalog.read_manifest, s3, store, ref)
        except OperationFailed as exc:  # read, and not a manifest: a bad backup
            passed_over.append(f"{ref.id}: {exc.message}")
            continue
        return Picked(ref, manifest, passed_over)
    found = f"; passed over: {'; '.join(passed_over)}" if passed_over else ""
    raise OperationFailed("select", f"no good backup of {name} in store {store_name}{found}")


def _live_stats(live: Endpoint) -> SnapshotStats:
    with live.connect(autocommit=True) as conn:
        return collect_stats(conn, content_hashes=False)


# Bytes per table (heap and TOAST, no indexes), by OID: what pg_restore -l names a table's
# data item by, since the backup was taken from this server.
TABLE_SIZES = "SELECT oid::bigint, pg_table_size(oid) FROM pg_class WHERE relkind IN ('r', 'm')"


def _live_table_sizes(live: Endpoint) -> dict[int, int]:
    """How to share the data out between the restore's loaders (only a hint: a table
    made since the backup has another OID and weighs the median); {} if live does not
    answer, which a cold restore allows."""
    try:
        with live.connect(autocommit=True) as conn:
            return {int(oid): int(size or 0) for oid, size in conn.execute(TABLE_SIZES)}
    except (OpsdrillError, psycopg.Error):  # a hint: the restore is as correct without it
        return {}


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


@dataclass
class _Sandbox:
    endpoint: Endpoint
    max_shrink: float
    container: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _sandbox(inv: Inventory, name: str, manifest: Manifest) -> Iterator[_Sandbox]:
    """The drill's sandbox: the standing server (``sandbox.dsn``), or a container of the
    backup's major (``sandbox.container``), started here and removed on every exit path,
    an interrupt included (opsdrill.containers)."""
    sb = inv.database(name).sandbox
    if sb is None or sb.container is None:
        endpoint, max_shrink = sandbox_endpoint(inv, name)
        yield _Sandbox(endpoint, max_shrink)
        return
    from opsdrill.containers import sandbox_container

    backup_major = major_of(manifest.server.get("version_num"))
    if backup_major is None:
        raise ConfigError(
            f"databases.{name}.sandbox.container: backup {manifest.id}'s manifest records no "
            "server version, so no image of its major can be chosen (fix: drill a newer "
            "backup, or use a sandbox dsn)"
        )
    with sandbox_container(
        name,
        sb.container,
        backup_major,
        network=sb.container_network,
        timeout=sb.container_start_seconds,
        settings=sb.container_settings,
    ) as box:
        notes = [
            *box.swept,
            f"sandbox container {box.image} (image id {box.image_id}) started in "
            f"{box.start_seconds:.1f}s, not counted in the RTO; removed after the drill",
        ]
        yield _Sandbox(box.endpoint, sb.max_shrink_percent, box.evidence(), notes)


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
    if db.sandbox is None or db.sandbox.container is None:
        # the cheap half of the guard first: before any backup is read
        check_address(live, sandbox_endpoint(inv, name)[0])
    picking = time.monotonic()
    chosen = pick_for_drill(inv, name, backup_id)
    picked = time.monotonic() - picking
    # pg_restore of the backup's major, chosen before anything is started or created
    tools = restore_tools(inv, name, chosen.manifest)
    with _sandbox(inv, name, chosen.manifest) as box:
        return _restore_and_verify(
            inv, name, ws, chosen, picked, box, tools, progress, live_required
        )


def _restore_and_verify(
    inv: Inventory,
    name: str,
    ws: workspace.Workspace,
    chosen: Picked,
    picked: float,
    box: _Sandbox,
    tools: PgTools,
    progress: Progress | None,
    live_required: bool,
) -> DrillReport:
    db = inv.database(name)
    live = live_endpoint(inv, name)
    sandbox, max_shrink = box.endpoint, box.max_shrink
    check_address(live, sandbox)
    ref, manifest = chosen.ref, chosen.manifest
    # The guard needs the manifests (production's identity at backup time): read them
    # first, and nothing is written to the sandbox before it has passed.
    guard = guard_sandbox(
        live, sandbox, guard_manifests(inv, name, manifest), live_required=live_required
    )
    require_major(guard, manifest, sandbox)
    cleaned = [*ws.cleaned, *sweep_scratch(sandbox)]  # only now: the guard has passed
    started = time.monotonic() - picked  # the guard's connections are not restore time
    # Count live rows for the drift report while the restore runs: it reads another
    # server, so overlapping it costs the drill nothing.
    pool = ThreadPoolExecutor(1, thread_name_prefix="opsdrill-drift")
    live_counts = pool.submit(_live_stats, live) if guard.live_answered else None
    started_utc = datetime.now(UTC).isoformat(timespec="milliseconds")
    sizes = _live_table_sizes(live) if guard.live_answered and db.restore_jobs > 1 else {}
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
            tools=tools,
            sizes=sizes,
        )
        verify_started = time.monotonic()
        comparison = verify_restored(target, manifest)
        verify_seconds = time.monotonic() - verify_started
    except BaseException:
        if created:
            drop_after_failure(sandbox, scratch)
        raise
    finally:
        pool.shutdown(wait=True)
    # The scratch database holds a full copy of production's data: failing to drop it is
    # an error naming what holds it, never silence.
    drop_database(sandbox, scratch)
    passed = [f"newer backup passed over: {why}" for why in chosen.passed_over]
    notes = [*passed, *cleaned, *box.notes, *guard.notes, *comparison.notes]
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
        passed_over=chosen.passed_over,
        scratch=scratch,
        started_utc=started_utc,
        container=box.container,
        guard=guard.evidence(),
        tools=f"{tools.version} from {tools.source}",
    )
