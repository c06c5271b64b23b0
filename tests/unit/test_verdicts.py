"""What the checks judge, computed by the library (issue 15): each check only selects the
findings it covers and fails with them, so every judgement is tested here without pytest's
check machinery, Allure or a target. The messages are the checks' own, word for word (the
fault tests assert them against the real servers)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from opsdrill.backups.catalog import BackupRef
from opsdrill.backups.verdicts import encryption_findings, freshness, object_findings
from opsdrill.config.mail import DmarcExpectation, Migration
from opsdrill.dns.discovery import Discovery, discovery_findings
from opsdrill.dns.dmarc import DmarcReport
from opsdrill.dns.spf import SpfReport
from opsdrill.dns.suite import (
    DomainExpectations,
    migration_missing,
    migration_rua_findings,
    providers_missing,
)
from opsdrill.files.parity import lag, parity
from opsdrill.gpg import PacketInfo
from opsdrill.mail.suite import from_findings
from opsdrill.secrets.bundle import BundleManifest, differs_from_manifest, fingerprint

T = TypeVar("T")
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FPR_A, FPR_B = "A" * 40, "B" * 40


# -- backups: encryption, the object, freshness ---------------------------------------------
def packets(fmt: str = "openpgp", ids: list[str] | None = None, data: bool = True) -> PacketInfo:
    return PacketInfo(format=fmt, recipient_key_ids=ids or [], encrypted_data=data)


EXPECTED = {FPR_A: ["AAAA1111"], FPR_B: ["BBBB2222", "BBBB3333"]}


def test_encryption_to_exactly_the_recipients_is_no_finding() -> None:
    assert encryption_findings("crm-1", packets(ids=["AAAA1111", "BBBB3333"]), EXPECTED) == []


def test_unencrypted_data_is_the_one_finding() -> None:
    (only,) = encryption_findings("crm-1", packets("zstd", data=False), EXPECTED)
    assert only.code == "backup.encryption.format"
    assert only.message == (
        "backup crm-1: expected OpenPGP, found zstd data: the backup is stored unencrypted"
    )


def test_key_ids_match_recipients_by_subkey_and_name_the_missing_and_unexpected() -> None:
    findings = encryption_findings("crm-1", packets(ids=["AAAA1111", "EEEE9999"]), EXPECTED)
    assert [f.code for f in findings] == ["backup.encryption.recipients"]
    assert findings[0].message == (
        f"backup crm-1: expected recipients ['{FPR_A}', '{FPR_B}'], found key ids "
        f"['AAAA1111', 'EEEE9999'] (missing: ['{FPR_B}'], unexpected: ['EEEE9999'])"
    )


def test_key_packets_without_encrypted_data_come_after_the_recipients() -> None:
    findings = encryption_findings("crm-1", packets(ids=["EEEE9999"], data=False), EXPECTED)
    assert [f.code for f in findings] == [
        "backup.encryption.recipients",
        "backup.encryption.no_data",
    ]
    assert findings[1].message == "backup crm-1: no encrypted data packet follows the key packets"


def test_the_object_is_judged_by_size_first_then_by_digest() -> None:
    sha = hashlib.sha256(b"dump").hexdigest()
    other = hashlib.sha256(b"pmud").hexdigest()
    assert object_findings("crm-1", 4, sha, 4, sha) == []
    (size,) = object_findings("crm-1", 4, sha, 3, other)  # truncated: the size says it
    assert size.message == (
        "backup crm-1: expected 4 bytes (manifest), found 3 (truncated or replaced)"
    )
    (digest,) = object_findings("crm-1", 4, sha, 4, other)
    assert digest.code == "backup.object.sha256"
    assert digest.message == (
        f"backup crm-1: expected sha256 {sha[:16]}... (manifest), found {other[:16]}... "
        "(object corrupted)"
    )


def ref(minutes_ago: float, complete: bool = True, name: str = "") -> BackupRef:
    taken = NOW - timedelta(minutes=minutes_ago)
    return BackupRef(
        id=name or f"crm-{taken:%H%M}",
        database="crm",
        taken_at=taken,
        data_key="d",
        manifest_key="m" if complete else None,
    )


def test_freshness_names_the_newest_complete_backup_and_a_newer_incomplete_one() -> None:
    fresh = freshness([ref(90), ref(30)], NOW, 60, "s3/bucket/crm/")
    assert fresh.findings == [] and fresh.age_minutes == pytest.approx(30)
    stale = freshness([ref(90, name="crm-old"), ref(5, False, "crm-new")], NOW, 60, "w")
    assert stale.age_minutes == pytest.approx(90)
    assert [f.message for f in stale.findings] == [
        "expected a complete backup younger than 60 min (RPO), found newest crm-old 90 min "
        "old; a newer backup crm-new is incomplete (no manifest)"
    ]
    nothing = freshness([ref(5, False)], NOW, 60, "s3/bucket/crm/")
    assert nothing.newest is None and nothing.age_minutes is None
    assert [f.message for f in nothing.findings] == [
        "no complete backup in s3/bucket/crm/; 1 incomplete (no manifest)"
    ]
    assert freshness([], NOW, 60, "w").findings[0].message == "no complete backup in w"


# -- files: parity and lag, over fake stores -------------------------------------------------
class FakeStores:
    """The reading side of ``MirrorStores``: listings and the sha256 of each side."""

    def __init__(self, live: dict[str, bytes], off: dict[str, bytes], age_minutes: float = 90):
        self.live, self.off = live, off
        self.modified = NOW - timedelta(minutes=age_minutes)

    def _listing(self, objects: dict[str, bytes]) -> dict[str, Any]:
        return {
            k: SimpleNamespace(last_modified=self.modified, size=len(v)) for k, v in objects.items()
        }

    def live_objects(self) -> dict[str, Any]:
        return self._listing(self.live)

    def target_objects(self) -> dict[str, Any]:
        return self._listing(self.off)

    def live_sha(self, rel: str) -> str:
        return hashlib.sha256(self.live[rel]).hexdigest()

    def target_sha(self, rel: str) -> str | None:
        body = self.off.get(rel)
        return None if body is None else hashlib.sha256(body).hexdigest()

    def parallel(self, fn: Callable[[str], T], keys: list[str]) -> Iterator[tuple[str, T]]:
        return iter([(k, fn(k)) for k in keys])


def test_parity_compares_the_bytes_on_both_sides() -> None:
    same = FakeStores({"a.pdf": b"1", "b/c.txt": b"2"}, {"a.pdf": b"1", "b/c.txt": b"2"})
    assert parity(same).findings == [] and parity(same).live_objects == 2
    broken = FakeStores({"a.pdf": b"1", "b/../c.txt": b"2", "d": b"3"}, {"a.pdf": b"1", "d": b"X"})
    found = parity(broken)
    assert found.missing == ["b/../c.txt"] and [d["key"] for d in found.differing] == ["d"]
    assert [f.message for f in found.findings] == [
        "expected all 3 live files off-site with the same sha256, found 1 missing and 1 "
        "differing (e.g. 'b/../c.txt', 'd')"
    ]
    assert found.evidence(1)["missing_count"] == 1


def test_lag_lists_live_files_older_than_the_rpo_missing_off_site() -> None:
    assert lag(FakeStores({"a": b"1"}, {"a": b"1"}), NOW, 60).findings == []
    assert lag(FakeStores({"a": b"1"}, {}, age_minutes=10), NOW, 60).findings == []  # not due
    late = lag(FakeStores({"a": b"1", "b": b"22"}, {"b": b"2"}), NOW, 60)
    assert late.due == 2 and [k for _, k in late.late] == ["a", "b"]  # b: other size
    assert [f.message for f in late.findings] == [
        "expected every live file older than 60 min off-site, found 2 not mirrored; oldest "
        "'a' from 2026-03-01 10:30Z"
    ]


# -- mail: the From of an application's message ----------------------------------------------
@pytest.mark.parametrize(
    ("header", "finding"),
    [
        (['"Example CRM" <CRM@Example.test>'], None),
        (["crm@example.test, other@example.test"], "crm@example.test, other@example.test"),
        (["noreply@elsewhere.test"], "noreply@elsewhere.test"),
        ([], "no From"),
    ],
)
def test_from_is_exactly_the_expected_address_case_folded(
    header: list[str], finding: str | None
) -> None:
    result: Any = SimpleNamespace(headers={"From": header} if header else {})
    found = from_findings(result, "crm@example.test")
    if finding is None:
        assert found == []
    else:
        assert [f.message for f in found] == [f"expected From crm@example.test, found {finding}"]
    assert from_findings(result, None) == []  # nothing expected: nothing judged


# -- dns: discovery and the migration's notes ------------------------------------------------
def test_discovery_names_unlisted_domains_then_values_that_are_no_domain() -> None:
    found = Discovery(
        database="crm",
        where="127.0.0.1:5432/crm",
        query="SELECT 1",
        domains=frozenset({"example.test", "portal.example.test", "new.example.test"}),
        rows=4,
        empty=0,
        invalid=("not a domain",),
    )
    findings = discovery_findings(found, {"example.test", "portal.example.test"})
    assert [f.code for f in findings] == ["discovery.unlisted", "discovery.invalid"]
    assert findings[0].message == (
        "domain new.example.test sends mail but the inventory says nothing about which "
        'provider sends for it (fix: add [sending_domains."new.example.test"] with its '
        "providers)"
    )
    assert findings[1].message.startswith("value 'not a domain' from the discovery query")


def expectations(**kw: Any) -> DomainExpectations:
    base: dict[str, Any] = {
        "domain": "example.test",
        "now": NOW,
        "providers": {"google": ("include:_spf.google.com",), "ses": ("include:amazonses.com",)},
        "selectors": (),
        "sending_ips": (),
        "receives_mail": True,
        "forbidden_mx": (),
        "min_rsa_bits": 2048,
        "dmarc": DmarcExpectation(),
    }
    return DomainExpectations(**{**base, **kw})


def test_spf_notes_name_the_providers_a_missing_mechanism_is_for() -> None:
    report = SpfReport(domain="example.test", required_found={"include:_spf.google.com": "@"})
    assert providers_missing(report, expectations()) == [
        "include:amazonses.com is needed by provider ses"
    ]
    move = Migration.model_validate({"from": "google", "to": "ses", "until": NOW})
    exp = expectations(
        migration=move,
        migration_ends={"google": ("include:_spf.google.com", "a"), "ses": ("a",)},
    )
    assert migration_missing(report, exp) == ["a for provider google", "a for provider ses"]


def test_a_migration_needs_rua_whatever_the_inventory_requires() -> None:
    without = DmarcReport(domain="example.test", name="_dmarc.example.test", record="v=DMARC1")
    (only,) = migration_rua_findings(without)
    assert only.code == "dmarc.rua_missing"
    assert "no rua= URI (the inventory does not require one, the migration does)" in only.message
    with_rua = DmarcReport(
        domain="example.test", name="_dmarc.example.test", record="v=DMARC1", rua=["mailto:x@y"]
    )
    assert migration_rua_findings(with_rua) == []
    none = DmarcReport(domain="example.test", name="_dmarc.example.test")
    assert migration_rua_findings(none) == []  # no record: dns.dmarc.record says so


# -- secrets: a decrypted bundle against its manifest ----------------------------------------
def test_a_decrypted_bundle_matches_its_manifest_by_fingerprint() -> None:
    salt = "s4lt"
    manifest = BundleManifest(
        id="app-1",
        name="app",
        taken_at="2026-03-01T12:00:00Z",
        object={},
        salt=salt,
        keys={"A": fingerprint("1", salt), "B": fingerprint("2", salt)},
        source="env_file",
    )
    assert differs_from_manifest({"A": "1", "B": "2"}, manifest) == []
    assert differs_from_manifest({"A": "1", "B": "X"}, manifest) == ["B"]
    assert differs_from_manifest({"A": "1"}, manifest) == ["B"]
    assert differs_from_manifest({"A": "1", "B": "2", "C": "3"}, manifest) == ["C"]
