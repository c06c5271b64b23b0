"""The newest complete backup is younger than the database's RPO."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill.backups.verdicts import freshness
from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check, attach_json

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill_pytest.targets import PgBackupTarget

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
    attach_json(
        "backups (newest 10)",
        [
            {"id": r.id, "taken_at": r.taken_at, "size": r.size, "complete": r.complete}
            for r in refs[-10:]
        ],
    )
    found = freshness(refs, datetime.now(UTC), rpo, pg_target.where)
    if found.age_minutes is not None:
        allure.dynamic.parameter("age_minutes", round(found.age_minutes, 1))
    FRESHNESS.fail_with(pg_target.id, found.findings)
