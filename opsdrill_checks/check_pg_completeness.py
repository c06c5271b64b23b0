"""The newest backup has its manifest, and the stored object still matches it byte for byte."""

from __future__ import annotations

from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill.backups.verdicts import object_findings
from opsdrill.errors import OperationFailed
from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check, attach_json

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill_pytest.targets import PgBackupTarget

COMPLETENESS = Check(
    "pg.backup.completeness",
    "critical",
    f"{RUNBOOK_BACKUP}#completeness",
    "backups",
    "postgres backup integrity",
)

pytestmark = pytest.mark.backups


@COMPLETENESS
def check_newest_backup_is_complete_and_intact(pg_target: PgBackupTarget) -> None:
    allure.dynamic.title(f"{pg_target.name} newest backup has a manifest and matches it")
    newest = pg_target.latest()
    if newest is None:
        COMPLETENESS.fail(pg_target.id, f"no backup objects in {pg_target.where}")
    if newest.manifest_key is None:
        COMPLETENESS.fail(
            pg_target.id,
            f"backup {newest.id} has no manifest: incomplete "
            "(the run failed or is still uploading)",
        )
    if newest.data_key is None:
        COMPLETENESS.fail(pg_target.id, f"backup {newest.id} has a manifest but no data object")
    try:
        manifest = pg_target.manifest(newest)
    except OperationFailed as exc:  # read, and not a manifest: the backup is bad
        COMPLETENESS.fail(
            pg_target.id,
            f"backup {newest.id}: expected a readable manifest, found {exc.message} "
            "(a backup without a valid manifest cannot be verified or trusted)",
        )
    attach_json("manifest summary", manifest.summary())
    attach_json("object metadata", pg_target.object_metadata(newest))
    size, sha256 = pg_target.object_digest(newest)
    want_size, want_sha = manifest.object["size"], manifest.object["sha256"]
    attach_json(
        "object re-read",
        {
            "key": newest.data_key,
            "size": size,
            "sha256": sha256,
            "manifest_size": want_size,
            "manifest_sha256": want_sha,
        },
    )
    COMPLETENESS.fail_with(
        pg_target.id, object_findings(newest.id, want_size, want_sha, size, sha256)
    )
