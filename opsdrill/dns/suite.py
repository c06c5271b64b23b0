"""Every DNS analysis for one sending domain, with the inventory's expectations.

``expectations`` turns the inventory's view of a domain at one moment (its providers, and
both ends of a migration while the window is open) into plain parameters;
``analyse_domain`` runs SPF, every expected DKIM selector, DMARC and MX with them. The
checks run the same functions one analysis at a time (``spf_report``, ``dkim_report``...)
so each check only waits for what it reports on; the benchmark runs whole domains
concurrently over one shared resolver. No pytest here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from opsdrill.config.inventory import Inventory
from opsdrill.config.mail import DmarcExpectation, ExpectedSelector, Migration
from opsdrill.dns.dkim import DkimReport, analyse_dkim
from opsdrill.dns.dmarc import DmarcReport, analyse_dmarc
from opsdrill.dns.findings import DnsReport, Finding, finding
from opsdrill.dns.mx import MxReport, analyse_mx
from opsdrill.dns.resolver import Resolver
from opsdrill.dns.spf import SpfReport, analyse_spf

# RFC 7208 4.6.4: limits every receiver enforces; not configurable on purpose.
MAX_LOOKUPS = 10
MAX_VOID_LOOKUPS = 2


@dataclass(frozen=True)
class DomainExpectations:
    """What one domain must publish at ``now``. ``providers`` maps each provider expected
    at ``now`` to the SPF mechanisms it needs; ``migration_ends`` does the same for the
    two ends of the domain's migration (if any), whether or not its window is open."""

    domain: str
    now: datetime
    providers: dict[str, tuple[str, ...]]
    selectors: tuple[ExpectedSelector, ...]
    sending_ips: tuple[str, ...]
    receives_mail: bool
    forbidden_mx: tuple[str, ...]
    min_rsa_bits: int
    dmarc: DmarcExpectation
    migration: Migration | None = None
    migration_ends: dict[str, tuple[str, ...]] = field(default_factory=dict)
    migration_selectors: tuple[ExpectedSelector, ...] = ()
    # t=y tells receivers to ignore DKIM failures: never right for a sending domain.
    allow_dkim_testing: bool = False

    @property
    def migrating(self) -> bool:
        return self.migration is not None and self.migration.is_open(self.now)

    @property
    def required_spf(self) -> list[str]:
        """Every provider's mechanisms, each once, in inventory order."""
        return list(dict.fromkeys(m for mechs in self.providers.values() for m in mechs))

    def providers_needing(self, mechanism: str) -> list[str]:
        return [name for name, mechs in self.providers.items() if mechanism in mechs]


def expectations(inv: Inventory, domain: str, now: datetime | None = None) -> DomainExpectations:
    """The inventory's expectations for ``domain`` at ``now`` (default: the current time)."""
    now = now or datetime.now(UTC)
    spec = inv.sending_domain(domain)
    name = domain.rstrip(".").lower()
    providers = inv.providers_for(name, now)
    ends: dict[str, tuple[str, ...]] = {}
    end_selectors: list[ExpectedSelector] = []
    if spec.migration is not None:
        for end in (spec.migration.from_, spec.migration.to):
            provider = inv.model.mail_providers.get(end)
            if provider is None:
                continue
            ends[end] = tuple(provider.spf)
            end_selectors += [
                ExpectedSelector(sel, end, provider.dkim_cname_suffix)
                for sel in provider.dkim_selectors
            ]
    return DomainExpectations(
        domain=name,
        now=now,
        providers={p: tuple(cfg.spf) for p, cfg in providers.items()},
        selectors=tuple(inv.dkim_selectors_for(name, now)),
        sending_ips=tuple(spec.sending_ips),
        receives_mail=spec.receives_mail,
        forbidden_mx=tuple(spec.forbidden_mx),
        min_rsa_bits=spec.dkim_min_rsa_bits,
        dmarc=spec.dmarc,
        migration=spec.migration,
        migration_ends=ends,
        migration_selectors=tuple(end_selectors),
    )


def spf_report(resolver: Resolver, exp: DomainExpectations) -> SpfReport:
    """SPF with every expected provider's mechanisms; ``~all`` only while migrating."""
    return analyse_spf(
        resolver,
        exp.domain,
        required=exp.required_spf,
        allow_softfail=exp.migrating,
        max_lookups=MAX_LOOKUPS,
        max_void_lookups=MAX_VOID_LOOKUPS,
        sending_ips=exp.sending_ips,
    )


def migration_spf_report(resolver: Resolver, exp: DomainExpectations) -> SpfReport:
    """SPF requiring both ends of the migration (whatever the window says)."""
    required = list(dict.fromkeys(m for mechs in exp.migration_ends.values() for m in mechs))
    return analyse_spf(
        resolver,
        exp.domain,
        required=required,
        allow_softfail=True,
        max_lookups=MAX_LOOKUPS,
        max_void_lookups=MAX_VOID_LOOKUPS,
    )


def providers_missing(report: SpfReport, exp: DomainExpectations) -> list[str]:
    """For each required mechanism the record does not authorise, which expected
    providers need it: ``include:_spf.google.com is needed by provider google``."""
    return [
        f"{mechanism} is needed by provider {', '.join(exp.providers_needing(mechanism))}"
        for mechanism in exp.required_spf
        if mechanism not in report.required_found
    ]


def migration_missing(report: SpfReport, exp: DomainExpectations) -> list[str]:
    """Each mechanism of either end of the migration the record does not authorise, by
    provider: ``include:amazonses.com for provider ses``."""
    return [
        f"{mechanism} for provider {name}"
        for name, mechanisms in exp.migration_ends.items()
        for mechanism in mechanisms
        if mechanism not in report.required_found
    ]


def migration_rua_findings(report: DmarcReport) -> list[Finding]:
    """A migration needs aggregate reports to confirm both providers align, whatever the
    inventory's ``require_rua``: a record without ``rua=`` is a finding here."""
    if report.record is None or report.rua:
        return []
    return [
        finding(
            "dmarc.rua_missing",
            report.name,
            "TXT",
            "dmarc",
            "rua= with at least one mailto: URI (reports confirm both providers align)",
            "no rua= URI (the inventory does not require one, the migration does)",
        )
    ]


def dkim_report(resolver: Resolver, exp: DomainExpectations, sel: ExpectedSelector) -> DkimReport:
    return analyse_dkim(
        resolver,
        exp.domain,
        sel.selector,
        min_rsa_bits=exp.min_rsa_bits,
        allow_testing=exp.allow_dkim_testing,
        cname_suffix=sel.cname_suffix,
    )


def dmarc_report(resolver: Resolver, exp: DomainExpectations) -> DmarcReport:
    return analyse_dmarc(
        resolver,
        exp.domain,
        min_policy=exp.dmarc.min_policy,
        min_subdomain_policy=exp.dmarc.subdomain_minimum,
        require_rua=exp.dmarc.require_rua,
        adkim=exp.dmarc.adkim,
        aspf=exp.dmarc.aspf,
    )


def mx_report(resolver: Resolver, exp: DomainExpectations) -> MxReport:
    return analyse_mx(
        resolver, exp.domain, receives_mail=exp.receives_mail, forbidden_hosts=exp.forbidden_mx
    )


@dataclass
class DomainAnalysis:
    domain: str
    spf: SpfReport
    dkim: dict[str, DkimReport]
    dmarc: DmarcReport
    mx: MxReport

    @property
    def reports(self) -> list[DnsReport]:
        return [self.spf, *self.dkim.values(), self.dmarc, self.mx]

    @property
    def findings(self) -> list[Finding]:
        return [f for report in self.reports for f in report.findings]

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def answers(self) -> int:
        return sum(len(report.answers) for report in self.reports)


def analyse_domain(resolver: Resolver, exp: DomainExpectations) -> DomainAnalysis:
    """Every analysis for one domain, in sequence (run domains concurrently instead).

    Raises ``TargetUnreachable`` as soon as DNS cannot answer one of them.
    """
    return DomainAnalysis(
        domain=exp.domain,
        spf=spf_report(resolver, exp),
        dkim={sel.selector: dkim_report(resolver, exp, sel) for sel in exp.selectors},
        dmarc=dmarc_report(resolver, exp),
        mx=mx_report(resolver, exp),
    )
