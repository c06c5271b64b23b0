"""The SPF include/redirect tree: what an evaluation would fetch, counted statically.

``Walker`` follows every ``include:`` and ``redirect=`` from the domain's record, parses
each record, and counts per node the DNS-querying terms and the void lookups (NXDOMAIN or
empty answers) that a worst-case evaluation (a client matching nothing) would spend.
Targets written with macros depend on the sender and are not expanded. Loops are cut on
the current path; a runaway tree stops expanding at 4x the lookup limit (as pyspf stops
evaluating), and the count is then reported as "at least".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opsdrill.dns.findings import Finding, finding, quote, quote_all
from opsdrill.dns.resolver import DnsAnswer, Lookups, mx_records, normalise_name
from opsdrill.dns.spf_syntax import ParsedRecord, Term, is_spf_record, parse_record

MAX_TXT_STRING = 255
MAX_MX_NAMES = 10
# Stop expanding a runaway tree (pyspf aborts evaluation at 4x the limit as well).
EXPANSION_FACTOR = 4


@dataclass
class SpfNode:
    """One record in the include/redirect tree. ``lookups`` counts this record's own
    DNS-querying terms; ``total_lookups`` adds everything below it."""

    domain: str
    via: str  # "" for the domain itself, else the term that led here
    record: str | None = None
    terms: int = 0
    lookups: int = 0
    void: list[str] = field(default_factory=list)
    note: str = ""
    authorising: bool = True
    parsed: ParsedRecord | None = None
    children: list[SpfNode] = field(default_factory=list)

    @property
    def total_lookups(self) -> int:
        return self.lookups + sum(c.total_lookups for c in self.children)

    @property
    def total_void(self) -> int:
        return len(self.void) + sum(c.total_void for c in self.children)

    def walk(self) -> list[SpfNode]:
        return [self, *(n for c in self.children for n in c.walk())]

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "via": self.via,
            "record": self.record,
            "terms": self.terms,
            "lookups": self.lookups,
            "total_lookups": self.total_lookups,
            "void_lookups": list(self.void),
            "note": self.note,
            "children": [c.to_dict() for c in self.children],
        }

    def text(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        head = f"{pad}{self.via + ' -> ' if self.via else ''}{self.domain}"
        counts = (
            f"[{self.terms} terms, {self.lookups} lookups here,"
            f" {self.total_lookups} with nested, {len(self.void)} void]"
        )
        lines = [f"{head} {counts}"]
        if self.record is not None:
            lines.append(f"{pad}    {self.record}")
        if self.void:
            lines.append(f"{pad}    void: {', '.join(self.void)}")
        if self.note:
            lines.append(f"{pad}    ({self.note})")
        for child in self.children:
            lines += child.text(depth + 1)
        return lines


def spf_records(answer: DnsAnswer) -> list[tuple[str, tuple[bytes, ...]]]:
    """The ``v=spf1`` records of a TXT answer with their raw strings."""
    strings = answer.strings or tuple((r.encode(),) for r in answer.records)
    return [(r, s) for r, s in zip(answer.records, strings, strict=False) if is_spf_record(r)]


class Walker:
    """Builds the tree for one analysis; holds the findings and running totals."""

    def __init__(self, lookups: Lookups, max_lookups: int) -> None:
        self.dns = lookups
        self.findings: list[Finding] = []
        self.total = 0
        self.cap = max(max_lookups, 10) * EXPANSION_FACTOR
        self.capped = False

    def add(self, code: str, name: str, expected: str, found: str) -> None:
        self.findings.append(finding(code, name, "TXT", "spf", expected, found))

    def fetch(self, node: SpfNode, target: str, how: str) -> str | None:
        """The single SPF record of an include/redirect target, or None (with a finding)."""
        answer = self.dns.query(target, "TXT")
        if answer.void:
            node.void.append(f"{target} TXT ({answer.status})")
        records = spf_records(answer)
        if len(records) == 1:
            self.check_strings(target, records[0][1])
            return records[0][0]
        if not records:
            code = "spf.include_missing" if how == "include" else "spf.redirect_missing"
            self.add(
                code,
                target,
                f"one 'v=spf1' record ({how} from {node.domain})",
                f"{answer.status}, no SPF record (a permerror when evaluated)",
            )
        else:
            self.add(
                "spf.multiple_records",
                target,
                "one 'v=spf1' record",
                f"{len(records)}: {quote_all([r for r, _ in records])}",
            )
        return None

    def check_strings(self, name: str, strings: tuple[bytes, ...]) -> None:
        for s in strings:
            if len(s) > MAX_TXT_STRING:
                self.add(
                    "spf.string_too_long",
                    name,
                    "each TXT string <= 255 bytes",
                    f"a string of {len(s)} bytes: {quote(s.decode('utf-8', 'replace'))}",
                )

    def build(
        self, domain: str, via: str, record: str, path: tuple[str, ...], authorising: bool
    ) -> SpfNode:
        parsed = parse_record(record)
        node = SpfNode(
            domain, via, record, len(parsed.terms), authorising=authorising, parsed=parsed
        )
        for error in parsed.errors:
            self.add("spf.syntax", domain, "valid RFC 7208 syntax", error)
        has_all = parsed.all_term is not None
        for term in parsed.mechanisms:
            if term.querying:
                node.lookups += 1
                self.total += 1
            if term.name == "ptr":
                self.add(
                    "spf.ptr",
                    domain,
                    "no 'ptr' mechanism (deprecated: RFC 7208 5.5 says do not use it)",
                    f"{quote(term.text)}: slow (reverse and forward lookups for every message),"
                    " and some receivers skip it, so senders only it authorises can fail SPF"
                    " there; not a permerror: the record still evaluates",
                )
            elif term.name == "include":
                self.descend(node, term, path, authorising and term.qualifier == "+")
            elif term.name in ("a", "mx", "exists"):
                self.resolve_target(node, term)
        redirect = parsed.modifier("redirect")
        if redirect is not None and has_all:
            self.add(
                "spf.redirect_ignored",
                domain,
                "either an 'all' mechanism or redirect=",
                f"both: {quote(redirect.text)} is ignored (RFC 7208 6.1): a record with 'all'"
                " never follows its redirect=, so nothing its target lists is authorised;"
                " not a permerror: the record evaluates without it",
            )
        elif redirect is not None:
            node.lookups += 1
            self.total += 1
            self.descend(node, redirect, path, authorising)
        return node

    def descend(self, node: SpfNode, term: Term, path: tuple[str, ...], auth: bool) -> None:
        how = "redirect" if term.modifier else "include"
        target = normalise_name(term.value or "")
        if term.has_macro:
            node.children.append(
                SpfNode(
                    target,
                    term.text,
                    note="target uses macros: depends on the sender, not expanded",
                )
            )
            return
        if target in path:
            self.add(
                "spf.include_loop", target, f"no {how} loop", f"{' -> '.join((*path, target))}"
            )
            node.children.append(SpfNode(target, term.text, note="loop: not followed"))
            return
        if self.total > self.cap:
            self.capped = True
            node.children.append(
                SpfNode(target, term.text, note="not expanded: too many lookups already")
            )
            return
        record = self.fetch(node, target, how)
        if record is None:
            node.children.append(SpfNode(target, term.text, note="no usable SPF record"))
            return
        node.children.append(self.build(target, term.text, record, (*path, target), auth))

    def resolve_target(self, node: SpfNode, term: Term) -> None:
        """Resolve a literal a/mx/exists target to count void lookups (RFC 7208 4.6.4)."""
        if term.has_macro:
            return
        target = normalise_name(term.value or node.domain)
        if term.name == "mx":
            answer = self.dns.query(target, "MX")
            if answer.void:
                node.void.append(f"{target} MX ({answer.status})")
                return
            hosts = [host for _, host in mx_records(answer) if host != "."]
            if len(hosts) > MAX_MX_NAMES:
                self.add(
                    "spf.too_many_mx",
                    node.domain,
                    f"at most {MAX_MX_NAMES} MX names for {quote(term.text)}",
                    f"{len(hosts)} (a permerror when evaluated)",
                )
            for host in hosts[:MAX_MX_NAMES]:
                addresses, _ = self.dns.addresses(host)
                if not addresses:
                    node.void.append(f"{host} A/AAAA (MX of {target})")
        elif term.name == "exists":
            answer = self.dns.query(target, "A")
            if answer.void:
                node.void.append(f"{target} A ({answer.status})")
        else:
            addresses, answers = self.dns.addresses(target)
            if not addresses:
                node.void.append(f"{target} A/AAAA ({answers[0].status})")
