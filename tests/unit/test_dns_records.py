"""Unit tests of opsdrill.dns: every finding, from zone data served by the fake resolver,
plus DnsResolver against a tiny in-process UDP responder (timeouts, REFUSED, parsing)."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from opsdrill.dns import (
    DnsResolver,
    analyse_dkim,
    analyse_dmarc,
    analyse_mx,
    analyse_spf,
)
from opsdrill.dns import check_host as spf_check_host
from opsdrill.errors import ConfigError, TargetUnreachable
from tests.helpers.dns_fake import FakeResolver


def _rsa_p(bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return {"rsa2048": _rsa_p(2048), "rsa1024": _rsa_p(1024), "ed": base64.b64encode(raw).decode()}


def _split(text: str) -> list[str]:
    """TXT character-strings of at most 255 bytes, as a zone file must publish them."""
    return [text[i : i + 255] for i in range(0, len(text), 255)]


def good_zone(keys: dict[str, str]) -> dict[str, list[Any]]:
    return {
        "example.com": [
            {"TXT": "v=spf1 include:_spf.provider.test ip4:192.0.2.0/24 -all"},
            {"TXT": "google-site-verification=abc"},
            {"MX": [10, "mx1.example.com"]},
            {"MX": [20, "mx2.example.com"]},
        ],
        "_spf.provider.test": [
            {"TXT": "v=spf1 ip4:198.51.100.0/24 include:_s2.provider.test -all"}
        ],
        "_s2.provider.test": [{"TXT": "v=spf1 ip6:2001:db8::/32 ~all"}],
        "mx1.example.com": [{"A": "192.0.2.10"}],
        "mx2.example.com": [{"AAAA": "2001:db8::10"}],
        "app.example.com": [{"A": "192.0.2.80"}],
        "sel1._domainkey.example.com": [{"CNAME": "sel1.dkim.provider.test"}],
        "sel1.dkim.provider.test": [{"TXT": _split("v=DKIM1; k=rsa; p=" + keys["rsa2048"])}],
        "ed._domainkey.example.com": [{"TXT": "v=DKIM1; k=ed25519; p=" + keys["ed"]}],
        "_dmarc.example.com": [
            {
                "TXT": "v=DMARC1; p=reject; rua=mailto:dmarc@example.com,"
                "mailto:agg@reports.test!10m; adkim=s; aspf=r; pct=100"
            }
        ],
        "example.com._report._dmarc.reports.test": [{"TXT": "v=DMARC1"}],
        "nomail.example.com": [{"MX": [0, "."]}, {"TXT": "v=spf1 -all"}],
    }


def with_records(keys: dict[str, str], changes: dict[str, list[Any]]) -> FakeResolver:
    """The good zone with some names replaced."""
    return FakeResolver({**good_zone(keys), **changes})


def codes(report: Any) -> list[str]:
    return [f.code for f in report.findings]


def message(report: Any, code: str) -> str:
    return next(f.message for f in report.findings if f.code == code)


# --- a good configuration --------------------------------------------------------------


def test_good_configuration_has_no_findings(keys: dict[str, str]) -> None:
    resolver = FakeResolver(good_zone(keys))
    spf = analyse_spf(
        resolver, "example.com", required=["include:_spf.provider.test", "ip4:192.0.2.10"]
    )
    assert spf.findings == [], spf.summary()
    assert spf.record == "v=spf1 include:_spf.provider.test ip4:192.0.2.0/24 -all"
    assert spf.lookups == 2 and spf.void_lookups == 0 and spf.final_all == "-all"
    assert spf.required_found == {
        "include:_spf.provider.test": "example.com",
        "ip4:192.0.2.10": "example.com",
    }
    assert "include:_s2.provider.test -> _s2.provider.test [2 terms, 0 lookups" in spf.tree_text()
    dkim = analyse_dkim(resolver, "example.com", "sel1", cname_suffix="provider.test")
    assert dkim.findings == [], dkim.summary()
    assert (dkim.key_type, dkim.key_bits, dkim.cname_target) == (
        "rsa",
        2048,
        "sel1.dkim.provider.test",
    )
    ed = analyse_dkim(resolver, "example.com", "ed")
    assert ed.findings == [] and (ed.key_type, ed.key_bits) == ("ed25519", 256)
    dmarc = analyse_dmarc(resolver, "example.com", adkim="s", aspf="r")
    assert dmarc.findings == [], dmarc.summary()
    assert (dmarc.policy, dmarc.subdomain_policy) == ("reject", "reject")
    assert dmarc.rua == ["mailto:dmarc@example.com", "mailto:agg@reports.test!10m"]
    assert dmarc.rua_authorised == {"mailto:agg@reports.test!10m": True}
    mx = analyse_mx(
        resolver, "example.com", receives_mail=True, forbidden_hosts=["app.example.com"]
    )
    assert mx.findings == [], mx.summary()
    assert mx.mx == [(10, "mx1.example.com"), (20, "mx2.example.com")]
    nomail = analyse_mx(resolver, "nomail.example.com", receives_mail=False)
    assert nomail.findings == [] and nomail.null_mx
    for report in (spf, dkim, dmarc, mx):
        evidence = json.loads(json.dumps(report.evidence()))
        assert evidence["ok"] is True and evidence["answers"]
        assert all(a["text"].startswith(";; ") for a in evidence["answers"])


def test_check_host_with_nested_include(keys: dict[str, str]) -> None:
    resolver = FakeResolver(good_zone(keys))
    assert spf_check_host(resolver, "198.51.100.7", "example.com", "a@example.com").result == "pass"
    assert spf_check_host(resolver, "2001:db8::5", "example.com", "").result == "pass"
    failed = spf_check_host(resolver, "203.0.113.1", "example.com", "a@example.com")
    assert failed.result == "fail"


def test_check_host_timeout_is_temperror() -> None:
    resolver = FakeResolver({"slow.test": ["TIMEOUT"]})
    assert spf_check_host(resolver, "192.0.2.1", "slow.test", "").result == "temperror"


# --- SPF -------------------------------------------------------------------------------


def test_spf_two_records(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys, {"example.com": [{"TXT": "v=spf1 -all"}, {"TXT": "v=spf1 mx -all"}]}
    )
    report = analyse_spf(resolver, "example.com")
    assert codes(report) == ["spf.multiple_records"]
    text = message(report, "spf.multiple_records")
    assert text.startswith("DNS example.com TXT spf: expected exactly one 'v=spf1' record")
    assert "found 2: 'v=spf1 -all', 'v=spf1 mx -all'" in text
    assert report.records == ["v=spf1 -all", "v=spf1 mx -all"]


def test_spf_missing(keys: dict[str, str]) -> None:
    report = analyse_spf(with_records(keys, {"example.com": [{"TXT": "hello"}]}), "example.com")
    assert codes(report) == ["spf.missing"]
    assert "found NOERROR" not in message(report, "spf.missing")
    assert "'hello'" in message(report, "spf.missing")
    assert codes(analyse_spf(FakeResolver({}), "nowhere.test")) == ["spf.missing"]


def test_spf_softfail_only_in_a_migration_window(keys: dict[str, str]) -> None:
    resolver = with_records(keys, {"example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ~all"}]})
    report = analyse_spf(resolver, "example.com")
    assert codes(report) == ["spf.softfail"]
    assert message(report, "spf.softfail") == (
        "DNS example.com TXT spf: expected '-all', found '~all';"
        " '~all' is allowed only during a migration window"
    )
    assert analyse_spf(resolver, "example.com", allow_softfail=True).findings == []


@pytest.mark.parametrize(
    "record", ["v=spf1 mx +all", "v=spf1 mx ?all", "v=spf1 mx all", "v=spf1 mx"]
)
def test_spf_all_qualifier(keys: dict[str, str], record: str) -> None:
    report = analyse_spf(with_records(keys, {"example.com": [{"TXT": record}]}), "example.com")
    assert codes(report) == ["spf.all_qualifier"]


def test_spf_redirect_ending_properly_is_fine(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys,
        {"example.com": [{"TXT": "v=spf1 redirect=_spf.provider.test"}]},
    )
    report = analyse_spf(resolver, "example.com", required=["ip4:198.51.100.1"])
    assert report.findings == [], report.summary()
    assert report.required_found["ip4:198.51.100.1"] == (
        "example.com > redirect=_spf.provider.test"
    )
    soft = with_records(keys, {"example.com": [{"TXT": "v=spf1 redirect=_s2.provider.test"}]})
    text = message(analyse_spf(soft, "example.com"), "spf.softfail")
    assert "reached through redirect to _s2.provider.test" in text


def test_spf_missing_provider_include(keys: dict[str, str]) -> None:
    report = analyse_spf(
        FakeResolver(good_zone(keys)), "example.com", required=["include:amazonses.com"]
    )
    assert codes(report) == ["spf.missing_mechanism"]
    assert message(report, "spf.missing_mechanism") == (
        "DNS example.com TXT spf: expected mechanism 'include:amazonses.com' (top level or"
        " through an include), found no such mechanism in 'v=spf1 include:_spf.provider.test"
        " ip4:192.0.2.0/24 -all' or its includes"
    )


def test_spf_required_found_in_nested_include_or_with_wrong_qualifier(
    keys: dict[str, str],
) -> None:
    resolver = FakeResolver(good_zone(keys))
    report = analyse_spf(resolver, "example.com", required=["INCLUDE:_s2.provider.test."])
    assert report.findings == []
    assert report.required_found["INCLUDE:_s2.provider.test."] == (
        "example.com > include:_spf.provider.test"
    )
    weak = with_records(keys, {"example.com": [{"TXT": "v=spf1 ?include:_spf.provider.test -all"}]})
    report = analyse_spf(weak, "example.com", required=["include:_spf.provider.test"])
    assert codes(report) == ["spf.missing_mechanism"]
    assert "only '?include:_spf.provider.test' in example.com" in report.summary()


def test_spf_eleven_lookups_through_nested_includes(keys: dict[str, str]) -> None:
    zone = good_zone(keys)
    zone["example.com"] = [{"TXT": "v=spf1 a mx include:l1.test -all"}]  # 3
    zone["l1.test"] = [{"TXT": "v=spf1 include:l2.test include:l3.test -all"}]  # 2
    zone["l2.test"] = [{"TXT": "v=spf1 a:mx1.example.com a:mx2.example.com -all"}]  # 2
    zone["l3.test"] = [{"TXT": "v=spf1 exists:mx1.example.com include:l4.test -all"}]  # 2
    zone["l4.test"] = [{"TXT": "v=spf1 a:mx1.example.com mx:example.com -all"}]  # 2
    zone["example.com"].append({"A": "192.0.2.1"})
    zone["example.com"].append({"MX": [10, "mx1.example.com"]})
    report = analyse_spf(FakeResolver(zone), "example.com")
    # exists: on a name that always resolves matches every client: l3.test passes anyone
    assert codes(report) == ["spf.too_many_lookups", "spf.permissive"]
    assert "DNS l3.test TXT spf" in message(report, "spf.permissive")
    assert report.lookups == 11
    text = message(report, "spf.too_many_lookups")
    assert text.startswith("DNS example.com TXT spf: expected at most 10 DNS-querying terms")
    assert "found 11 (example.com: 3, l1.test: 2, l2.test: 2, l3.test: 2, l4.test: 2)" in text
    tree = report.tree_text()
    assert "include:l4.test -> l4.test [3 terms, 2 lookups here, 2 with nested" in tree
    assert report.evidence()["tree"] == tree


def test_spf_three_void_lookups(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys,
        {"example.com": [{"TXT": "v=spf1 a:gone1.test mx:gone2.test include:gone3.test -all"}]},
    )
    report = analyse_spf(resolver, "example.com")
    assert "spf.too_many_void_lookups" in codes(report)
    assert "spf.include_missing" in codes(report)
    assert report.void_lookups == 3
    text = message(report, "spf.too_many_void_lookups")
    assert "expected at most 2 void lookups (NXDOMAIN or empty answers), found 3:" in text
    assert "gone1.test A/AAAA (NXDOMAIN)" in text and "gone3.test TXT (NXDOMAIN)" in text
    relaxed = analyse_spf(resolver, "example.com", max_void_lookups=3)
    assert "spf.too_many_void_lookups" not in codes(relaxed)


def test_spf_syntax_reports_every_error(keys: dict[str, str]) -> None:
    record = "v=spf1 ip4:192.0.2.300 a/33 foo:bar.test exp=a.test exp=b.test ptr -all"
    report = analyse_spf(with_records(keys, {"example.com": [{"TXT": record}]}), "example.com")
    assert codes(report).count("spf.syntax") == 4
    assert "spf.ptr" in codes(report)
    assert "invalid IPv4 address '192.0.2.300'" in report.summary()
    assert "unknown mechanism 'foo'" in report.summary()


def test_spf_string_too_long(keys: dict[str, str]) -> None:
    record = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(30)) + " -all"
    report = analyse_spf(with_records(keys, {"example.com": [{"TXT": record}]}), "example.com")
    assert codes(report) == ["spf.string_too_long"]
    assert f"a string of {len(record)} bytes" in report.summary()
    split = with_records(keys, {"example.com": [{"TXT": _split(record)}]})
    assert analyse_spf(split, "example.com").findings == []


def test_spf_include_loop_terminates(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys,
        {
            "example.com": [{"TXT": "v=spf1 include:loop.test -all"}],
            "loop.test": [{"TXT": "v=spf1 include:example.com -all"}],
        },
    )
    report = analyse_spf(resolver, "example.com")
    assert codes(report) == ["spf.include_loop"]
    assert "example.com -> loop.test -> example.com" in report.summary()


def test_spf_required_must_be_valid(keys: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="include:"):
        analyse_spf(FakeResolver(good_zone(keys)), "example.com", required=["include:"])


# --- DKIM ------------------------------------------------------------------------------


def test_dkim_revoked(keys: dict[str, str]) -> None:
    resolver = with_records(keys, {"sel1.dkim.provider.test": [{"TXT": "v=DKIM1; k=rsa; p="}]})
    report = analyse_dkim(resolver, "example.com", "sel1")
    assert codes(report) == ["dkim.revoked"]
    assert message(report, "dkim.revoked").startswith(
        "DNS sel1._domainkey.example.com TXT dkim: expected a public key in p="
    )


def test_dkim_weak_1024_bit_key(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys, {"sel1.dkim.provider.test": [{"TXT": _split("v=DKIM1; p=" + keys["rsa1024"])}]}
    )
    report = analyse_dkim(resolver, "example.com", "sel1")
    assert codes(report) == ["dkim.weak_key"]
    assert "weak key" in report.summary() and "1024" in report.summary()
    assert report.key_bits == 1024
    assert analyse_dkim(resolver, "example.com", "sel1", min_rsa_bits=1024).findings == []


def test_dkim_testing_flag(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys, {"ed._domainkey.example.com": [{"TXT": f"v=DKIM1; k=ed25519; t=y; p={keys['ed']}"}]}
    )
    report = analyse_dkim(resolver, "example.com", "ed")
    assert codes(report) == ["dkim.testing"] and report.testing
    assert analyse_dkim(resolver, "example.com", "ed", allow_testing=True).findings == []


def test_dkim_missing_selector(keys: dict[str, str]) -> None:
    report = analyse_dkim(FakeResolver(good_zone(keys)), "example.com", "nope")
    assert codes(report) == ["dkim.missing"]
    assert "found NXDOMAIN" in report.summary()


@pytest.mark.parametrize(
    ("record", "code"),
    [
        ("k=rsa; v=DKIM1; p=AAAA", "dkim.bad_version"),
        ("v=DKIM2; p=AAAA", "dkim.bad_version"),
        ("v=DKIM1; k=dsa; p=AAAA", "dkim.key_type"),
        ("v=DKIM1; k=ed25519; p=AAAA", "dkim.bad_key"),
        ("v=DKIM1; p=!!!", "dkim.bad_key"),
        ("v=DKIM1; k=rsa", "dkim.syntax"),
        ("v=DKIM1; h=sha1; p=", "dkim.hash"),
        ("v=DKIM1; s=other; p=", "dkim.service"),
    ],
)
def test_dkim_record_problems(keys: dict[str, str], record: str, code: str) -> None:
    resolver = with_records(keys, {"ed._domainkey.example.com": [{"TXT": record}]})
    assert code in codes(analyse_dkim(resolver, "example.com", "ed"))


def test_dkim_must_be_cname_to_provider(keys: dict[str, str]) -> None:
    resolver = FakeResolver(good_zone(keys))
    direct = analyse_dkim(resolver, "example.com", "ed", cname_suffix="provider.test")
    assert codes(direct) == ["dkim.not_cname"]
    assert "found no CNAME (1 record(s))" in direct.summary()
    elsewhere = analyse_dkim(resolver, "example.com", "sel1", cname_suffix="other.test")
    assert "found a CNAME to 'sel1.dkim.provider.test'" in elsewhere.summary()


def test_dkim_two_records(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys, {"ed._domainkey.example.com": [{"TXT": "v=DKIM1; p="}, {"TXT": "v=DKIM1; p=AB"}]}
    )
    assert codes(analyse_dkim(resolver, "example.com", "ed")) == ["dkim.multiple_records"]


# --- DMARC -----------------------------------------------------------------------------


def test_dmarc_missing(keys: dict[str, str]) -> None:
    resolver = with_records(keys, {"_dmarc.example.com": [{"TXT": "v=dmarc1; p=reject"}]})
    report = analyse_dmarc(resolver, "example.com")
    assert codes(report) == ["dmarc.missing"]
    assert message(report, "dmarc.missing").startswith(
        "DNS _dmarc.example.com TXT dmarc: expected one record starting with 'v=DMARC1',"
        " found no v=DMARC1 record; ignored: 'v=dmarc1; p=reject'"
    )
    # neither the subdomain nor its organisational domain publishes one
    orphan = analyse_dmarc(resolver, "mail.example.com")
    assert codes(orphan) == ["dmarc.missing"]
    assert message(orphan, "dmarc.missing") == (
        "DNS _dmarc.mail.example.com TXT dmarc: expected one record starting with 'v=DMARC1',"
        " found NXDOMAIN; the organisational domain example.com publishes none either"
        " (_dmarc.example.com: no v=DMARC1 record; ignored: 'v=dmarc1; p=reject')"
    )
    assert orphan.inherited_from is None


def test_dmarc_two_records(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys,
        {"_dmarc.example.com": [{"TXT": "v=DMARC1; p=reject"}, {"TXT": "v=DMARC1; p=none"}]},
    )
    report = analyse_dmarc(resolver, "example.com")
    assert codes(report) == ["dmarc.multiple_records"]
    assert "found 2: 'v=DMARC1; p=reject', 'v=DMARC1; p=none'" in report.summary()


def test_dmarc_policy_below_minimum(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys, {"_dmarc.example.com": [{"TXT": "v=DMARC1; p=none; rua=mailto:d@example.com"}]}
    )
    report = analyse_dmarc(resolver, "example.com", min_policy="quarantine")
    assert codes(report) == ["dmarc.policy", "dmarc.subdomain_policy"]
    assert message(report, "dmarc.policy") == (
        "DNS _dmarc.example.com TXT dmarc: expected p=quarantine or stronger, found p=none"
    )
    assert analyse_dmarc(resolver, "example.com", min_policy="none").findings == []
    assert report.policy == "none" and report.subdomain_policy == "none"


def test_dmarc_external_rua_without_authorisation(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys,
        {"_dmarc.example.com": [{"TXT": "v=DMARC1; p=reject; rua=mailto:x@elsewhere.test"}]},
    )
    report = analyse_dmarc(resolver, "example.com")
    assert codes(report) == ["dmarc.rua_unauthorised"]
    assert message(report, "dmarc.rua_unauthorised").startswith(
        "DNS example.com._report._dmarc.elsewhere.test TXT dmarc: expected 'v=DMARC1'"
    )
    assert report.rua_authorised == {"mailto:x@elsewhere.test": False}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=DMARC1; p=reject", ["dmarc.rua_missing"]),
        ("v=DMARC1; p=reject; rua=https://x.test/r", ["dmarc.rua_invalid"]),
        ("v=DMARC1; p=reject; rua=mailto:nobody", ["dmarc.rua_invalid"]),
        ("v=DMARC1; p=reject; rua=mailto:d@example.com; pct=50", ["dmarc.pct"]),
        ("v=DMARC1; p=reject; sp=none; rua=mailto:d@example.com", ["dmarc.subdomain_policy"]),
        ("v=DMARC1; p=reject; rua=mailto:d@example.com; adkim=r", ["dmarc.alignment"]),
        ("v=DMARC1; p=block; rua=mailto:d@example.com; adkim=s", ["dmarc.syntax", "dmarc.policy"]),
        ("v=DMARC1; rua=mailto:d@example.com; adkim=s", ["dmarc.policy"]),
        ("v=DMARC1; p=reject; p=none; rua=mailto:d@example.com; adkim=s", ["dmarc.syntax"]),
    ],
)
def test_dmarc_record_problems(keys: dict[str, str], record: str, expected: list[str]) -> None:
    resolver = with_records(keys, {"_dmarc.example.com": [{"TXT": record}]})
    adkim = "s" if "adkim" in record else None
    assert codes(analyse_dmarc(resolver, "example.com", adkim=adkim)) == expected


# --- MX --------------------------------------------------------------------------------


def test_mx_to_forbidden_host(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys,
        {
            "example.com": [{"MX": [10, "APP.example.com."]}],
            "alias.example.com": [{"A": "192.0.2.80"}],
        },
    )
    report = analyse_mx(
        resolver, "example.com", receives_mail=True, forbidden_hosts=["app.example.com"]
    )
    assert codes(report) == ["mx.forbidden"]
    assert message(report, "mx.forbidden").startswith("DNS example.com MX mx: expected no MX")
    by_address = with_records(
        keys,
        {
            "example.com": [{"MX": [10, "alias.example.com"]}],
            "alias.example.com": [{"A": "192.0.2.80"}],
        },
    )
    report = analyse_mx(
        by_address, "example.com", receives_mail=True, forbidden_hosts=["app.example.com"]
    )
    assert codes(report) == ["mx.forbidden"]
    assert "shares address(es) 192.0.2.80 with 'app.example.com'" in report.summary()
    by_ip = analyse_mx(
        by_address, "example.com", receives_mail=True, forbidden_hosts=["192.0.2.80"]
    )
    assert codes(by_ip) == ["mx.forbidden"]


def test_mx_target_is_cname(keys: dict[str, str]) -> None:
    resolver = with_records(
        keys,
        {
            "example.com": [{"MX": [10, "mail.example.com"]}],
            "mail.example.com": [{"CNAME": "mx1.example.com"}],
        },
    )
    report = analyse_mx(resolver, "example.com", receives_mail=True)
    assert codes(report) == ["mx.cname"]
    assert "'mail.example.com' is a CNAME to 'mx1.example.com'" in report.summary()


@pytest.mark.parametrize(
    ("entries", "receives", "expected"),
    [
        ([{"TXT": "x"}], True, ["mx.missing"]),
        ([{"MX": [0, "."]}], True, ["mx.null"]),
        ([{"MX": [10, "gone.example.com"]}], True, ["mx.no_address"]),
        ([{"MX": [10, "mx1.example.com"]}], False, ["mx.unexpected"]),
        ([{"MX": [0, "."]}, {"MX": [10, "mx1.example.com"]}], False, ["mx.unexpected"]),
        ([{"TXT": "x"}], False, []),
    ],
)
def test_mx_problems(
    keys: dict[str, str], entries: list[Any], receives: bool, expected: list[str]
) -> None:
    resolver = with_records(keys, {"example.com": entries})
    assert codes(analyse_mx(resolver, "example.com", receives_mail=receives)) == expected


# --- failures and concurrency ----------------------------------------------------------

ANALYSES: list[Callable[[Any], Any]] = [
    lambda r: analyse_spf(r, "slow.test"),
    lambda r: analyse_dkim(r, "slow.test", "s1"),
    lambda r: analyse_dmarc(r, "slow.test"),
    lambda r: analyse_mx(r, "slow.test", receives_mail=True),
]


@pytest.mark.parametrize("analyse", ANALYSES, ids=["spf", "dkim", "dmarc", "mx"])
def test_timeout_raises_target_unreachable(analyse: Callable[[Any], Any]) -> None:
    zone = {
        "slow.test": ["TIMEOUT"],
        "s1._domainkey.slow.test": ["TIMEOUT"],
        "_dmarc.slow.test": ["TIMEOUT"],
    }
    with pytest.raises(TargetUnreachable, match="timed out"):
        analyse(FakeResolver(zone))


def test_concurrent_analyses_match_sequential(keys: dict[str, str]) -> None:
    zone = good_zone(keys)
    for i in range(40):
        zone[f"d{i}.test"] = [{"TXT": f"v=spf1 ip4:192.0.2.{i} {'~' if i % 2 else '-'}all"}]
    resolver = FakeResolver(zone)
    domains = [f"d{i}.test" for i in range(40)]
    sequential = [codes(analyse_spf(resolver, d)) for d in domains]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda d: codes(analyse_spf(resolver, d)), domains))
        verdicts = list(
            pool.map(
                lambda i: spf_check_host(resolver, f"192.0.2.{i}", f"d{i}.test", "").result,
                range(40),
            )
        )
    assert parallel == sequential
    assert verdicts == ["pass"] * 40


# --- DnsResolver against a tiny UDP responder ------------------------------------------


class Responder:
    """Answers each UDP query with ``handler(request)``; None means stay silent."""

    def __init__(self, handler: Callable[[dns.message.Message], dns.message.Message | None]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            response = self.handler(dns.message.from_wire(wire))
            if response is not None:
                self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def responder() -> Iterator[Callable[..., Responder]]:
    started: list[Responder] = []

    def start(handler: Callable[[dns.message.Message], dns.message.Message | None]) -> Responder:
        started.append(Responder(handler))
        return started[-1]

    yield start
    for r in started:
        r.close()


def _zone_handler(request: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(request)
    question = request.question[0]
    name = question.name.to_text()
    if name == "example.test.":
        response.answer.append(
            dns.rrset.from_text(name, 300, "IN", "TXT", '"v=spf1 " "-all"', '"other"')
        )
    elif name == "sel._domainkey.example.test.":
        response.answer.append(dns.rrset.from_text(name, 300, "IN", "CNAME", "key.provider.test."))
        response.answer.append(dns.rrset.from_text("key.provider.test.", 300, "IN", "TXT", '"k"'))
    elif name != "empty.example.test.":
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response


def test_dns_resolver_answers(responder: Callable[..., Responder]) -> None:
    server = responder(_zone_handler)
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=1.0)
    txt = resolver.query("Example.Test.", "TXT")
    assert (txt.qname, txt.rcode) == ("example.test", "NOERROR")
    assert sorted(txt.records) == ["other", "v=spf1 -all"]
    assert (b"v=spf1 ", b"-all") in txt.strings
    assert txt.text.startswith(f";; example.test. TXT: NOERROR from 127.0.0.1:{server.port}")
    assert 'example.test. 300 IN TXT "v=spf1 " "-all"' in txt.text
    dkim = resolver.query("sel._domainkey.example.test", "TXT")
    assert dkim.cname_chain == ("key.provider.test",) and dkim.records == ("k",)
    assert resolver.query("gone.example.test", "TXT").rcode == "NXDOMAIN"
    empty = resolver.query("empty.example.test", "MX")
    assert (empty.rcode, empty.records, empty.status) == ("NOERROR", (), "NODATA")
    assert resolver.queries == 4


def test_dns_resolver_timeout_is_bounded(responder: Callable[..., Responder]) -> None:
    server = responder(lambda request: None)
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=0.2)
    with pytest.raises(TargetUnreachable) as failure:
        resolver.query("example.test", "TXT")
    assert f"DNS example.test TXT: timed out asking 127.0.0.1:{server.port}" in str(failure.value)


def test_dns_resolver_refused(responder: Callable[..., Responder]) -> None:
    def refuse(request: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(request)
        response.set_rcode(dns.rcode.REFUSED)
        return response

    server = responder(refuse)
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=0.5)
    with pytest.raises(TargetUnreachable, match=r"no usable answer from 127\.0\.0\.1:.*REFUSED"):
        resolver.query("example.test", "TXT")


def test_dns_resolver_rejects_hostnames_as_servers() -> None:
    with pytest.raises(ConfigError, match="not an IP address"):
        DnsResolver(["ns1.example.test"])


def test_dns_resolver_is_thread_safe(responder: Callable[..., Responder]) -> None:
    server = responder(_zone_handler)
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=2.0)
    names = ["example.test", "gone.example.test", "sel._domainkey.example.test"] * 20
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: resolver.query(n, "TXT"), names))
    assert [a.qname for a in answers] == names
    assert {a.rcode for a in answers[1::3]} == {"NXDOMAIN"}
    assert resolver.queries == len(names)


def test_spf_sending_ips_must_pass(keys: dict[str, str]) -> None:
    resolver = FakeResolver(good_zone(keys))
    report = analyse_spf(resolver, "example.com", sending_ips=["198.51.100.9", "203.0.113.1"])
    assert codes(report) == ["spf.check_host"]
    assert message(report, "spf.check_host").startswith(
        "DNS example.com TXT spf: expected check_host(203.0.113.1) = 'pass' (a known sending"
        " IP), found 'fail': "
    )
    assert report.senders["198.51.100.9"].result == "pass"
    assert report.evidence()["senders"]["203.0.113.1"]["result"] == "fail"
    with pytest.raises(ConfigError, match="not an IP address"):
        analyse_spf(resolver, "example.com", sending_ips=["mail.example.com"])


# --- organisational domains (Public Suffix List), inherited DMARC -----------------------

# Zones shaped as real registrations under two-label public suffixes: each organisation
# publishes DMARC at its registrable domain only; the registry's own name (co.uk) must
# never count as anyone's organisation, whatever it publishes.
PSL_ZONE: dict[str, list[Any]] = {
    "_dmarc.example.co.uk": [
        {"TXT": "v=DMARC1; p=reject; sp=none; rua=mailto:dmarc@example.co.uk"}
    ],
    "_dmarc.co.uk": [{"TXT": "v=DMARC1; p=reject; sp=reject; rua=mailto:d@co.uk"}],
    "_dmarc.example.com.au": [
        {"TXT": "v=DMARC1; p=quarantine; sp=reject; rua=mailto:d@reports.test; adkim=r"}
    ],
    "example.com.au._report._dmarc.reports.test": [{"TXT": "v=DMARC1"}],
    "_dmarc.example.com": [{"TXT": "v=DMARC1; p=reject; sp=reject; rua=mailto:d@example.com"}],
    "_dmarc.strict.example": [{"TXT": "v=DMARC1; p=reject; rua=mailto:d@strict.example"}],
    "_dmarc.two.example": [
        {"TXT": "v=DMARC1; p=reject; rua=mailto:d@two.example"},
        {"TXT": "v=DMARC1; p=none; rua=mailto:d@two.example"},
    ],
    "_dmarc.news.strict.example": [{"TXT": "spf-verification=x"}],
}


@pytest.mark.parametrize(
    ("signing", "author", "relaxed"),
    [
        ("other.co.uk", "example.co.uk", False),  # two owners under one public suffix
        ("mail.example.co.uk", "example.co.uk", True),
        ("example.co.uk", "news.example.co.uk", True),
        ("other.com.au", "shop.example.com.au", False),
        ("mail.example.com.au", "shop.example.com.au", True),
        ("a.b.example.com", "example.com", True),
        ("mail.example.com", "example.net", False),
        ("MAIL.Example.CO.UK.", "example.co.uk", True),
        ("evil.github.io", "victim.github.io", False),  # the list's private section too
    ],
)
def test_relaxed_alignment_uses_the_public_suffix_list(
    signing: str, author: str, relaxed: bool
) -> None:
    from opsdrill.mail.dkim_verify import aligned

    assert aligned(signing, author) is relaxed
    assert aligned(signing, author, strict=True) is False


def test_subdomain_inherits_a_weak_sp_from_its_organisational_domain_under_co_uk() -> None:
    report = analyse_dmarc(FakeResolver(PSL_ZONE), "news.example.co.uk")
    assert report.inherited_from == "example.co.uk"
    assert report.name == "_dmarc.example.co.uk"
    assert report.record == "v=DMARC1; p=reject; sp=none; rua=mailto:dmarc@example.co.uk"
    assert (report.policy, report.subdomain_policy, report.applied_policy) == (
        "reject",
        "none",
        "none",
    )
    # the policy of the domain's mail is sp=none: judged as a weak p=none is
    assert codes(report) == ["dmarc.policy"]
    assert message(report, "dmarc.policy") == (
        "DNS _dmarc.example.co.uk TXT dmarc inherited by news.example.co.uk (no record of"
        " its own at _dmarc.news.example.co.uk: NXDOMAIN): expected sp=reject or stronger"
        " (the organisational domain's sp= is the policy of news.example.co.uk and its"
        " subdomains), found sp=none"
    )
    evidence = json.loads(json.dumps(report.evidence()))
    assert evidence["inherited_from"] == "example.co.uk"
    assert evidence["policy_record"] == "_dmarc.example.co.uk"
    assert evidence["applied_policy"] == "none"
    # the last-two-labels rule would have asked _dmarc.co.uk: never queried
    assert {a.qname for a in report.answers} == {
        "_dmarc.news.example.co.uk",
        "_dmarc.example.co.uk",
    }
    # a minimum of none accepts it
    relaxed = analyse_dmarc(FakeResolver(PSL_ZONE), "news.example.co.uk", min_policy="none")
    assert relaxed.findings == []


def test_subdomain_inheriting_sp_reject_passes_and_says_so_under_com_au() -> None:
    report = analyse_dmarc(FakeResolver(PSL_ZONE), "mail.shop.example.com.au", adkim="r")
    assert report.findings == [], report.summary()
    assert report.inherited_from == "example.com.au"
    assert (report.policy, report.applied_policy) == ("quarantine", "reject")
    # external reports: the authorisation is asked for the domain the policy came from
    assert report.rua_authorised == {"mailto:d@reports.test": True}
    assert "example.com.au._report._dmarc.reports.test" in {a.qname for a in report.answers}
    # p= is the organisational domain's own policy, not ours: quarantine is not judged
    assert "dmarc.policy" not in codes(
        analyse_dmarc(FakeResolver(PSL_ZONE), "example.com.au", min_policy="quarantine")
    )


def test_inherited_policy_without_sp_is_p_and_is_judged_against_both_minimums() -> None:
    deep = analyse_dmarc(FakeResolver(PSL_ZONE), "a.b.example.com")
    assert deep.inherited_from == "example.com" and deep.findings == []
    report = analyse_dmarc(
        FakeResolver(PSL_ZONE), "news.strict.example", min_policy="reject"
    )  # the own TXT record there is not DMARC: ignored, the parent's applies
    assert report.inherited_from == "strict.example" and report.applied_policy == "reject"
    assert report.findings == [], report.summary()
    weak = {
        **PSL_ZONE,
        "_dmarc.strict.example": [{"TXT": "v=DMARC1; p=quarantine; rua=mailto:d@strict.example"}],
    }
    judged = analyse_dmarc(
        FakeResolver(weak),
        "news.strict.example",
        min_policy="quarantine",
        min_subdomain_policy="reject",
    )
    assert codes(judged) == ["dmarc.policy"]
    assert "found no sp= (so p=quarantine applies)" in judged.summary()
    assert (
        "(no record of its own at _dmarc.news.strict.example: no v=DMARC1 record;"
        " ignored: 'spf-verification=x')" in judged.summary()
    )


def test_own_record_wins_and_several_inherited_records_apply_none() -> None:
    own = {
        **PSL_ZONE,
        "_dmarc.news.example.co.uk": [{"TXT": "v=DMARC1; p=reject; rua=mailto:d@example.co.uk"}],
    }
    report = analyse_dmarc(FakeResolver(own), "news.example.co.uk")
    assert report.inherited_from is None and report.findings == []
    assert report.name == "_dmarc.news.example.co.uk"
    two = analyse_dmarc(FakeResolver(PSL_ZONE), "mail.two.example")
    assert codes(two) == ["dmarc.multiple_records"]
    assert message(two, "dmarc.multiple_records").startswith(
        "DNS _dmarc.two.example TXT dmarc inherited by mail.two.example (no record of its own"
        " at _dmarc.mail.two.example: NXDOMAIN): expected exactly one v=DMARC1 record"
    )
    assert two.record is None


def test_rua_at_another_owner_under_the_same_public_suffix_needs_authorisation() -> None:
    zone = {
        "_dmarc.example.co.uk": [{"TXT": "v=DMARC1; p=reject; rua=mailto:d@reports.other.co.uk"}],
    }
    report = analyse_dmarc(FakeResolver(zone), "example.co.uk")
    assert codes(report) == ["dmarc.rua_unauthorised"]
    assert message(report, "dmarc.rua_unauthorised").startswith(
        "DNS example.co.uk._report._dmarc.reports.other.co.uk TXT dmarc"
    )


# --- SPF: a record that passes everyone, reached through include/redirect ----------------


@pytest.mark.parametrize(
    "included",
    [
        "v=spf1 ip4:198.51.100.0/24 +all",
        "v=spf1 ip4:198.51.100.0/24 all",
        "v=spf1 ip4:0.0.0.0/0 -all",
        "v=spf1 ip6:::/0 -all",
        "v=spf1 redirect=open.provider.test",  # a redirect inside the include
    ],
)
def test_include_passing_arbitrary_addresses_lets_the_whole_internet_send(
    included: str,
) -> None:
    zone = {
        "example.com": [{"TXT": "v=spf1 include:_spf.provider.test -all"}],
        "_spf.provider.test": [{"TXT": included}],
        "open.provider.test": [{"TXT": "v=spf1 +all"}],
    }
    report = analyse_spf(FakeResolver(zone), "example.com")
    assert codes(report) == ["spf.permissive"], report.summary()
    text = message(report, "spf.permissive")
    culprit = "open.provider.test" if "redirect" in included else "_spf.provider.test"
    assert text.startswith(f"DNS {culprit} TXT spf: expected ")
    assert "the whole internet may send as example.com" in text
    assert "include:_spf.provider.test" in text
    assert report.final_all == "-all"
    assert report.evidence()["permissive"]


def test_redirected_record_passing_everyone_is_flagged_once() -> None:
    zone = {
        "example.com": [{"TXT": "v=spf1 redirect=_spf.provider.test"}],
        "_spf.provider.test": [{"TXT": "v=spf1 ip4:198.51.100.0/24 ip4:0.0.0.0/0 -all"}],
    }
    report = analyse_spf(FakeResolver(zone), "example.com")
    assert codes(report) == ["spf.permissive"], report.summary()
    assert "through 'redirect=_spf.provider.test'" in report.summary()
    # a +all reached by redirect is already the final 'all': one finding, not two
    plus = {**zone, "_spf.provider.test": [{"TXT": "v=spf1 +all"}]}
    assert codes(analyse_spf(FakeResolver(plus), "example.com")) == ["spf.all_qualifier"]


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 include:_spf.provider.test -all",  # ?all in an include: neutral, no match
        "v=spf1 -include:open.provider.test -all",  # +all behind -include: fails everyone
        "v=spf1 ~include:open.provider.test -all",
        "v=spf1 ?include:open.provider.test -all",
    ],
)
def test_include_that_does_not_pass_everyone_is_not_flagged(record: str) -> None:
    zone = {
        "example.com": [{"TXT": record}],
        "_spf.provider.test": [{"TXT": "v=spf1 ip4:198.51.100.0/24 ?all"}],
        "open.provider.test": [{"TXT": "v=spf1 +all"}],
    }
    report = analyse_spf(FakeResolver(zone), "example.com")
    assert "spf.permissive" not in codes(report), report.summary()
    assert spf_check_host(FakeResolver(zone), "203.0.113.254", "example.com", "").result != "pass"


def test_own_terms_passing_everyone_are_flagged_at_the_top() -> None:
    zone = {"example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ip4:0.0.0.0/0 -all"}]}
    report = analyse_spf(FakeResolver(zone), "example.com")
    assert codes(report) == ["spf.permissive"]
    assert message(report, "spf.permissive").startswith("DNS example.com TXT spf: expected")
    assert "the whole internet may send as example.com" in report.summary()


def test_good_zone_lists_the_documentation_ranges_and_is_not_permissive(
    keys: dict[str, str],
) -> None:
    # good_zone authorises 192.0.2.0/24, 198.51.100.0/24 and 2001:db8::/32: the probes
    # are chosen outside every range a record could list for a real reason
    report = analyse_spf(FakeResolver(good_zone(keys)), "example.com")
    assert report.findings == []
    assert {p: r["result"] for p, r in report.evidence()["probes"].items()} == {
        "203.0.113.254": "fail",
        "3fff:fff:ffff::254": "fail",
    }


# --- SPF: problems that do not break evaluation --------------------------------------------


def test_ptr_and_ignored_redirect_are_lesser_findings_outside_the_blocker_check(
    keys: dict[str, str],
) -> None:
    from opsdrill_checks import check_dns_spf

    resolver = with_records(
        keys,
        {
            "example.com": [
                {"TXT": "v=spf1 include:_spf.provider.test ptr -all redirect=_s2.provider.test"}
            ]
        },
    )
    report = analyse_spf(resolver, "example.com", sending_ips=["198.51.100.9"])
    assert codes(report) == ["spf.ptr", "spf.redirect_ignored"]
    assert report.senders["198.51.100.9"].result == "pass"  # the record still evaluates
    ptr = message(report, "spf.ptr")
    assert "deprecated" in ptr and "not a permerror" in ptr
    assert "some receivers skip it" in ptr
    redirect = message(report, "spf.redirect_ignored")
    assert "is ignored (RFC 7208 6.1)" in redirect and "not a permerror" in redirect
    for code in ("spf.ptr", "spf.redirect_ignored"):
        assert code not in check_dns_spf.RECORD_CODES
        assert code in check_dns_spf.HYGIENE_CODES
    assert check_dns_spf.RECORD.severity == "blocker"
    assert check_dns_spf.HYGIENE.severity == "minor"
    assert "spf.permissive" in check_dns_spf.POLICY_CODES
