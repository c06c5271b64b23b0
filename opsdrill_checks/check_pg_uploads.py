"""No multipart upload left open under a database's backups for more than a day.

An upload that is neither completed nor aborted keeps its parts on the store, billed and
invisible to ``list``, for ever: a backup killed outright (SIGKILL, OOM, a reboot) or one
whose abort could not reach the store leaves one. The next backup of the database aborts
them; this check catches the case where there is no next backup, or it cannot.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill.backups import catalog
from opsdrill_pytest.checks import RUNBOOK_BACKUP, SHOWN, Check, attach_json

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill_pytest.targets import PgBackupTarget

DANGLING = Check(
    "pg.backup.dangling_uploads",
    "normal",
    f"{RUNBOOK_BACKUP}#dangling-uploads",
    "backups",
    "postgres backup integrity",
)

pytestmark = pytest.mark.backups


@DANGLING
def check_no_dangling_uploads(pg_target: PgBackupTarget) -> None:
    from opsdrill.backups import uploads

    hours = uploads.DANGLING_AFTER.total_seconds() / 3600
    allure.dynamic.title(f"{pg_target.name}: no multipart upload open for more than {hours:g} h")
    now = datetime.now(UTC)
    found = pg_target.open_uploads()
    dangling = uploads.older_than(found, uploads.DANGLING_AFTER, now)
    sizes = {u.upload_id: pg_target.upload_size(u) for u in dangling[:SHOWN]}
    attach_json(
        "open multipart uploads",
        {
            "where": pg_target.where,
            "older_than_hours": hours,
            "open": len(found),
            "dangling": [
                {
                    "key": u.key,
                    "upload_id": u.upload_id,
                    "initiated": u.initiated,
                    "parts_bytes": sizes.get(u.upload_id),
                    "a backup of this database": catalog.is_backup_key(pg_target.name, u.key),
                }
                for u in dangling[:SHOWN]
            ],
        },
    )
    if dangling:
        shown = "; ".join(u.describe() for u in dangling[:3])
        more = f" and {len(dangling) - 3} more" if len(dangling) > 3 else ""
        mib = sum(sizes.values()) / 2**20
        DANGLING.fail(
            pg_target.id,
            f"expected no multipart upload open for more than {hours:g} h in "
            f"{pg_target.where}, found {len(dangling)} holding {mib:.1f} MiB of parts: "
            f"{shown}{more} (an interrupted backup; the next backup of {pg_target.name} "
            "aborts those of its own backups, abort any other by hand)",
        )
