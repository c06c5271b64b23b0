"""DMARC policy records (RFC 7489): one record, a strong enough policy, reports that flow.

``analyse_dmarc`` reads ``_dmarc.<domain>`` and checks: exactly one record starting with
``v=DMARC1`` (other TXT records there are ignored, as RFC 7489 6.6.3 says); a valid
tag list; ``p`` at least ``min_policy`` and ``sp`` (default: ``p``) at least
``min_subdomain_policy`` (default: ``min_policy``), ordered none < quarantine < reject;
``rua`` present (when required) with valid ``mailto:`` URIs; every external report
destination authorising the reports (RFC 7489 7.1: a ``v=DMARC1`` TXT record at
``<policy domain>._report._dmarc.<destination>``); ``pct`` absent or 100; ``adkim``/``aspf``
as configured (default ``r``).

Inherited policy (RFC 7489 6.6.3): when ``_dmarc.<domain>`` holds no ``v=DMARC1`` record,
receivers use the record of the domain's organisational domain (``opsdrill.dns.orgdomain``:
the Public Suffix List), and its ``sp=`` (default ``p=``) is the policy of the domain and
of every name under it. Such a report is ``inherited_from`` that domain, its ``name`` is
the inherited record's, and every finding on that record says it was inherited. The one
inherited policy governs the domain and its subdomains alike, so it is judged once,
against the stricter of the two minimums (code ``dmarc.policy``). The parent's ``p=`` is
its own mail's policy and not judged here. ``np=`` (RFC 9091: non-existent subdomains) is
kept in the evidence only: a sending domain exists (it publishes SPF, MX...), so ``np=``
never governs its mail. Several records at the organisational domain mean no policy at
all (6.6.3 step 5): ``dmarc.multiple_records``, naming that record.

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
from opsdrill.dns.orgdomain import organisational_domain, same_organisation
from opsdrill.dns.resolver import DnsAnswer, Lookups, Resolver, normalise_name
from opsdrill.dns.tags import TagList, parse_tags
from opsdrill.errors import ConfigError

POLICIES = ("none", "quarantine", "reject")
ALIGNMENT = ("r", "s")
# "DMARC1" is case-sensitive in the RFC 7489 ABNF; other TXT records are ignored.
RE_STRICT_VERSION = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")
RE_MAILTO = re.compile(r"^mailto:(?P<address>[^!]+)(?:!(?P<size>[0-9]+[kmgt]?))?$", re.I)
RE_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)

__all__ = ["DmarcReport", "analyse_dmarc"]


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
    # The organisational domain whose record applies, when the domain has none of its own,
    # and what the domain's own _dmarc name answered then.
    inherited_from: str | None = None
    own_answer: str | None = None
    # The policy receivers apply to the domain's own mail: p=, or the inherited sp=.
    applied_policy: str | None = None
    np: str | None = None

    @property
    def policy_domain(self) -> str:
        """The domain the applied record belongs to (RFC 7489 7.1 names it in report
        authorisations)."""
        return self.inherited_from or self.domain

    def details(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "record": self.record,
            "policy_record": self.name,
            "inherited_from": self.inherited_from,
            "own_record": self.own_answer,
            "applied_policy": self.applied_policy,
            "policy": self.policy,
            "subdomain_policy": self.subdomain_policy,
            "np": self.np,
            "rua": self.rua,
            "pct": self.pct,
            "adkim": self.adkim,
            "aspf": self.aspf,
            "rua_authorised": self.rua_authorised,
        }


def _check_policy_arg(name: str, value: str | None) -> None:
    if value is not None and value not in POLICIES:
        raise ConfigError(f"DMARC {name} {value!r}: expected one of {', '.join(POLICIES)}")


def _dmarc_records(answer: DnsAnswer) -> list[str]:
    return [r for r in answer.records if RE_STRICT_VERSION.match(r)]


def _holds(answer: DnsAnswer) -> str:
    """What a ``_dmarc`` name answered that has no v=DMARC1 record, for messages."""
    if not answer.records:
        return answer.status
    return f"no v=DMARC1 record; ignored: {quote_all(list(answer.records))}"


class _Checker:
    def __init__(self, report: DmarcReport, dns: Lookups) -> None:
        self.report = report
        self.dns = dns

    @property
    def what(self) -> str:
        """The record's description in a finding: says where an inherited one comes from."""
        report = self.report
        if report.inherited_from is None:
            return "dmarc"
        return (
            f"dmarc inherited by {report.domain} (no record of its own at "
            f"_dmarc.{report.domain}: {report.own_answer})"
        )

    def add(self, code: str, expected: str, found: str, name: str | None = None) -> None:
        what = "dmarc" if name is not None else self.what
        self.report.findings.append(
            finding(code, name or self.report.name, "TXT", what, expected, found)
        )

    def discover(self) -> list[str]:
        """The v=DMARC1 records that apply to the domain (RFC 7489 6.6.3 policy discovery):
        its own, else its organisational domain's (the report is then inherited)."""
        report = self.report
        own = self.dns.query(report.name, "TXT")
        records = _dmarc_records(own)
        if records:
            return records
        org = organisational_domain(report.domain)
        if org == report.domain:
            self.add("dmarc.missing", "one record starting with 'v=DMARC1'", _holds(own))
            return []
        parent = self.dns.query(f"_dmarc.{org}", "TXT")
        inherited = _dmarc_records(parent)
        if not inherited:
            self.add(
                "dmarc.missing",
                "one record starting with 'v=DMARC1'",
                f"{_holds(own)}; the organisational domain {org} publishes none either "
                f"(_dmarc.{org}: {_holds(parent)})",
            )
            return []
        report.inherited_from = org
        report.own_answer = _holds(own)
        report.name = f"_dmarc.{org}"
        return inherited

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
        # RFC 7489 7.1: the authorisation names the domain the policy was retrieved from.
        domain = self.report.policy_domain
        if same_organisation(destination, domain):
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

    def check_own_policy(
        self, tags: TagList, values: dict[str, str], min_policy: str, min_sub: str
    ) -> None:
        """p= for the domain's mail and sp= (default p=) for its subdomains."""
        report = self.report
        policy = report.applied_policy = values.get("p")
        if "p" not in tags.tags:
            self.add("dmarc.policy", f"p={min_policy} or stronger", "no p= tag")
        elif policy is None:
            if min_policy != "none":
                self.add(
                    "dmarc.policy",
                    f"p={min_policy} or stronger",
                    f"p={tags.tags['p']} (not a policy: receivers apply none)",
                )
        elif not _stronger_or_equal(policy, min_policy):
            self.add("dmarc.policy", f"p={min_policy} or stronger", f"p={policy}")
        sub = report.subdomain_policy
        if sub is not None and not _stronger_or_equal(sub, min_sub):
            shown = f"sp={sub}" if "sp" in values else f"no sp= (so p={sub} applies)"
            self.add("dmarc.subdomain_policy", f"sp={min_sub} or stronger", shown)

    def check_inherited_policy(
        self, tags: TagList, values: dict[str, str], min_policy: str, min_sub: str
    ) -> None:
        """The organisational domain's sp= (default p=) is the policy of the domain and of
        its subdomains: judged once, against the stricter minimum."""
        report = self.report
        minimum = max(min_policy, min_sub, key=POLICIES.index)
        expected = (
            f"sp={minimum} or stronger (the organisational domain's sp= is the policy of "
            f"{report.domain} and its subdomains)"
        )
        if report.policy is None:
            # RFC 7489 6.6.3 step 6: a record without a valid p= counts as p=none at best,
            # and its sp= is not applied.
            report.applied_policy = "none"
            written = f"p={tags.tags['p']}" if "p" in tags.tags else "no p= tag"
            if minimum != "none":
                self.add(
                    "dmarc.policy",
                    expected,
                    f"{written} in the inherited record (not a valid policy: receivers apply none)",
                )
            return
        applied = report.applied_policy = report.subdomain_policy or report.policy
        if not _stronger_or_equal(applied, minimum):
            shown = f"sp={applied}" if "sp" in values else f"no sp= (so p={applied} applies)"
            self.add("dmarc.policy", expected, shown)


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
    """Analyse the DMARC record that applies to ``domain`` (its own or inherited); see the
    module docstring.

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
    records = check.discover()
    if not records:
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
    values = {k: v.lower() for k, v in tags.tags.items() if k in ("p", "sp", "np", "adkim", "aspf")}
    for tag, allowed in (
        ("p", POLICIES),
        ("sp", POLICIES),
        ("np", POLICIES),
        ("adkim", ALIGNMENT),
        ("aspf", ALIGNMENT),
    ):
        if tag in values and values[tag] not in allowed:
            check.add(
                "dmarc.syntax", f"{tag}= one of {', '.join(allowed)}", f"{tag}={tags.tags[tag]}"
            )
            del values[tag]
    report.policy = values.get("p")
    report.subdomain_policy = values.get("sp", report.policy)
    report.np = values.get("np")
    min_sub = min_subdomain_policy or min_policy
    if report.inherited_from is None:
        check.check_own_policy(tags, values, min_policy, min_sub)
    else:
        check.check_inherited_policy(tags, values, min_policy, min_sub)
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
