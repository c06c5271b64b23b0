"""The off-site store holds exactly what the retention policy requires."""

from __future__ import annotations

from datetime import UTC, datetime

import allure
import pytest

from fixtures.checks import RUNBOOK_BACKUP, Check, attach_json, attach_text
from fixtures.targets import PgBackupTarget
from opsdrill.prune import policy_for
from opsdrill.retention import audit

RETENTION = Check(
    "pg.backup.retention",
    "normal",
    f"{RUNBOOK_BACKUP}#retention",
    "backups",
    "postgres backup retention",
)
SHOWN = 10

pytestmark = pytest.mark.backups


@RETENTION
def check_retention_matches_policy(pg_target: PgBackupTarget) -> None:
    policy = policy_for(pg_target.inv)
    allure.dynamic.title(
        f"{pg_target.name} keeps {policy.hourly_days} days hourly and "
        f"{policy.daily_days} days daily backups"
    )
    refs = pg_target.backups()
    findings = audit(refs, datetime.now(UTC), policy)
    attach_text(
        "stored backups",
        "\n".join(f"{r.id} {'complete' if r.complete else 'INCOMPLETE'} {r.size}" for r in refs),
    )
    attach_json("findings", [f.__dict__ for f in findings])
    if findings:
        kinds: dict[str, int] = {}
        for f in findings:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        head = "; ".join(f.message for f in findings[:SHOWN])
        more = f"; ... {len(findings) - SHOWN} more" if len(findings) > SHOWN else ""
        RETENTION.fail(pg_target.id, f"retention policy violated ({kinds}): {head}{more}")
