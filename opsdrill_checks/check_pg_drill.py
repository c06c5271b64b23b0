"""Restore drill: the newest backup restores into the sandbox and matches its manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill.backups.manifest import Manifest
from opsdrill.errors import OperationFailed, RefusedError, TargetUnreachable
from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check, attach_json, attach_text, table

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill.backups.drill import DrillReport
    from opsdrill_pytest.targets import PgBackupTarget

SANDBOX_GUARD = Check(
    "pg.drill.sandbox_guard",
    "blocker",
    f"{RUNBOOK_BACKUP}#weekly-drill",
    "backups",
    "restore drill",
)
RESTORE = Check(
    "pg.drill.restore", "critical", f"{RUNBOOK_BACKUP}#weekly-drill", "backups", "restore drill"
)
RTO = Check("pg.drill.rto", "normal", f"{RUNBOOK_BACKUP}#weekly-drill", "backups", "restore drill")
DRIFT = Check(
    "pg.drill.drift", "normal", f"{RUNBOOK_BACKUP}#weekly-drill", "backups", "restore drill"
)

pytestmark = [pytest.mark.backups, pytest.mark.drill]


def _report(pg_target: PgBackupTarget, check: Check) -> DrillReport:
    """The one drill of this run (the facade runs it once per process): every drill check
    attaches the same "drill" evidence, which names the scratch database it restored."""
    from opsdrill.backups.sandbox_guard import SandboxUnproven

    try:
        report = pg_target.drill()
        attach_json("drill", report.evidence())
        return report
    except SandboxUnproven:
        raise  # the sandbox's identity could not be established: broken, not a verdict
    except RefusedError as exc:
        check.fail(pg_target.id, f"drill refused: {exc.message}")
    except OperationFailed as exc:  # the backup itself is bad: a verification failure
        check.fail(pg_target.id, f"drill failed at {exc.message}")


@SANDBOX_GUARD
def check_sandbox_is_not_production(pg_target: PgBackupTarget) -> None:
    """Judged as the drill judges: failed when the sandbox has the live server's address,
    or the system identifier of the live server or of a recent backup's manifest; broken
    when its identity cannot be established. The live server need not answer: the newest
    manifest names production's identity (then the evidence says live was not compared).
    """
    from opsdrill.backups.backup import live_endpoint
    from opsdrill.backups.drill import pick_for_drill
    from opsdrill.backups.sandbox_guard import (
        SandboxIsProduction,
        SandboxRefused,
        guard_manifests,
        guard_sandbox,
        sandbox_endpoint,
    )

    allure.dynamic.title(f"{pg_target.name} drill sandbox is not the live server")
    box = pg_target.db.sandbox
    if box is not None and box.container is not None:
        # A container sandbox exists only inside a drill, which guards it: judge the guard
        # of this run's one drill (a refusal there fails or breaks this check the same way).
        report = _report(pg_target, SANDBOX_GUARD)
        attach_json("identities compared", report.guard)
        allure.dynamic.parameter("sandbox", f"container {box.container}")
        return
    sandbox, _ = sandbox_endpoint(pg_target.inv, pg_target.name)
    live = live_endpoint(pg_target.inv, pg_target.name)
    restoring: Manifest | None = None
    notes: list[str] = []
    try:  # the manifest the drill would restore; without it, live alone can still judge
        restoring = pick_for_drill(pg_target.inv, pg_target.name, None).manifest
    except (OperationFailed, TargetUnreachable) as exc:
        notes.append(f"no manifest to compare with: {exc.message}")
    manifests = guard_manifests(pg_target.inv, pg_target.name, restoring, notes)
    try:
        guard = guard_sandbox(live, sandbox, manifests, live_required=False)
    except SandboxRefused as exc:
        attach_json("identities compared", exc.evidence)
        if isinstance(exc, SandboxIsProduction):
            SANDBOX_GUARD.fail(pg_target.id, exc.message)
        raise  # SandboxUnproven: nothing is known about the sandbox
    allure.dynamic.parameter("live", "compared" if guard.live_answered else "did not answer")
    attach_json("identities compared", guard.evidence())
    if guard.notes:
        attach_text("notes", "\n".join(guard.notes))


@RESTORE
def check_drill_restores_exactly(pg_target: PgBackupTarget) -> None:
    allure.dynamic.title(f"{pg_target.name} newest backup restores and matches its manifest")
    report = _report(pg_target, RESTORE)
    allure.dynamic.parameter("backup", report.backup_id)
    if report.passed_over:  # never silently an older backup (completeness fails on these)
        allure.dynamic.parameter("newer_passed_over", len(report.passed_over))
    attach_json("manifest summary", report.manifest.summary())
    attach_text("row counts: manifest vs restored", table(report.comparison.rows))
    if report.notes:
        attach_text("notes", "\n".join(report.notes))
    if not report.comparison.exact:
        shown = "; ".join(report.comparison.mismatches[:10])
        more = len(report.comparison.mismatches) - 10
        RESTORE.fail(
            pg_target.id,
            f"backup {report.backup_id} restored but differs from its "
            f"manifest: {shown}" + (f"; ... {more} more" if more > 0 else ""),
        )


@RTO
def check_drill_within_rto(pg_target: PgBackupTarget) -> None:
    rto = pg_target.db.rto_minutes
    allure.dynamic.title(f"{pg_target.name} restore drill finishes within {rto:g} min (RTO)")
    report = _report(pg_target, RTO)
    allure.dynamic.parameter("drill_seconds", round(report.total_seconds, 1))
    attach_json(
        "timings",
        {
            "restore_seconds": report.restore_seconds,
            "verify_seconds": report.verify_seconds,
            "total_seconds": report.total_seconds,
            "rto_seconds": report.rto_seconds,
        },
    )
    if not report.within_rto:
        RTO.fail(
            pg_target.id,
            f"expected the drill within {rto:g} min (RTO), "
            f"found {report.total_seconds / 60:.1f} min ({report.total_seconds:.1f}s)",
        )


@DRIFT
def check_live_has_not_shrunk_since_backup(pg_target: PgBackupTarget) -> None:
    allure.dynamic.title(
        f"{pg_target.name} live tables have not shrunk suspiciously since the backup"
    )
    report = _report(pg_target, DRIFT)
    drift = report.drift
    if drift is None:  # the live server could not be counted: nothing to compare
        raise TargetUnreachable(
            f"{pg_target.id}: live tables not compared with backup {report.backup_id}: "
            + "; ".join(report.notes or ["the live server was not counted"])
        )
    attach_text("drift: backup vs live", table(drift.rows))
    if drift.suspicious:
        DRIFT.fail(
            pg_target.id,
            "live data shrank since backup "
            f"{report.backup_id}: " + "; ".join(drift.suspicious[:10]),
        )
