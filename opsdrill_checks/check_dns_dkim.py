"""DKIM: every selector a domain signs with publishes a usable, strong key.

Parametrised per domain and selector (``dkim:example.test/sel1``): the domain's own
selectors and those of each provider expected for it (both ends while a migration window
is open). Provider selectors must be CNAMEs into the provider's zone, which is followed.
"""

from __future__ import annotations

import allure
import pytest

from opsdrill_pytest.checks import Check
from opsdrill_pytest.dns import RUNBOOK_MAIL, DkimTarget, attach_report

# A missing, revoked, weak or unusable key fails the DKIM signature of every message
# signed with this selector at every receiver; with SPF alone left for DMARC alignment,
# mail is rejected under p=reject. Hence blocker.
SELECTOR = Check("dns.dkim.selector", "blocker", f"{RUNBOOK_MAIL}#dkim", "dns", "dkim")

pytestmark = pytest.mark.dns


@SELECTOR
def check_dkim_selector_publishes_a_usable_key(dkim_target: DkimTarget) -> None:
    domain = dkim_target.domain_target
    allure.dynamic.title(
        f"{domain.domain} publishes a usable DKIM key at selector "
        f"{dkim_target.expected.selector} ({dkim_target.owner})"
    )
    allure.dynamic.parameter("min_rsa_bits", domain.expected.min_rsa_bits)
    report = dkim_target.report()
    attach_report(f"dkim {dkim_target.expected.selector}", report)
    if report.key_bits is not None:
        allure.dynamic.parameter("key", f"{report.key_type} {report.key_bits} bits")
    SELECTOR.fail_with(dkim_target.id, report.findings)
