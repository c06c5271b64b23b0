"""The application's secrets (.env, ENCRYPTION_KEY) are backed up, restorable and current.

Evidence and messages carry key names and salted fingerprints only, never values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import allure
import pytest

from opsdrill.errors import OperationFailed
from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check, attach_json

if TYPE_CHECKING:  # for annotations; the S3 and PostgreSQL clients load when a check runs
    from opsdrill.secrets import bundle
    from opsdrill_pytest.files import BundleTarget

RUNBOOK = f"{RUNBOOK_BACKUP}#secrets-bundle"
FRESH = Check("secrets.bundle.freshness", "critical", RUNBOOK, "backups", "secrets bundle")
DECRYPTS = Check("secrets.bundle.decrypts", "critical", RUNBOOK, "backups", "secrets bundle")
KEY_MATCH = Check("secrets.bundle.encryption_key", "blocker", RUNBOOK, "backups", "secrets bundle")
REQUIRED = Check("secrets.bundle.required_keys", "critical", RUNBOOK, "backups", "secrets bundle")

pytestmark = pytest.mark.secrets


def _newest(target: BundleTarget, check: Check) -> tuple[bundle.BundleRef, bundle.BundleManifest]:
    found = target.newest()
    if found is None:
        check.fail(target.id, "no complete secrets bundle off-site")
    return found


@FRESH
def check_newest_bundle_is_fresh(bundle_target: BundleTarget) -> None:
    rpo = bundle_target.cfg.rpo_minutes
    allure.dynamic.title(f"{bundle_target.name} secrets bundle is younger than {rpo:g} min")
    from opsdrill_pytest.files import age_minutes

    ref, manifest = _newest(bundle_target, FRESH)
    age = age_minutes(ref.taken_at, datetime.now(UTC))
    attach_json(
        "newest bundle",
        {
            "id": ref.id,
            "taken_at": ref.taken_at,
            "keys": sorted(manifest.keys),
            "age_minutes": round(age, 1),
        },
    )
    if age > rpo:
        FRESH.fail(
            bundle_target.id,
            f"expected a bundle younger than {rpo:g} min, found newest {ref.id} {age:.0f} min old",
        )


@DECRYPTS
def check_bundle_decrypts_with_drill_key(bundle_target: BundleTarget) -> None:
    from opsdrill.secrets import bundle

    allure.dynamic.title(f"{bundle_target.name} secrets bundle decrypts with the drill key")
    ref, manifest = _newest(bundle_target, DECRYPTS)
    try:
        values = bundle_target.decrypt(ref)
    except OperationFailed as exc:
        DECRYPTS.fail(bundle_target.id, f"bundle {ref.id}: {exc.message}")
    differing = bundle.differs_from_manifest(values, manifest)
    attach_json(
        "decrypted",
        {"id": ref.id, "keys": sorted(values), "fingerprints_match_manifest": not differing},
    )
    if differing:
        DECRYPTS.fail(
            bundle_target.id,
            f"bundle {ref.id} decrypts but does not match its manifest (keys {differing})",
        )


@KEY_MATCH
def check_encryption_key_matches_live(bundle_target: BundleTarget) -> None:
    from opsdrill.secrets import bundle

    keys = bundle_target.cfg.fingerprint_keys
    allure.dynamic.title(f"{bundle_target.name} backed-up {', '.join(keys)} equals the live one")
    if not keys:  # nothing to compare: never a pass
        pytest.skip(f"secrets.{bundle_target.name}.fingerprint_keys is empty in the inventory")
    ref, manifest = _newest(bundle_target, KEY_MATCH)
    live = bundle_target.live_env()
    problems = bundle.compare_to_live(manifest, live, keys)
    attach_json(
        "fingerprints",
        {
            "id": ref.id,
            "off_site": {k: bundle.short(manifest.keys[k]) for k in keys if k in manifest.keys},
            "live": {
                k: bundle.short(bundle.fingerprint(live[k], manifest.salt))
                for k in keys
                if k in live
            },
        },
    )
    if problems:
        KEY_MATCH.fail(
            bundle_target.id,
            f"bundle {ref.id}: "
            + "; ".join(problems)
            + " — after a restore every encrypted column would be unreadable",
        )


@REQUIRED
def check_required_keys_present(bundle_target: BundleTarget) -> None:
    from opsdrill.secrets import bundle

    required = bundle_target.cfg.required_keys
    allure.dynamic.title(f"{bundle_target.name} secrets bundle holds {', '.join(required)}")
    if not required:  # nothing to look for: never a pass
        pytest.skip(f"secrets.{bundle_target.name}.required_keys is empty in the inventory")
    ref, manifest = _newest(bundle_target, REQUIRED)
    missing = bundle.missing_required(manifest.keys, required)
    attach_json(
        "keys",
        {"id": ref.id, "present": sorted(manifest.keys), "required": required, "missing": missing},
    )
    if missing:
        REQUIRED.fail(
            bundle_target.id, f"bundle {ref.id}: expected keys {required}, missing {missing}"
        )
