"""DMARC: one record at ``_dmarc``, a policy at least the inventory's minimum, and
aggregate reports that reach a mailbox allowed to receive them.

A domain without a record of its own is covered by its organisational domain's (RFC 7489
6.6.3, ``opsdrill.dns.dmarc``): the three checks then judge that inherited record, with
its ``sp=`` as the domain's policy, and say so in their titles, messages and evidence.
When there is no single record (none, or several), the policy and reports checks fail
too, pointing at ``dns.dmarc.record``: without a record receivers apply no policy and
send no reports.
"""

from __future__ import annotations

import allure
import pytest

from opsdrill.dns import DmarcReport
from opsdrill.dns.dmarc import POLICIES
from opsdrill_pytest.checks import Check
from opsdrill_pytest.dns import RUNBOOK_MAIL, DnsTarget, attach_report, select

RUNBOOK = f"{RUNBOOK_MAIL}#dmarc"
# No record (or several, which receivers treat as none): the domain can be spoofed and
# large mailbox providers demand DMARC of bulk senders. Critical, not blocker: mail that
# passes SPF or DKIM is still delivered meanwhile.
RECORD = Check("dns.dmarc.record", "critical", RUNBOOK, "dns", "dmarc")
# A policy below the minimum: spoofed mail is delivered instead of rejected. Critical.
POLICY = Check("dns.dmarc.policy", "critical", RUNBOOK, "dns", "dmarc")
# Reports are the diagnostic feed (and the migration's proof); mail flows without them.
REPORTS = Check("dns.dmarc.reports", "normal", RUNBOOK, "dns", "dmarc")

RECORD_CODES = ("dmarc.missing", "dmarc.multiple_records", "dmarc.syntax")
POLICY_CODES = ("dmarc.policy", "dmarc.subdomain_policy", "dmarc.pct", "dmarc.alignment")
REPORT_CODES = ("dmarc.rua_missing", "dmarc.rua_invalid", "dmarc.rua_unauthorised")

pytestmark = pytest.mark.dns


def _source(report: DmarcReport) -> str:
    """Where the record a title speaks of comes from, when it is not the domain's own."""
    if report.inherited_from is None:
        return ""
    return (
        f" (inherited from {report.name}: {report.domain} has no record of its own, so "
        "the organisational domain's sp= applies)"
    )


def _needs_record(check: Check, target: DnsTarget, report: DmarcReport, expected: str) -> None:
    if report.record is not None:
        return
    found = select(report, ("dmarc.missing", "dmarc.multiple_records"))
    why = f" ({found[0].message})" if found else ""
    check.fail(
        target.id,
        f"DNS {report.name} TXT dmarc: expected {expected}, found no single DMARC record "
        f"to evaluate, see dns.dmarc.record{why}",
    )


@RECORD
def check_dmarc_record_is_single_and_valid(dns_target: DnsTarget) -> None:
    allure.dynamic.title(f"{dns_target.domain} publishes exactly one valid DMARC record")
    report = dns_target.dmarc()
    if report.inherited_from is not None:
        allure.dynamic.title(
            f"{dns_target.domain} is covered by exactly one valid DMARC record{_source(report)}"
        )
    attach_report("dmarc", report)
    RECORD.fail_with(dns_target.id, select(report, RECORD_CODES))


@POLICY
def check_dmarc_policy_is_at_least_the_minimum(dns_target: DnsTarget) -> None:
    want = dns_target.expected.dmarc
    alignment = "".join(
        f", {label}={mode}" for label, mode in (("adkim", want.adkim), ("aspf", want.aspf)) if mode
    )
    expected = (
        f"p={want.min_policy} or stronger, sp={want.subdomain_minimum} or stronger, "
        f"no pct= or pct=100{alignment}"
    )
    allure.dynamic.title(f"{dns_target.domain}'s DMARC record sets {expected}")
    report = dns_target.dmarc()
    if report.inherited_from is not None:
        minimum = max(want.min_policy, want.subdomain_minimum, key=POLICIES.index)
        allure.dynamic.title(
            f"{dns_target.domain}'s DMARC record sets sp={minimum} or stronger, no pct= or "
            f"pct=100{alignment}{_source(report)}"
        )
    attach_report("dmarc", report)
    _needs_record(POLICY, dns_target, report, expected)
    POLICY.fail_with(dns_target.id, select(report, POLICY_CODES))


@REPORTS
def check_dmarc_reports_reach_authorised_mailboxes(dns_target: DnsTarget) -> None:
    want = dns_target.expected.dmarc
    allure.dynamic.title(
        f"{dns_target.domain}'s DMARC aggregate reports (rua) go to valid mailto: addresses "
        "that accept them"
    )
    report = dns_target.dmarc()
    if report.inherited_from is not None:
        allure.dynamic.title(
            f"{dns_target.domain}'s DMARC aggregate reports (rua) go to valid mailto: "
            f"addresses that accept them{_source(report)}"
        )
    attach_report("dmarc", report)
    expected = "rua= with valid mailto: URIs" if want.require_rua else "valid rua= URIs if any"
    _needs_record(REPORTS, dns_target, report, expected)
    REPORTS.fail_with(dns_target.id, select(report, REPORT_CODES))
