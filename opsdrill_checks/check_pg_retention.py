"""The off-site store holds exactly what the retention policy requires.

Judged the way prune judges (opsdrill.backups.prune.examine): every manifest is read, so a bad one
fills no slot here either, and the host clock is checked against the store's first. A
host clock that disagrees with the store's makes every age wrong, so the check is broken
(could not judge), not failed: the store may be fine.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill.backups.catalog import BackupRef
from opsdrill.backups.retention import audit
from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check, attach_json, attach_text

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill_pytest.targets import PgBackupTarget

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
    from opsdrill.backups.prune import ClockSkew, examine, policy_for

    policy = policy_for(pg_target.inv)
    allure.dynamic.title(
        f"{pg_target.name} keeps {policy.hourly_days} days hourly and "
        f"{policy.daily_days} days daily backups"
    )
    try:
        refs, clocks = examine(
            pg_target.s3,
            pg_target.store_name,
            pg_target.store,
            pg_target.name,
            what="judge retention",
            outcome="the stored backups were not judged",
        )
    except ClockSkew as exc:
        attach_json("clocks", exc.clocks.as_evidence())
        raise
    if clocks is not None:
        attach_json("clocks", clocks.as_evidence())
    # Nothing stored: no age to judge, and no store clock to read it by.
    now = clocks.host if clocks is not None else datetime.now(UTC)
    findings = audit(refs, now, policy)
    attach_text("stored backups", "\n".join(f"{r.id} {_state(r)} {r.size}" for r in refs))
    attach_json("findings", [f.__dict__ for f in findings])
    if findings:
        kinds: dict[str, int] = {}
        for f in findings:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        head = "; ".join(f.message for f in findings[:SHOWN])
        more = f"; ... {len(findings) - SHOWN} more" if len(findings) > SHOWN else ""
        RETENTION.fail(pg_target.id, f"retention policy violated ({kinds}): {head}{more}")


def _state(ref: BackupRef) -> str:
    if not ref.complete:
        return "INCOMPLETE"
    return "good" if ref.good else f"BAD ({ref.problem})"
