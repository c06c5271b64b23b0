"""DMARC policy records (RFC 7489): one record, a strong enough policy, reports that flow.

``analyse_dmarc`` reads ``_dmarc.<domain>`` and checks: exactly one record starting with
``v=DMARC1`` (other TXT records there are ignored, as RFC 7489 6.6.3 says); a valid
tag list; ``p`` at least ``min_policy`` and ``sp`` (default: ``p``) at least
``min_subdomain_policy`` (default: ``min_policy``), ordered none < quarantine < reject;
``rua`` present (when required) with valid ``mailto:`` URIs; every external report
destination authorising the reports (RFC 7489 7.1: a ``v=DMARC1`` TXT record at
``<domain>._report._dmarc.<destination>``); ``pct`` absent or 100; ``adkim``/``aspf``
as configured (default ``r``).

"External" uses a simple organisational-domain rule instead of the Public Suffix List
(which would need a data file kept current): two names share an organisation when their
last two labels are equal. This is exact for names under one-label suffixes (.com, .org,
.test, .de). Under two-label public suffixes (``example.co.uk`` vs ``other.co.uk``) it
treats different owners as one and skips the authorisation check for that destination.

Codes: dmarc.missing, dmarc.multiple_records, dmarc.syntax, dmarc.policy,
dmarc.subdomain_policy, dmarc.rua_missing, dmarc.rua_invalid, dmarc.rua_unauthorised,
dmarc.pct, dmarc.alignment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from opsdrill.dns.findings import DnsReport, finding, quote, quote_all
from opsdrill.dns.resolver import Lookups, Resolver, normalise_name
from opsdrill.dns.tags import parse_tags
from opsdrill.errors import ConfigError

POLICIES = ("none", "quarantine", "reject")
ALIGNMENT = ("r", "s")
# "DMARC1" is case-sensitive in the RFC 7489 ABNF; other TXT records are ignored.
RE_STRICT_VERSION = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")
RE_MAILTO = re.compile(r"^mailto:(?P<address>[^!]+)(?:!(?P<size>[0-9]+[kmgt]?))?$", re.I)
RE_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)


def organisational_domain(name: str) -> str:
    """The last two labels (see the module docstring for why and where this is wrong)."""
    return ".".join(normalise_name(name).split(".")[-2:])


@dataclass(kw_only=True)
class DmarcReport(DnsReport):
    name: str
    record: str | None = None
    policy: str | None = None
    subdomain_policy: str | None = None
    rua: list[str] = field(default_factory=list)
    pct: int | None = None
    adkim: str = "r"
    aspf: str = "r"
    rua_authorised: dict[str, bool] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "record": self.record,
            "policy": self.policy,
            "subdomain_policy": self.subdomain_policy,
            "rua": self.rua,
            "pct": self.pct,
            "adkim": self.adkim,
            "aspf": self.aspf,
            "rua_authorised": self.rua_authorised,
        }


def _check_policy_arg(name: str, value: str | None) -> None:
    if value is not None and value not in POLICIES:
        raise ConfigError(f"DMARC {name} {value!r}: expected one of {', '.join(POLICIES)}")


class _Checker:
    def __init__(self, report: DmarcReport, dns: Lookups) -> None:
        self.report = report
        self.dns = dns

    def add(self, code: str, expected: str, found: str, name: str | None = None) -> None:
        self.report.findings.append(
            finding(code, name or self.report.name, "TXT", "dmarc", expected, found)
        )

    def check_missing(self, others: list[str], status: str) -> None:
        found = status if not others else f"no v=DMARC1 record; ignored: {quote_all(others)}"
        domain = self.report.domain
        org = organisational_domain(domain)
        if org != domain:
            parent = self.dns.query(f"_dmarc.{org}", "TXT")
            if any(RE_STRICT_VERSION.match(r) for r in parent.records):
                found += f" (the organisational domain {org} has one; its sp= would apply)"
        self.add("dmarc.missing", "one record starting with 'v=DMARC1'", found)

    def check_rua(self, value: str, require: bool) -> None:
        uris = [u.strip() for u in value.split(",") if u.strip()]
        self.report.rua = uris
        if not uris:
            if require:
                self.add("dmarc.rua_missing", "rua= with at least one mailto: URI", "an empty rua=")
            return
        for uri in uris:
            m = RE_MAILTO.match(uri)
            address = unquote(m.group("address")) if m else ""
            local, at, host = address.rpartition("@")
            host = normalise_name(host)
            if not m or not at or not local or not RE_HOSTNAME.match(host):
                self.add(
                    "dmarc.rua_invalid", "each rua= URI as mailto:user@domain[!size]", quote(uri)
                )
                continue
            self.check_authorised(uri, host)

    def check_authorised(self, uri: str, destination: str) -> None:
        domain = self.report.domain
        if organisational_domain(destination) == organisational_domain(domain):
            return
        name = f"{domain}._report._dmarc.{destination}"
        answer = self.dns.query(name, "TXT")
        authorised = any(RE_STRICT_VERSION.match(r) for r in answer.records)
        self.report.rua_authorised[uri] = authorised
        if not authorised:
            found = answer.status
            if answer.records:
                found += f": {quote_all(list(answer.records))}"
            self.add(
                "dmarc.rua_unauthorised",
                f"'v=DMARC1' authorising {destination} to receive {domain}'s reports"
                f" ({quote(uri)})",
                found,
                name=name,
            )


def _stronger_or_equal(found: str, minimum: str) -> bool:
    return POLICIES.index(found) >= POLICIES.index(minimum)


def analyse_dmarc(
    resolver: Resolver,
    domain: str,
    *,
    min_policy: str = "reject",
    min_subdomain_policy: str | None = None,
    require_rua: bool = True,
    adkim: str | None = None,
    aspf: str | None = None,
) -> DmarcReport:
    """Analyse ``domain``'s DMARC record; see the module docstring.

    Raises ``TargetUnreachable`` when DNS cannot answer, ``ConfigError`` for an invalid
    expectation (a policy or alignment mode that does not exist).
    """
    _check_policy_arg("min_policy", min_policy)
    _check_policy_arg("min_subdomain_policy", min_subdomain_policy)
    for label, mode in (("adkim", adkim), ("aspf", aspf)):
        if mode is not None and mode not in ALIGNMENT:
            raise ConfigError(f"DMARC {label} {mode!r}: expected 'r' or 's'")
    domain = normalise_name(domain)
    dns = Lookups(resolver)
    report = DmarcReport(domain=domain, name=f"_dmarc.{domain}")
    report.answers = dns.answers
    check = _Checker(report, dns)
    answer = dns.query(report.name, "TXT")
    records = [r for r in answer.records if RE_STRICT_VERSION.match(r)]
    if not records:
        check.check_missing(list(answer.records), answer.status)
        return report
    if len(records) > 1:
        check.add(
            "dmarc.multiple_records",
            "exactly one v=DMARC1 record (with several, receivers apply none)",
            f"{len(records)}: {quote_all(records)}",
        )
        return report
    record = report.record = records[0]
    tags = parse_tags(record, lower_names=True)
    for error in tags.errors:
        check.add("dmarc.syntax", "a valid tag=value list (RFC 7489 6.4)", error)
    values = {k: v.lower() for k, v in tags.tags.items() if k in ("p", "sp", "adkim", "aspf")}
    for tag, allowed in (
        ("p", POLICIES),
        ("sp", POLICIES),
        ("adkim", ALIGNMENT),
        ("aspf", ALIGNMENT),
    ):
        if tag in values and values[tag] not in allowed:
            check.add(
                "dmarc.syntax", f"{tag}= one of {', '.join(allowed)}", f"{tag}={tags.tags[tag]}"
            )
            del values[tag]
    policy = report.policy = values.get("p")
    if "p" not in tags.tags:
        check.add("dmarc.policy", f"p={min_policy} or stronger", "no p= tag")
    elif policy is None:
        if min_policy != "none":
            check.add(
                "dmarc.policy",
                f"p={min_policy} or stronger",
                f"p={tags.tags['p']} (not a policy: receivers apply none)",
            )
    elif not _stronger_or_equal(policy, min_policy):
        check.add("dmarc.policy", f"p={min_policy} or stronger", f"p={policy}")
    sub = report.subdomain_policy = values.get("sp", policy)
    min_sub = min_subdomain_policy or min_policy
    if sub is not None and not _stronger_or_equal(sub, min_sub):
        shown = f"sp={sub}" if "sp" in values else f"no sp= (so p={sub} applies)"
        check.add("dmarc.subdomain_policy", f"sp={min_sub} or stronger", shown)
    rua = tags.get("rua")
    if rua is None:
        if require_rua:
            check.add("dmarc.rua_missing", "rua= with at least one mailto: URI", "no rua= tag")
    else:
        check.check_rua(rua, require_rua)
    pct = tags.get("pct")
    if pct is not None:
        if not pct.isdigit() or int(pct) > 100:
            check.add("dmarc.syntax", "pct= an integer 0-100", f"pct={pct}")
        else:
            report.pct = int(pct)
            if report.pct != 100:
                check.add(
                    "dmarc.pct", "no pct= or pct=100 (the policy applies to all mail)", f"pct={pct}"
                )
    report.adkim = values.get("adkim", "r")
    report.aspf = values.get("aspf", "r")
    for label, want, have in (("adkim", adkim, report.adkim), ("aspf", aspf, report.aspf)):
        if want is not None and want != have:
            written = f"{label}={have}" if label in tags.tags else f"no {label}= (default r)"
            check.add("dmarc.alignment", f"{label}={want}", written)
    return report
