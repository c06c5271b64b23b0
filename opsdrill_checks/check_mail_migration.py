"""Migration readiness: a domain moving between mail providers can send through both.

For each domain with a ``migration`` section whose window is open: both providers' DKIM
selectors resolve to usable keys, SPF authorises both while staying within the lookup
limits, and DMARC aggregate reports are set up so they can confirm that both align before
the old provider is removed. The checks take ``migration_target``, the domains with such a
section: an inventory with none skips each check once, as not configured, instead of once
per domain. Run on demand with ``pytest --pyargs opsdrill_checks -m migration``.
"""

from __future__ import annotations

import allure
import pytest

from opsdrill.dns import Finding
from opsdrill.dns.suite import MAX_LOOKUPS, migration_missing, migration_rua_findings
from opsdrill_pytest.checks import Check, attach_json
from opsdrill_pytest.dns import RUNBOOK_MAIL, DnsTarget, attach_report, select

RUNBOOK = f"{RUNBOOK_MAIL}#migration"
FEATURE = "provider migration"
# Switching senders before the new provider's key resolves (or before SPF names it) fails
# authentication for everything the new provider sends. Critical.
DKIM = Check("migration.dkim", "critical", RUNBOOK, "mail", FEATURE)
SPF = Check("migration.spf", "critical", RUNBOOK, "mail", FEATURE)
# Without reports the migration cannot be confirmed, but no mail is lost. Normal.
DMARC = Check("migration.dmarc", "normal", RUNBOOK, "mail", FEATURE)

# Everything that stops the record from authorising both providers: a record problem
# (an include that does not resolve authorises nobody), a missing mechanism, the limits.
# Not the policy: '~all' is allowed while the window is open.
SPF_CODES = (
    "spf.missing",
    "spf.multiple_records",
    "spf.syntax",
    "spf.string_too_long",
    "spf.all_not_last",
    "spf.redirect_ignored",
    "spf.include_missing",
    "spf.redirect_missing",
    "spf.include_loop",
    "spf.missing_mechanism",
    "spf.too_many_lookups",
    "spf.too_many_void_lookups",
    "spf.too_many_mx",
)
DMARC_CODES = (
    "dmarc.missing",
    "dmarc.multiple_records",
    "dmarc.rua_missing",
    "dmarc.rua_invalid",
    "dmarc.rua_unauthorised",
)

pytestmark = [pytest.mark.dns, pytest.mark.migration]


def _migrating(target: DnsTarget) -> str:
    """``"A -> B"`` for a domain in an open migration window; skips a closed window."""
    migration = target.expected.migration
    if migration is None:  # migration_target holds only domains with a migration section
        raise RuntimeError(
            f"{target.domain}: a migration check got a domain without a migration section "
            "(a bug in opsdrill, not a verdict on the domain)"
        )
    if not target.expected.migrating:
        pytest.skip(
            f"{target.domain}: the migration {migration.from_} -> {migration.to} window closed "
            f"at {migration.until.isoformat()}; the dns.* checks expect its providers list now"
        )
    return f"{migration.from_} -> {migration.to}"


@DKIM
def check_both_providers_dkim_selectors_resolve(migration_target: DnsTarget) -> None:
    domain = migration_target.domain
    allure.dynamic.title(f"{domain} can be DKIM-signed by both migration providers")
    move = _migrating(migration_target)
    allure.dynamic.title(
        f"{domain} is ready to move {move}: both providers' DKIM selectors resolve"
    )
    selectors = migration_target.expected.migration_selectors
    allure.dynamic.parameter("selectors", ", ".join(s.selector for s in selectors) or "none")
    findings: list[Finding] = []
    failing: list[str] = []
    for sel in selectors:
        report = migration_target.dkim(sel)
        attach_report(f"dkim {sel.selector} ({sel.provider})", report)
        if report.findings:
            findings += report.findings
            failing.append(f"provider {sel.provider}'s selector {report.name}")
    attach_json(
        "migration selectors",
        [
            {"selector": s.selector, "provider": s.provider, "cname_suffix": s.cname_suffix}
            for s in selectors
        ],
    )
    DKIM.fail_with(
        migration_target.id,
        findings,
        note=f"migration {move}: not ready: {', '.join(failing)}",
    )


@SPF
def check_spf_authorises_both_providers_within_limits(migration_target: DnsTarget) -> None:
    domain = migration_target.domain
    allure.dynamic.title(f"{domain}'s SPF record authorises both migration providers")
    move = _migrating(migration_target)
    allure.dynamic.title(
        f"{domain} is ready to move {move}: SPF authorises both providers within "
        f"{MAX_LOOKUPS} lookups"
    )
    report = migration_target.migration_spf()
    ends = migration_target.expected.migration_ends
    attach_report("spf (both providers)", report, extra={"providers": ends})
    missing = migration_missing(report, migration_target.expected)
    note = f"migration {move}" + (f": missing {', '.join(missing)}" if missing else "")
    SPF.fail_with(migration_target.id, select(report, SPF_CODES), note=note)


@DMARC
def check_dmarc_reports_can_confirm_alignment(migration_target: DnsTarget) -> None:
    allure.dynamic.title(f"{migration_target.domain}'s DMARC reports can confirm the migration")
    move = _migrating(migration_target)
    allure.dynamic.title(
        f"{migration_target.domain} is ready to move {move}: DMARC aggregate reports (rua) are "
        "set so they confirm both providers align"
    )
    report = migration_target.dmarc()
    attach_report("dmarc", report)
    findings = select(report, DMARC_CODES) or migration_rua_findings(report)
    DMARC.fail_with(migration_target.id, findings, note=f"migration {move}")
