"""The off-site copy of the files bucket is complete and current."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import allure
import pytest

from fixtures.checks import RUNBOOK_BACKUP, SHOWN, Check, attach_json
from fixtures.files import MirrorTarget

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
    live = mirror_target.live_objects()
    keys = sorted(live)
    missing, differing = [], []
    for rel, (live_sha, off_sha) in mirror_target.parallel(
        lambda k: (mirror_target.live_sha(k), mirror_target.target_sha(k)), keys
    ):
        if off_sha is None:
            missing.append(rel)
        elif off_sha != live_sha:
            differing.append(
                {"key": rel, "live": live_sha[:16], "off_site": off_sha[:16] or "none"}
            )
    attach_json(
        "parity",
        {
            "live_objects": len(keys),
            "missing_count": len(missing),
            "differing_count": len(differing),
            "missing": missing[:SHOWN],
            "differing": differing[:SHOWN],
        },
    )
    allure.dynamic.parameter("live_objects", len(keys))
    if missing or differing:
        shown = ", ".join(repr(k) for k in (missing + [d["key"] for d in differing])[:5])
        PARITY.fail(
            mirror_target.id,
            f"expected all {len(keys)} live files off-site with the same sha256, found "
            f"{len(missing)} missing and {len(differing)} differing (e.g. {shown})",
        )


@LAG
def check_files_older_than_rpo_are_off_site(mirror_target: MirrorTarget) -> None:
    rpo = mirror_target.cfg.rpo_minutes
    allure.dynamic.title(f"{mirror_target.name}: live files older than {rpo:g} min are off-site")
    cutoff = datetime.now(UTC) - timedelta(minutes=rpo)
    live = mirror_target.live_objects()
    due = {k: o for k, o in live.items() if o.last_modified and o.last_modified <= cutoff}
    off = mirror_target.target_objects()
    late = sorted(
        (o.last_modified, k) for k, o in due.items() if k not in off or off[k].size != o.size
    )
    newest_due = max((o.last_modified for o in due.values()), default=None)
    attach_json(
        "lag",
        {
            "rpo_minutes": rpo,
            "cutoff": cutoff,
            "live_objects": len(live),
            "due": len(due),
            "newest_due": newest_due,
            "late_count": len(late),
            "late": [{"key": k, "last_modified": t} for t, k in late[:SHOWN]],
        },
    )
    if late:
        oldest, key = late[0]
        LAG.fail(
            mirror_target.id,
            f"expected every live file older than {rpo:g} min off-site, found {len(late)} "
            f"not mirrored; oldest {key!r} from {oldest:%Y-%m-%d %H:%M}Z",
        )
