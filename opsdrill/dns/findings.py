"""Shared result types for the DNS analyses: findings and the report base class.

A finding is a failure a user must act on, so every message follows one shape that names
the domain, the record, what was expected and what was found:

    DNS example.com TXT spf: expected '-all', found '~all'

``code`` is a stable machine id (``spf.softfail``) that checks and tests match on; the
message is for humans and may be reworded (the type is every area's:
``opsdrill.findings.Finding``). Reports keep every DNS answer they looked at so a check
can attach the raw answers to Allure as evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opsdrill.dns.resolver import DnsAnswer
from opsdrill.findings import Finding as Finding  # every area's finding type


def finding(code: str, name: str, rdtype: str, what: str, expected: str, found: str) -> Finding:
    """Build a finding in the one message shape: where, the record, expected and found."""
    return Finding(code, f"DNS {name} {rdtype} {what}: expected {expected}, found {found}")


def quote(value: str, limit: int = 300) -> str:
    """Quote a DNS value for a message, shortened so a huge record cannot flood a report."""
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return "'" + value + "'"


def quote_all(values: list[str] | tuple[str, ...]) -> str:
    return ", ".join(quote(v) for v in values) if values else "none"


@dataclass(kw_only=True)
class DnsReport:
    """Base of every analysis report: the findings and all the answers behind them."""

    domain: str
    findings: list[Finding] = field(default_factory=list)
    answers: list[DnsAnswer] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def summary(self) -> str:
        """All finding messages, one per line (empty when the record is fine)."""
        return "\n".join(f.message for f in self.findings)

    def details(self) -> dict[str, Any]:
        """Analysis-specific evidence; subclasses extend it."""
        return {}

    def evidence(self) -> dict[str, Any]:
        """A JSON-able summary for Allure: findings, analysis details, raw answers."""
        return {
            "domain": self.domain,
            "ok": self.ok,
            "findings": [f.evidence() for f in self.findings],
            **self.details(),
            "answers": [a.evidence() for a in self.answers],
        }
