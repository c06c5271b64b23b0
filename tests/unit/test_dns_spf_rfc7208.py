"""The RFC 7208 test suite (openspf.org, BSD licence: tests/data/rfc7208/LICENSE) against
our SPF code, with each scenario's zone data served by the fake resolver.

(a) ``check_host`` must give one of the expected results for every case, and the
    expected explanation where the suite names one.
(b) Every case expected to be a ``permerror`` because of the *record* (syntax, duplicate
    records, lookup/void/MX limits, an include or redirect target without SPF) must
    produce a finding of the matching kind from ``analyse_spf`` on the evaluated domain.
    Selection rule: the case's expected results include ``permerror``; its category is
    read from the permerror explanation check_host gives (``CATEGORIES``); cases where
    the suite also accepts another result and check_host gives that one are categorised
    in ``OTHER_RESULT_CATEGORY``; ``RUNTIME_ONLY`` lists the cases no static analysis can
    see, with the reason. An unclassified permerror fails the test, so a new case forces
    a decision.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsdrill.dns.spf import analyse_spf, check_host
from opsdrill.dns.spf_eval import DEFAULT_EXPLANATIONS
from tests.helpers.dns_fake import FakeResolver

SUITE = Path(__file__).parent.parent / "data" / "rfc7208" / "rfc7208-tests.yml"

# Cases check_host cannot pass, with the reason. Kept empty: pyspf passes the suite.
XFAIL: dict[str, str] = {}

CATEGORIES: dict[str, tuple[re.Pattern[str], frozenset[str]]] = {
    "duplicate records": (
        re.compile(r"Two or more type (TXT|SPF) spf records"),
        frozenset({"spf.multiple_records"}),
    ),
    "limits": (
        re.compile(
            r"Too many DNS lookups|More than \d+ DNS lookups|Void lookup limit|"
            r"More than \d+ MX records"
        ),
        frozenset(
            {
                "spf.too_many_lookups",
                "spf.too_many_void_lookups",
                "spf.too_many_mx",
                "spf.include_loop",
            }
        ),
    ),
    "target without SPF record": (
        re.compile(r"No valid SPF record for included domain|redirect domain has no SPF"),
        frozenset({"spf.include_missing", "spf.redirect_missing"}),
    ),
    "syntax": (
        re.compile(
            r"Unknown mechanism|Unknown qualifier|Invalid domain|Invalid IP[46]|CIDR|"
            r"empty domain|implicit exists|include mechanism missing domain|"
            r"invalid-macro-char|Unknown Macro|c,r,t macros|MUST appear at most once|"
            r"Non-ascii|Use the ip4 mechanism|Invalid all mechanism|"
            r"exp has empty domain-spec|redirect has empty domain|"
            r"does not appear to be an IPv4 or IPv6"
        ),
        frozenset({"spf.syntax"}),
    ),
}
# The suite accepts fail or permerror for these; pyspf says fail, the record is invalid.
OTHER_RESULT_CATEGORY = {
    "invalid-domain-empty-label": "syntax",
    "invalid-domain-long": "syntax",
}
RUNTIME_ONLY = {
    "invalid-domain-long-via-macro": "the over-long label appears only after macro "
    "expansion with the sender's local part; the record itself is valid",
}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _load() -> list[Any]:
    cases = []
    for scenario in yaml.safe_load_all(SUITE.read_text(encoding="utf-8")):
        for name, case in scenario["tests"].items():
            expected = case["result"]
            case = {
                **case,
                "name": name,
                "results": [expected] if isinstance(expected, str) else list(expected),
                "zone": scenario["zonedata"],
            }
            cases.append(pytest.param(case, id=f"{_slug(scenario['description'])}/{name}"))
    return cases


CASES = _load()
PERMERROR_CASES = [
    c
    for c in CASES
    if "permerror" in c.values[0]["results"] and c.values[0]["name"] not in RUNTIME_ONLY
]


def _evaluated_domain(case: dict[str, Any]) -> str:
    """RFC 7208 2.4: the MAIL FROM domain, or the HELO name for a null sender."""
    mailfrom = str(case["mailfrom"])
    return mailfrom.rpartition("@")[2] if mailfrom else str(case["helo"])


def test_suite_is_complete() -> None:
    assert len(CASES) == 203
    assert len(PERMERROR_CASES) == 77


@pytest.mark.parametrize("case", CASES)
def test_check_host(case: dict[str, Any]) -> None:
    if case["name"] in XFAIL:
        pytest.xfail(XFAIL[case["name"]])
    resolver = FakeResolver(case["zone"])
    got = check_host(
        resolver,
        str(case["host"]),
        _evaluated_domain(case),
        str(case["mailfrom"]),
        helo=str(case["helo"]),
    )
    assert got.result in case["results"], (
        f"{case['name']} ({case.get('spec')}): expected {case['results']}, got {got}"
    )
    if "explanation" in case:
        want = case["explanation"]
        if want == "DEFAULT":
            want = DEFAULT_EXPLANATIONS[got.result]
        assert got.explanation == want


def _category(name: str, result: str, explanation: str) -> str | None:
    if result != "permerror":
        return OTHER_RESULT_CATEGORY.get(name)
    for category, (pattern, _codes) in CATEGORIES.items():
        if pattern.search(explanation):
            return category
    return None


@pytest.mark.parametrize("case", PERMERROR_CASES)
def test_analyse_spf_flags_permerror(case: dict[str, Any]) -> None:
    domain = _evaluated_domain(case)
    got = check_host(
        FakeResolver(case["zone"]),
        str(case["host"]),
        domain,
        str(case["mailfrom"]),
        helo=str(case["helo"]),
    )
    category = _category(case["name"], got.result, got.explanation)
    assert category, f"unclassified: check_host gave {got}; add it to a category"
    report = analyse_spf(FakeResolver(case["zone"]), domain)
    codes = CATEGORIES[category][1]
    hits = [f for f in report.findings if f.code in codes]
    assert hits, (
        f"{category}: expected a finding in {sorted(codes)} for {domain},"
        f" got {report.findings}\n{report.tree_text()}"
    )
    for f in hits:
        assert f.message.startswith("DNS ") and "expected" in f.message and "found" in f.message
