"""The newest backup is OpenPGP-encrypted to exactly the inventory's recipients."""

from __future__ import annotations

from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill.backups.verdicts import encryption_findings
from opsdrill.gpg import GpgHome, inspect
from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check, attach_json

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill_pytest.targets import PgBackupTarget

ENCRYPTION = Check(
    "pg.backup.encryption",
    "critical",
    f"{RUNBOOK_BACKUP}#encryption",
    "backups",
    "postgres backup encryption",
)

pytestmark = pytest.mark.backups


@ENCRYPTION
def check_newest_backup_is_encrypted_to_recipients(pg_target: PgBackupTarget) -> None:
    allure.dynamic.title(f"{pg_target.name} newest backup is encrypted to the backup key")
    gpg_cfg = pg_target.inv.model.gpg
    if not pg_target.db.encrypt or gpg_cfg is None:
        pytest.skip(f"databases.{pg_target.name}.encrypt = false in the inventory")
    newest = pg_target.latest_complete()
    if newest is None:
        ENCRYPTION.fail(pg_target.id, f"no complete backup in {pg_target.where}")
    head = pg_target.object_head(newest)
    with GpgHome() as home:
        home.import_keys(
            pg_target.inv.resolve_path(gpg_cfg.public_keys_file), what="gpg.public_keys_file"
        )
        expected = home.encryption_key_ids(gpg_cfg.recipients)
        info = inspect(head, home)
    attach_json(
        "packets",
        {
            "object": newest.data_key,
            "format": info.format,
            "recipient_key_ids": info.recipient_key_ids,
            "expected_key_ids": expected,
            "encrypted_data_packet": info.encrypted_data,
        },
    )
    # the most fundamental finding alone: a wrong format makes the others meaningless
    ENCRYPTION.fail_with(pg_target.id, encryption_findings(newest.id, info, expected)[:1])
