"""The mirror cannot lose off-site data: deletes and overwrites on live leave it intact.

Both checks write a canary under the mirror's reserved prefix on the live bucket, run the
real mirror, and clean up after themselves (live and every off-site version).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check, attach_json

if TYPE_CHECKING:  # the facade, for annotations; the plugin loads it with the targets
    from opsdrill_pytest.files import MirrorTarget

DELETES = Check(
    "files.mirror.delete_protection",
    "critical",
    f"{RUNBOOK_BACKUP}#files-mirror",
    "storage",
    "files mirror protection",
)
OVERWRITES = Check(
    "files.mirror.overwrite_protection",
    "critical",
    f"{RUNBOOK_BACKUP}#files-mirror",
    "storage",
    "files mirror protection",
)

pytestmark = pytest.mark.storage


@DELETES
def check_delete_on_live_keeps_off_site_copy(mirror_target: MirrorTarget) -> None:
    allure.dynamic.title(f"{mirror_target.name}: a file deleted on live stays off-site")
    rel = mirror_target.canary_key("delete")
    try:
        mirror_target.put_live(rel, b"opsdrill delete-protection canary\n")
        first = mirror_target.run()
        if mirror_target.target_sha(rel) is None:
            DELETES.fail(
                mirror_target.id,
                f"canary {rel!r} was not mirrored at all "
                f"({first.line()}); cannot judge delete protection",
            )
        mirror_target.remove_live(rel)
        second = mirror_target.run()
        survived = mirror_target.target_sha(rel) is not None
        attach_json(
            "canary",
            {
                "key": rel,
                "first_run": first.line(),
                "after_delete_run": second.line(),
                "off_site_after": survived,
            },
        )
        if not survived:
            DELETES.fail(
                mirror_target.id,
                f"expected the off-site copy of {rel!r} to survive "
                "its deletion on live, found it deleted by the mirror "
                f"(delete_mode = {mirror_target.cfg.delete_mode!r})",
            )
    finally:
        mirror_target.remove_live(rel)
        mirror_target.purge_target(rel)


@OVERWRITES
def check_overwrite_on_live_keeps_previous_content(mirror_target: MirrorTarget) -> None:
    allure.dynamic.title(
        f"{mirror_target.name}: an overwritten file's previous content stays recoverable off-site"
    )
    status = mirror_target.versioning()
    rel = mirror_target.canary_key("overwrite")
    try:
        mirror_target.put_live(rel, b"version one: the last good copy\n")
        mirror_target.run()
        mirror_target.put_live(rel, b"version two: ransomware was here\n")
        mirror_target.run()
        versions = mirror_target.target_versions(rel)
        attach_json(
            "canary",
            {
                "key": rel,
                "target_versioning": status,
                "off_site_versions": [
                    {"version_id": v.version_id, "size": v.size, "last_modified": v.last_modified}
                    for v in versions
                ],
            },
        )
        if len(versions) < 2:
            OVERWRITES.fail(
                mirror_target.id,
                f"expected the previous content of {rel!r} recoverable off-site after an "
                f"overwrite, found {len(versions)} version(s); target bucket versioning is "
                f"{status or 'off'} (an overwrite on live destroys the last good copy)",
            )
    finally:
        mirror_target.remove_live(rel)
        mirror_target.purge_target(rel)
