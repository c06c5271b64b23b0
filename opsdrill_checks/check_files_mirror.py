"""The off-site copy of the files bucket is complete and current."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill.files.parity import lag, parity
from opsdrill_pytest.checks import RUNBOOK_BACKUP, SHOWN, Check, attach_json

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill_pytest.files import MirrorTarget

PARITY = Check(
    "files.mirror.parity", "critical", f"{RUNBOOK_BACKUP}#files-mirror", "storage", "files mirror"
)
LAG = Check(
    "files.mirror.lag", "normal", f"{RUNBOOK_BACKUP}#files-mirror", "storage", "files mirror"
)

pytestmark = pytest.mark.storage


@PARITY
def check_every_live_file_is_off_site_with_same_content(mirror_target: MirrorTarget) -> None:
    allure.dynamic.title(f"{mirror_target.name}: every live file is off-site with the same sha256")
    found = parity(mirror_target)
    attach_json("parity", found.evidence(SHOWN))
    allure.dynamic.parameter("live_objects", found.live_objects)
    PARITY.fail_with(mirror_target.id, found.findings)


@LAG
def check_files_older_than_rpo_are_off_site(mirror_target: MirrorTarget) -> None:
    rpo = mirror_target.cfg.rpo_minutes
    allure.dynamic.title(f"{mirror_target.name}: live files older than {rpo:g} min are off-site")
    found = lag(mirror_target, datetime.now(UTC), rpo)
    attach_json("lag", found.evidence(SHOWN))
    LAG.fail_with(mirror_target.id, found.findings)
