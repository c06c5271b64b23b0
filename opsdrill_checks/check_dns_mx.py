"""MX: mail for the domain reaches real mail hosts, or the domain says it takes none."""

from __future__ import annotations

import allure
import pytest

from opsdrill_pytest.checks import Check
from opsdrill_pytest.dns import RUNBOOK_MAIL, DnsTarget, attach_report

# Mail to the domain lost, bounced, or delivered to the application host. Critical.
MX = Check("dns.mx", "critical", f"{RUNBOOK_MAIL}#mx", "dns", "mx")

pytestmark = pytest.mark.dns


@MX
def check_mx_records_match_whether_the_domain_receives_mail(dns_target: DnsTarget) -> None:
    exp = dns_target.expected
    if exp.receives_mail:
        forbidden = ", ".join(exp.forbidden_mx)
        title = (
            f"{dns_target.domain}'s MX records point at mail hosts with addresses, "
            "not CNAMEs" + (f", never at {forbidden}" if forbidden else "")
        )
    else:
        title = f"{dns_target.domain} publishes no MX or a null MX (it receives no mail)"
    allure.dynamic.title(title)
    report = dns_target.mx()
    attach_report("mx", report)
    MX.fail_with(dns_target.id, report.findings)
