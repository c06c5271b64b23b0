"""The backup role can read everything pg_dump reads: tables, sequences, large objects,
and tables with row-level security. Judged from the catalog, without reading data, so a
grant that is missing (or a large object the application created since the last backup)
shows here before it breaks the next hourly backup."""

from __future__ import annotations

from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check, attach_json

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill_pytest.targets import PgBackupTarget

PRIVILEGES = Check(
    "pg.backup.privileges",
    "critical",
    f"{RUNBOOK_BACKUP}#privileges",
    "backups",
    "postgres backup privileges",
)

pytestmark = pytest.mark.backups


@PRIVILEGES
def check_backup_role_can_read_everything(pg_target: PgBackupTarget) -> None:
    from opsdrill.backups import preflight
    from opsdrill.backups.backup import live_endpoint

    endpoint = live_endpoint(pg_target.inv, pg_target.name)
    role = endpoint.params.get("user", "the connecting role")
    allure.dynamic.title(
        f"{pg_target.name}: backup role {role} can read every table, sequence and large object"
    )
    with endpoint.connect(autocommit=True) as conn:
        found = preflight.check_privileges(conn)
    attach_json("privileges of the backup role", found.evidence())
    allure.dynamic.parameter("role", found.role)
    if not found.ok:
        PRIVILEGES.fail(
            pg_target.id,
            f"expected role {found.role} to read everything pg_dump reads in "
            f"{endpoint.where}, found {found.summary()} (backups or drills fail on these "
            "until fixed)",
        )
