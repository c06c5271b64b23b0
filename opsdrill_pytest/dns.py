"""Facades for the DNS checks: one per sending domain, per DKIM selector, per discovery.

``dns_targets(inv)`` builds them once per process and inventory, around one shared
``DnsResolver`` configured from ``[dns]``, so the five SPF checks of a domain share one
analysis (and one set of queries) per worker, as the drill checks share one drill. Nothing
is queried at construction: collection never touches DNS or the database. An analysis
that hit an unreachable resolver is remembered as that error, so every check that needs
it is broken with the same message instead of waiting out the timeout again.

The helpers at the bottom are the DNS checks' common reporting: raw answers and the
report's evidence to Allure, and the findings a check covers (``select``), which it fails
with (``Check.fail_with``: each names the domain, the record, what was expected and what
was found).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, TypeVar

from opsdrill.config.inventory import Inventory
from opsdrill.config.mail import ExpectedSelector, SendingDomain
from opsdrill.dns import DkimReport, DmarcReport, DnsReport, DnsResolver, Finding, MxReport
from opsdrill.dns.discovery import Discovery, discover_sending_domains
from opsdrill.dns.spf import SpfReport
from opsdrill.dns.suite import (
    DomainExpectations,
    dkim_report,
    dmarc_report,
    expectations,
    migration_spf_report,
    mx_report,
    spf_report,
)
from opsdrill.errors import ConfigError, OpsdrillError
from opsdrill_pytest.checks import attach_json, attach_text

T = TypeVar("T")
RUNBOOK_MAIL = "docs/runbooks/email-deliverability.md"


# The analyses each DNS check module reads; any other module that takes a domain gets all.
ANALYSES_BY_MODULE = {
    "check_dns_spf": ("spf",),
    "check_dns_dmarc": ("dmarc",),
    "check_dns_mx": ("mx",),
    "check_mail_migration": ("dmarc", "migration_spf"),
}
ALL_ANALYSES = ("spf", "dmarc", "mx")
WARM_WORKERS = 16  # concurrent analyses (bench_dns: 4 to 32 workers are alike)


class SharedResolver:
    """One ``DnsResolver`` for every target of an inventory, created on first use (a
    missing system resolver configuration then breaks the checks, not the collection).

    It also runs the run's analyses concurrently: the plugin plans, after collection, the
    analyses the selected checks will read (``plan``), and the first check that needs one
    runs them all at once over the shared resolver (``warm``); each check then reads its
    memo. A plain pytest run is otherwise one check at a time, so 100 domains would wait
    out their queries one after another. Not under xdist, where each worker analyses
    only what it is given, as before."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        self._planned: list[Callable[[], object]] = []
        self._warming = threading.Lock()

    def plan(self, analyses: list[Callable[[], object]]) -> None:
        self._planned = analyses

    def warm(self) -> None:
        if not self._planned:
            return
        with self._warming:
            planned, self._planned = self._planned, []
            if not planned:
                return
            try:
                self.resolver  # noqa: B018 - created once, before the threads share it
            except Exception:  # the checks report it, each with its own message
                return
            with ThreadPoolExecutor(WARM_WORKERS, thread_name_prefix="dns") as pool:
                for future in [pool.submit(analysis) for analysis in planned]:
                    # an error is memoised (or raised again) where a check asks for it
                    with contextlib.suppress(Exception):
                        future.result()

    @cached_property
    def resolver(self) -> DnsResolver:
        settings = self.inv.dns
        return DnsResolver(
            list(settings.nameservers) or None, settings.port, settings.timeout_seconds,
            remember=True,  # one run, one snapshot of DNS: shared records asked once
        )  # fmt: skip

    @property
    def where(self) -> str:
        settings = self.inv.dns
        servers = ", ".join(f"{ns}:{settings.port}" for ns in settings.nameservers)
        return servers or "the system resolver"


@dataclass
class _Memo:
    """Results (or the error) of analyses already run in this process."""

    values: dict[Any, Any] = field(default_factory=dict)

    def get(self, key: Any, compute: Callable[[], T]) -> T:
        if key not in self.values:
            try:
                self.values[key] = compute()
            except OpsdrillError as exc:
                self.values[key] = exc
        value = self.values[key]
        if isinstance(value, OpsdrillError):
            raise value
        result: T = value
        return result


class DnsTarget:
    """A sending domain the way the checks see it: its expectations and its analyses."""

    def __init__(self, inv: Inventory, domain: str, shared: SharedResolver, now: datetime):
        self.inv = inv
        self.domain = domain
        self.shared = shared
        self.now = now
        self._memo = _Memo()

    @property
    def id(self) -> str:
        return f"dns:{self.domain}"

    def __repr__(self) -> str:  # Allure records parameters by repr: keep it to the id
        return self.id

    @property
    def spec(self) -> SendingDomain:
        return self.inv.sending_domain(self.domain)

    @cached_property
    def expected(self) -> DomainExpectations:
        return expectations(self.inv, self.domain, self.now)

    @property
    def resolver(self) -> DnsResolver:
        return self.shared.resolver

    def spf(self) -> SpfReport:
        self.shared.warm()
        return self._memo.get("spf", lambda: spf_report(self.resolver, self.expected))

    def migration_spf(self) -> SpfReport:
        self.shared.warm()
        return self._memo.get("mspf", lambda: migration_spf_report(self.resolver, self.expected))

    def dkim(self, sel: ExpectedSelector) -> DkimReport:
        self.shared.warm()
        return self._memo.get(("dkim", sel), lambda: dkim_report(self.resolver, self.expected, sel))

    def dmarc(self) -> DmarcReport:
        self.shared.warm()
        return self._memo.get("dmarc", lambda: dmarc_report(self.resolver, self.expected))

    def mx(self) -> MxReport:
        self.shared.warm()
        return self._memo.get("mx", lambda: mx_report(self.resolver, self.expected))

    def migration_line(self) -> str:
        """How the inventory sees the domain's migration, for titles and messages."""
        migration = self.spec.migration
        if migration is None:
            return "no migration in the inventory"
        state = "open until" if migration.is_open(self.now) else "closed at"
        return (
            f"migration {migration.from_} -> {migration.to}, window {state} "
            f"{migration.until.isoformat()}"
        )


class DkimTarget:
    """One DKIM selector a domain must publish: ``dkim:example.test/sel1``."""

    def __init__(self, domain: DnsTarget, expected: ExpectedSelector) -> None:
        self.domain_target = domain
        self.expected = expected

    @property
    def id(self) -> str:
        return f"dkim:{self.domain_target.domain}/{self.expected.selector}"

    def __repr__(self) -> str:
        return self.id

    @property
    def name(self) -> str:
        return f"{self.expected.selector}._domainkey.{self.domain_target.domain}"

    @property
    def owner(self) -> str:
        """Whose key it is, for titles: the domain's own or a provider's."""
        if self.expected.provider is None:
            return "its own key"
        via = f", CNAME into {self.expected.cname_suffix}" if self.expected.cname_suffix else ""
        return f"provider {self.expected.provider}{via}"

    def report(self) -> DkimReport:
        return self.domain_target.dkim(self.expected)


class DiscoveryTarget:
    """The inventory's sending-domain discovery query: ``discovery:crm``."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        cfg = inv.model.sending_domain_discovery
        if cfg is None:
            raise ConfigError(f"{inv.path}: no [sending_domain_discovery] section")
        self.database = cfg.database
        self._memo = _Memo()

    @property
    def id(self) -> str:
        return f"discovery:{self.database}"

    def __repr__(self) -> str:
        return self.id

    def discover(self) -> Discovery:
        return self._memo.get("discovery", lambda: discover_sending_domains(self.inv))

    @property
    def listed(self) -> set[str]:
        return set(self.inv.model.sending_domains)


@dataclass(frozen=True)
class DnsTargets:
    domains: list[DnsTarget]
    selectors: list[DkimTarget]
    discovery: list[DiscoveryTarget]
    migrating: list[DnsTarget]  # the domains with a migration section, open or closed


_BUILT: dict[int, tuple[Inventory, DnsTargets]] = {}


def dns_targets(inv: Inventory) -> DnsTargets:
    """The DNS facades of ``inv``, built once per process (see the module docstring)."""
    hit = _BUILT.get(id(inv))
    if hit is not None and hit[0] is inv:
        return hit[1]
    now = datetime.now(UTC)
    shared = SharedResolver(inv)
    domains = [DnsTarget(inv, name, shared, now) for name in inv.model.sending_domains]
    selectors = [
        DkimTarget(target, sel)
        for target in domains
        for sel in inv.dkim_selectors_for(target.domain, now)
    ]
    discovery = [DiscoveryTarget(inv)] if inv.model.sending_domain_discovery else []
    migrating = [target for target in domains if target.spec.migration is not None]
    built = DnsTargets(domains, selectors, discovery, migrating)
    _BUILT[id(inv)] = (inv, built)
    return built


# -- reporting helpers for the checks --------------------------------------------------------


def plan_analyses(targets: Collection[tuple[str, Any]]) -> None:
    """What the selected checks will read, as (check module, target) pairs from the
    collected items: planned on each inventory's shared resolver (``SharedResolver``)."""
    plans: dict[int, tuple[SharedResolver, dict[tuple[int, str], Callable[[], object]]]] = {}
    for module, target in targets:
        if isinstance(target, DkimTarget):
            shared = target.domain_target.shared
            calls = {(id(target), "dkim"): target.report}
        elif isinstance(target, DnsTarget):
            shared = target.shared
            names = ANALYSES_BY_MODULE.get(module, ALL_ANALYSES)
            calls = {(id(target), name): getattr(target, name) for name in names}
        else:
            continue
        plans.setdefault(id(shared), (shared, {}))[1].update(calls)
    for shared, planned in plans.values():
        shared.plan(list(planned.values()))


def attach_report(label: str, report: DnsReport, *, extra: dict[str, Any] | None = None) -> None:
    """The raw DNS answers (zone-file text, every query the analysis made) and the
    report's evidence JSON."""
    answers = "\n\n".join(answer.text for answer in report.answers)
    attach_text(f"{label}: raw DNS answers", answers or "(no DNS answers)")
    attach_json(f"{label}: evidence", {**report.evidence(), **(extra or {})})


def select(report: DnsReport, codes: Collection[str]) -> list[Finding]:
    """The report's findings a check covers (it then fails with them: ``Check.fail_with``)."""
    return [f for f in report.findings if f.code in codes]
