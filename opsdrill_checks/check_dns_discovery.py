"""Every domain the application sends from is described in the inventory.

Per-port overrides let a portal send from its own domain; a domain nobody listed gets no
SPF, DKIM or DMARC checks, and its mail quietly lands in spam. The discovery query reads
the domains from the application's database (read-only, under a statement timeout).
"""

from __future__ import annotations

import allure
import pytest

from opsdrill.dns.discovery import discovery_findings
from opsdrill_pytest.checks import Check, attach_json
from opsdrill_pytest.dns import RUNBOOK_MAIL, DiscoveryTarget

# A sending domain without expectations is unchecked: critical.
DISCOVERY = Check(
    "dns.discovery", "critical", f"{RUNBOOK_MAIL}#discovery", "dns", "sending domain discovery"
)

pytestmark = pytest.mark.dns


@DISCOVERY
def check_every_discovered_domain_is_in_the_inventory(discovery_target: DiscoveryTarget) -> None:
    allure.dynamic.title(
        f"every domain the {discovery_target.database} database sends from is described "
        "in the inventory"
    )
    found = discovery_target.discover()
    listed = discovery_target.listed
    unknown = sorted(found.domains - listed)
    attach_json(
        "discovery",
        {
            **found.evidence(),
            "inventory_sending_domains": sorted(listed),
            "discovered_not_in_inventory": unknown,
            "in_inventory_not_discovered": sorted(listed - found.domains),
        },
    )
    allure.dynamic.parameter("discovered", ", ".join(sorted(found.domains)) or "none")
    problems = discovery_findings(found, listed)
    if problems:
        DISCOVERY.fail(
            discovery_target.id,
            f"expected every domain found by sending_domain_discovery.query in "
            f"{found.database} ({found.where}) to be in [sending_domains], found: "
            + "; ".join(f.message for f in problems),
        )
