"""What the backup checks judge, as findings (``opsdrill.findings``): the newest backup's
age against the RPO, the stored object against its manifest, and its OpenPGP packets
against the recipients. The checks only select and fail with these; the inputs are what
the stores answered, so each judgement is unit-tested without a store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from opsdrill.backups.catalog import BackupRef
from opsdrill.findings import Finding
from opsdrill.gpg import PacketInfo


@dataclass(frozen=True)
class Freshness:
    """The newest complete backup (None: there is none) and how old it is."""

    newest: BackupRef | None
    age_minutes: float | None
    findings: list[Finding] = field(default_factory=list)


def freshness(
    refs: Sequence[BackupRef], now: datetime, rpo_minutes: float, where: str
) -> Freshness:
    """Whether the newest complete backup of ``refs`` (oldest first) is younger than the
    RPO; a newer incomplete one is named, as it explains a gap (``where``: the store)."""
    done = [r for r in refs if r.complete]
    if not done:
        extra = f"; {len(refs)} incomplete (no manifest)" if refs else ""
        return Freshness(
            None, None, [Finding("backup.none_complete", f"no complete backup in {where}{extra}")]
        )
    latest = done[-1]
    age = (now - latest.taken_at).total_seconds() / 60
    if age <= rpo_minutes:
        return Freshness(latest, age)
    newest = refs[-1]
    note = "" if newest.complete else f"; a newer backup {newest.id} is incomplete (no manifest)"
    message = (
        f"expected a complete backup younger than {rpo_minutes:g} min (RPO), found newest "
        f"{latest.id} {age:.0f} min old{note}"
    )
    return Freshness(latest, age, [Finding("backup.stale", message)])


def object_findings(
    backup_id: str, want_size: int, want_sha256: str, size: int, sha256: str
) -> list[Finding]:
    """The stored object (re-read: ``size``, ``sha256``) against its manifest's. A size
    that differs is the one finding: the digest of a truncated object differs too."""
    if size != want_size:
        return [
            Finding(
                "backup.object.size",
                f"backup {backup_id}: expected {want_size} bytes (manifest), found {size} "
                "(truncated or replaced)",
            )
        ]
    if sha256 != want_sha256:
        return [
            Finding(
                "backup.object.sha256",
                f"backup {backup_id}: expected sha256 {want_sha256[:16]}... (manifest), found "
                f"{sha256[:16]}... (object corrupted)",
            )
        ]
    return []


def encryption_findings(
    backup_id: str, info: PacketInfo, expected: Mapping[str, Sequence[str]]
) -> list[Finding]:
    """A backup object's packets against the recipients: OpenPGP, encrypted to exactly
    the expected keys (``expected``: fingerprint -> the key ids its packets may carry,
    ``GpgHome.encryption_key_ids``), followed by encrypted data. Most fundamental first:
    data that is not OpenPGP has no recipients to compare."""
    if info.format != "openpgp":
        return [
            Finding(
                "backup.encryption.format",
                f"backup {backup_id}: expected OpenPGP, found {info.format} data: the backup "
                "is stored unencrypted",
            )
        ]
    found = set(info.recipient_key_ids)
    missing = [fpr for fpr, ids in expected.items() if not set(ids) & found]
    known = {k for ids in expected.values() for k in ids}
    unexpected = sorted(found - known)
    findings = []
    if missing or unexpected:
        findings.append(
            Finding(
                "backup.encryption.recipients",
                f"backup {backup_id}: expected recipients {sorted(expected)}, found key ids "
                f"{info.recipient_key_ids} (missing: {missing or 'none'}, "
                f"unexpected: {unexpected or 'none'})",
            )
        )
    if not info.encrypted_data:
        findings.append(
            Finding(
                "backup.encryption.no_data",
                f"backup {backup_id}: no encrypted data packet follows the key packets",
            )
        )
    return findings
