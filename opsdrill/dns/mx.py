"""MX records: mail reaches the right hosts, or the domain says plainly it takes none.

``analyse_mx`` with ``receives_mail=True`` checks: MX records present (an implicit MX via
the A record is not enough: it is an accident, not a configuration); no null MX; every
target resolves to A/AAAA; no target is a CNAME (RFC 2181 10.3, RFC 5321 5.1: senders
may refuse it); no target is a forbidden host (e.g. the application server), compared by
normalised name and by address, so an alias of the forbidden host is caught too. With
``receives_mail=False``: no MX at all, or a single null MX ``0 .`` (RFC 7505), which
tells senders to fail fast instead of queueing. Forbidden hosts given as IP addresses
are compared by address only.

Codes: mx.missing, mx.null, mx.no_address, mx.cname, mx.forbidden, mx.unexpected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opsdrill.dns.findings import DnsReport, finding, quote, quote_all
from opsdrill.dns.resolver import Lookups, Resolver, mx_records, normalise_name


@dataclass(kw_only=True)
class MxReport(DnsReport):
    receives_mail: bool
    mx: list[tuple[int, str]] = field(default_factory=list)
    null_mx: bool = False
    addresses: dict[str, list[str]] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        return {
            "receives_mail": self.receives_mail,
            "mx": [f"{pref} {host}" for pref, host in self.mx],
            "null_mx": self.null_mx,
            "addresses": self.addresses,
        }


def _forbidden_addresses(dns: Lookups, forbidden: Sequence[str]) -> dict[str, str]:
    """address -> the forbidden host it belongs to."""
    owners: dict[str, str] = {}
    for host in forbidden:
        try:
            owners[str(ipaddress.ip_address(host.strip()))] = host.strip()
            continue
        except ValueError:
            pass
        addresses, _ = dns.addresses(host)
        for address in addresses:
            owners.setdefault(address, normalise_name(host))
    return owners


def analyse_mx(
    resolver: Resolver,
    domain: str,
    *,
    receives_mail: bool,
    forbidden_hosts: Sequence[str] = (),
) -> MxReport:
    """Analyse ``domain``'s MX records; see the module docstring.

    Raises ``TargetUnreachable`` when DNS cannot answer.
    """
    domain = normalise_name(domain)
    dns = Lookups(resolver)
    report = MxReport(domain=domain, receives_mail=receives_mail)
    report.answers = dns.answers

    def add(code: str, expected: str, found: str) -> None:
        report.findings.append(finding(code, domain, "MX", "mx", expected, found))

    answer = dns.query(domain, "MX")
    report.mx = sorted(mx_records(answer))
    shown = quote_all(list(answer.records))
    report.null_mx = any(host == "." for _, host in report.mx)
    if not receives_mail:
        if report.mx and report.mx != [(0, ".")]:
            add(
                "mx.unexpected", "no MX or a single null MX '0 .' (the domain takes no mail)", shown
            )
    elif not report.mx:
        add("mx.missing", "MX records for a domain that receives mail", answer.status)
    elif report.null_mx:
        add(
            "mx.null",
            "MX records for a domain that receives mail",
            f"a null MX (RFC 7505: the domain accepts no mail): {shown}",
        )
    forbidden = {normalise_name(h) for h in forbidden_hosts}
    owners = _forbidden_addresses(dns, forbidden_hosts) if forbidden_hosts else {}
    for _pref, host in report.mx:
        if host == ".":
            continue
        addresses, answers = dns.addresses(host)
        report.addresses[host] = addresses
        chain = next((a.cname_chain for a in answers if a.cname_chain), ())
        if receives_mail and chain:
            add(
                "mx.cname",
                "MX targets that are host names, not CNAMEs (RFC 2181 10.3)",
                f"{quote(host)} is a CNAME to {quote(chain[-1])}",
            )
        if receives_mail and not addresses:
            statuses = ", ".join(f"{a.rdtype} {a.status}" for a in answers)
            add(
                "mx.no_address",
                "every MX target to resolve to A/AAAA",
                f"{quote(host)} has no address ({statuses})",
            )
        if host in forbidden:
            add(
                "mx.forbidden",
                f"no MX target among the forbidden hosts {quote_all(sorted(forbidden))}",
                f"{quote(host)}",
            )
            continue
        shared = sorted({owners[a] for a in addresses if a in owners})
        if shared:
            same = [a for a in addresses if a in owners]
            add(
                "mx.forbidden",
                f"no MX target on a forbidden host {quote_all(sorted(forbidden))}",
                f"{quote(host)} shares address(es) {', '.join(same)} with {quote_all(shared)}",
            )
    return report
