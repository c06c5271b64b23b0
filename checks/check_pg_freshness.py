"""The newest complete backup is younger than the database's RPO."""

from __future__ import annotations

from datetime import UTC, datetime

import allure
import pytest

from fixtures.checks import RUNBOOK_BACKUP, Check, attach_json
from fixtures.targets import PgBackupTarget

FRESHNESS = Check(
    "pg.backup.freshness",
    "critical",
    f"{RUNBOOK_BACKUP}#freshness",
    "backups",
    "postgres backup freshness",
)

pytestmark = pytest.mark.backups


@FRESHNESS
def check_newest_backup_is_within_rpo(pg_target: PgBackupTarget) -> None:
    rpo = pg_target.db.rpo_minutes
    allure.dynamic.title(f"{pg_target.name} backup is younger than {rpo:g} min")
    refs = pg_target.backups()
    newest = refs[-1] if refs else None
    done = [r for r in refs if r.complete]
    attach_json(
        "backups (newest 10)",
        [
            {"id": r.id, "taken_at": r.taken_at, "size": r.size, "complete": r.complete}
            for r in refs[-10:]
        ],
    )
    if not done:
        extra = f"; {len(refs)} incomplete (no manifest)" if refs else ""
        FRESHNESS.fail(pg_target.id, f"no complete backup in {pg_target.where}{extra}")
    latest = done[-1]
    age_min = (datetime.now(UTC) - latest.taken_at).total_seconds() / 60
    allure.dynamic.parameter("age_minutes", round(age_min, 1))
    if age_min > rpo:
        note = ""
        if newest is not None and not newest.complete:
            note = f"; a newer backup {newest.id} is incomplete (no manifest)"
        FRESHNESS.fail(
            pg_target.id,
            f"expected a complete backup younger than {rpo:g} min (RPO), found newest "
            f"{latest.id} {age_min:.0f} min old{note}",
        )
