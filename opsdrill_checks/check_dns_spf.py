"""SPF: each sending domain publishes one valid record that authorises exactly its
providers, fails everyone else, and stays within the RFC 7208 limits.

One analysis per domain (``DnsTarget.spf``) feeds six checks, each reporting its own
findings; a check's severity is the harm of its findings (a permerror for every message
is a blocker, a deprecated term that still evaluates is minor). When there is no single
record to evaluate (none, or several), the checks that read the record fail too, pointing
at ``dns.spf.record``: a domain without a usable record has no policy and authorises
nobody.
"""

from __future__ import annotations

import allure
import pytest

from opsdrill.dns.spf import SpfReport
from opsdrill.dns.suite import MAX_LOOKUPS, MAX_VOID_LOOKUPS, providers_missing
from opsdrill.errors import TargetUnreachable
from opsdrill_pytest.checks import Check, attach_text
from opsdrill_pytest.dns import RUNBOOK_MAIL, DnsTarget, attach_report, select

RUNBOOK = f"{RUNBOOK_MAIL}#spf"
# A broken record is a permerror (or "none") for every message the domain sends: SPF fails
# at every receiver at once and DMARC rests on DKIM alone. Hence blocker.
RECORD = Check("dns.spf.record", "blocker", RUNBOOK, "dns", "spf")
# +all/?all/~all, or an include/redirect that passes any address: anyone may send as the
# domain (or be treated leniently). Critical.
POLICY = Check("dns.spf.policy", "critical", RUNBOOK, "dns", "spf")
# A provider missing from SPF: that provider's mail fails SPF now. Critical.
PROVIDERS = Check("dns.spf.providers", "critical", RUNBOOK, "dns", "spf")
# Over the limits is a permerror at every receiver, exactly like a broken record.
LOOKUPS = Check("dns.spf.lookups", "blocker", RUNBOOK, "dns", "spf")
# A known sending IP that does not pass: its mail fails SPF now. Critical.
SENDERS = Check("dns.spf.senders", "critical", RUNBOOK, "dns", "spf")
# ptr, or a redirect= next to an 'all': the record still evaluates (no permerror), so mail
# flows; a deprecated or a dead term is cleaned up at leisure. Minor.
HYGIENE = Check("dns.spf.hygiene", "minor", RUNBOOK, "dns", "spf")

RECORD_CODES = (
    "spf.missing",
    "spf.multiple_records",
    "spf.syntax",
    "spf.string_too_long",
    "spf.all_not_last",
    "spf.include_missing",
    "spf.redirect_missing",
    "spf.include_loop",
)
POLICY_CODES = ("spf.softfail", "spf.all_qualifier", "spf.permissive")
PROVIDER_CODES = ("spf.missing_mechanism",)
LIMIT_CODES = ("spf.too_many_lookups", "spf.too_many_void_lookups", "spf.too_many_mx")
SENDER_CODES = ("spf.check_host",)
HYGIENE_CODES = ("spf.ptr", "spf.redirect_ignored")

pytestmark = pytest.mark.dns


def _needs_record(check: Check, target: DnsTarget, report: SpfReport, expected: str) -> None:
    """Fail when there is no single record to read (dns.spf.record says why)."""
    if report.record is not None:
        return
    found = "no SPF record" if not report.records else f"{len(report.records)} SPF records"
    check.fail(
        target.id,
        f"DNS {target.domain} TXT spf: expected {expected}, found {found}, so no single "
        "record to evaluate (see dns.spf.record)",
    )


@RECORD
def check_spf_record_is_single_and_valid(dns_target: DnsTarget) -> None:
    allure.dynamic.title(f"{dns_target.domain} publishes exactly one valid SPF record")
    report = dns_target.spf()
    attach_report("spf", report)
    RECORD.fail_with(dns_target.id, select(report, RECORD_CODES))


@POLICY
def check_spf_policy_fails_unauthorised_senders(dns_target: DnsTarget) -> None:
    exp = dns_target.expected
    allowed = "'-all' ('~all' allowed: migration window open)" if exp.migrating else "'-all'"
    allure.dynamic.title(f"{dns_target.domain}'s SPF record ends in {allowed}")
    allure.dynamic.parameter("migration", dns_target.migration_line())
    report = dns_target.spf()
    attach_report("spf", report)
    _needs_record(POLICY, dns_target, report, allowed)
    POLICY.fail_with(dns_target.id, select(report, POLICY_CODES), note=dns_target.migration_line())


@PROVIDERS
def check_spf_authorises_every_provider(dns_target: DnsTarget) -> None:
    exp = dns_target.expected
    names = ", ".join(exp.providers) or "none"
    allure.dynamic.title(f"{dns_target.domain}'s SPF record authorises every provider ({names})")
    report = dns_target.spf()
    attach_report(
        "spf",
        report,
        extra={"expected_providers": {name: list(m) for name, m in exp.providers.items()}},
    )
    _needs_record(
        PROVIDERS, dns_target, report, f"mechanisms {', '.join(exp.required_spf)} authorised"
    )
    notes = providers_missing(report, exp)
    PROVIDERS.fail_with(dns_target.id, select(report, PROVIDER_CODES), note="; ".join(notes))


@LOOKUPS
def check_spf_stays_within_lookup_limits(dns_target: DnsTarget) -> None:
    allure.dynamic.title(
        f"{dns_target.domain}'s SPF record needs at most {MAX_LOOKUPS} DNS lookups and "
        f"{MAX_VOID_LOOKUPS} void lookups"
    )
    report = dns_target.spf()
    attach_text("spf include tree (lookups counted)", report.tree_text())
    attach_report("spf", report)
    allure.dynamic.parameter("lookups", report.lookups)
    allure.dynamic.parameter("void_lookups", report.void_lookups)
    _needs_record(LOOKUPS, dns_target, report, f"at most {MAX_LOOKUPS} DNS-querying terms")
    LOOKUPS.fail_with(
        dns_target.id,
        select(report, LIMIT_CODES),
        note=f"{report.lookups} lookups, {report.void_lookups} void; tree in the evidence",
    )


@SENDERS
def check_spf_passes_every_known_sending_ip(dns_target: DnsTarget) -> None:
    ips = dns_target.expected.sending_ips
    shown = ", ".join(ips) or "none listed"
    allure.dynamic.title(f"{dns_target.domain}'s SPF record passes every sending IP ({shown})")
    if not ips:
        pytest.skip(
            f"{dns_target.domain}: the inventory lists no sending_ips, so there is no "
            "address to evaluate check_host() for"
        )
    report = dns_target.spf()
    attach_report("spf", report)
    temporary = {ip: r for ip, r in report.senders.items() if r.result == "temperror"}
    if temporary:  # DNS did not answer during the evaluation: we learnt nothing
        ip, result = next(iter(temporary.items()))
        raise TargetUnreachable(
            f"{dns_target.id}: check_host({ip}) for {dns_target.domain}: temperror: "
            f"{result.explanation}"
        )
    SENDERS.fail_with(dns_target.id, select(report, SENDER_CODES))


@HYGIENE
def check_spf_uses_no_deprecated_or_ignored_terms(dns_target: DnsTarget) -> None:
    allure.dynamic.title(
        f"{dns_target.domain}'s SPF record uses no deprecated 'ptr' and no redirect= that an "
        "'all' makes dead"
    )
    report = dns_target.spf()
    attach_report("spf", report)
    _needs_record(HYGIENE, dns_target, report, "no 'ptr' and no redirect= next to an 'all'")
    HYGIENE.fail_with(
        dns_target.id,
        select(report, HYGIENE_CODES),
        note="minor: mail still evaluates; clean up at the next change of the record",
    )
