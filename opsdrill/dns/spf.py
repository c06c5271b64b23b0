"""SPF analysis: one record, valid, complete, strict, and within the RFC 7208 limits.

``analyse_spf`` reads the domain's SPF record and everything it pulls in through
``include:`` and ``redirect=``, and reports every problem at once (see ``Finding`` codes
below). It is a static, worst-case analysis: it counts the DNS-querying terms and void
lookups an evaluation would spend for a client that matches nothing, which is the case
that hits the limits in production. ``check_host`` (pyspf, in ``spf_eval``) answers the
other question: what a receiver decides for one IP. ``spf_probe`` asks it for addresses no
one lists, to catch a record (the domain's own, or one it includes or redirects to) that
lets the whole internet send as the domain (``spf.permissive``).

``spf.ptr`` and ``spf.redirect_ignored`` are lesser findings: the record still evaluates
(neither is a permerror), but it carries a deprecated or a dead term.

Required mechanisms (``include:_spf.google.com``, ``ip4:192.0.2.0/24``...) are satisfied
by a pass-qualified mechanism anywhere in the tree reached through pass-qualified
includes or redirects: a provider that nests its include under another include of ours
still authorises mail. ``ip4``/``ip6`` requirements are satisfied by any listed network
that contains them. ``SpfReport.required_found`` says where each one was found.

Codes: spf.missing, spf.multiple_records, spf.syntax, spf.string_too_long, spf.ptr,
spf.softfail, spf.all_qualifier, spf.permissive, spf.all_not_last, spf.redirect_ignored,
spf.missing_mechanism, spf.include_missing, spf.redirect_missing, spf.include_loop,
spf.too_many_lookups, spf.too_many_void_lookups, spf.too_many_mx, spf.check_host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opsdrill.dns.findings import DnsReport, quote, quote_all
from opsdrill.dns.resolver import Lookups, Resolver, normalise_name
from opsdrill.dns.spf_eval import SpfResult, check_host
from opsdrill.dns.spf_probe import Permissive, on_redirect_chain, probe_tree
from opsdrill.dns.spf_syntax import Term, parse_record
from opsdrill.dns.spf_tree import SpfNode, Walker, spf_records
from opsdrill.errors import ConfigError

__all__ = ["SpfNode", "SpfReport", "SpfResult", "analyse_spf", "check_host"]


@dataclass(kw_only=True)
class SpfReport(DnsReport):
    record: str | None = None
    records: list[str] = field(default_factory=list)
    tree: SpfNode | None = None
    lookups: int = 0
    void_lookups: int = 0
    final_all: str | None = None
    required_found: dict[str, str] = field(default_factory=dict)
    senders: dict[str, SpfResult] = field(default_factory=dict)
    # check_host() for the spf_probe addresses, and the records that let them pass.
    probes: dict[str, SpfResult] = field(default_factory=dict)
    permissive: list[Permissive] = field(default_factory=list)

    def tree_text(self) -> str:
        return "\n".join(self.tree.text()) if self.tree else "(no SPF record)"

    def details(self) -> dict[str, Any]:
        return {
            "record": self.record,
            "records": self.records,
            "lookups": self.lookups,
            "void_lookups": self.void_lookups,
            "final_all": self.final_all,
            "required_found": self.required_found,
            "senders": {ip: r.evidence() for ip, r in self.senders.items()},
            "probes": {ip: r.evidence() for ip, r in self.probes.items()},
            "permissive": [p.evidence() for p in self.permissive],
            "tree": self.tree_text(),
            "tree_nodes": self.tree.to_dict() if self.tree else None,
        }


def _final_all(node: SpfNode) -> tuple[Term | None, SpfNode]:
    """The 'all' that ends evaluation, following redirect= when there is no 'all'."""
    assert node.parsed is not None
    term = node.parsed.all_term
    if term is not None:
        return term, node
    redirect = next((c for c in node.children if c.via.lower().startswith("redirect=")), None)
    if redirect is not None and redirect.parsed is not None:
        return _final_all(redirect)
    return None, node


def _check_all(walker: Walker, tree: SpfNode, allow_softfail: bool) -> str | None:
    term, where = _final_all(tree)
    expected = "'-all' or '~all' (migration window)" if allow_softfail else "'-all'"
    via = "" if where is tree else f" (reached through redirect to {where.domain})"
    domain = tree.domain
    if term is None:
        walker.add(
            "spf.all_qualifier",
            domain,
            f"{expected} at the end",
            f"no 'all' mechanism{via}: unmatched senders get 'neutral'",
        )
        return None
    text = term.text
    if term.qualifier == "~" and not allow_softfail:
        walker.add(
            "spf.softfail",
            domain,
            expected,
            f"{quote(text)}{via}; '~all' is allowed only during a migration window",
        )
    elif term.qualifier in "+?":
        walker.add(
            "spf.all_qualifier",
            domain,
            expected,
            f"{quote(text)}{via}: unauthorised senders would not fail",
        )
    assert where.parsed is not None
    mechanisms = where.parsed.mechanisms
    after = mechanisms[mechanisms.index(term) + 1 :]
    if after:
        walker.add(
            "spf.all_not_last",
            where.domain,
            f"{quote(text)} as the last mechanism",
            f"{quote_all([t.text for t in after])} after it (never evaluated)",
        )
    return text


def _check_permissive(walker: Walker, dns: Lookups, report: SpfReport, tree: SpfNode) -> None:
    """Records reached through pass-qualified includes or redirects (or the domain's own)
    that pass an address no one lists; see ``spf_probe`` for why this is sound."""
    report.probes, found = probe_tree(dns, tree)
    final_pass = report.final_all is not None and report.final_all[0] not in "-~?"
    for hit in found:
        if final_pass and on_redirect_chain(hit.path):
            continue  # the final '+all' itself: spf.all_qualifier says so already
        report.permissive.append(hit)
        through = ""
        if hit.path:
            chain = " > ".join(quote(via) for via in hit.path)
            through = f", reached from {tree.domain} through {chain}"
        walker.add(
            "spf.permissive",
            hit.node.domain,
            f"a record that passes only the senders it lists{through}",
            f"{quote(hit.node.record or '')}, which passes check_host({hit.probe}), a "
            f"documentation address no one lists: the whole internet may send as {tree.domain}",
        )


def _parse_required(required: str) -> Term:
    parsed = parse_record(f"v=spf1 {required.strip()}")
    if parsed.errors or len(parsed.mechanisms) != 1:
        problem = "; ".join(parsed.errors) or "expected exactly one mechanism"
        raise ConfigError(f"SPF required mechanism {required!r}: {problem}")
    return parsed.mechanisms[0]


def _matches(want: Term, have: Term, domain: str, *, qualifier: bool = True) -> bool:
    """Whether ``have`` (in ``domain``'s record) provides the required ``want``."""
    if want.name != have.name or (qualifier and want.qualifier != have.qualifier):
        return False
    if want.name in ("ip4", "ip6"):
        v4 = want.name == "ip4"
        w_len, h_len = (want.cidr4, have.cidr4) if v4 else (want.cidr6, have.cidr6)
        default = 32 if v4 else 128
        w = ipaddress.ip_network(f"{want.value}/{default if w_len is None else w_len}", False)
        h = ipaddress.ip_network(f"{have.value}/{default if h_len is None else h_len}", False)
        return w.version == h.version and w.subnet_of(h)  # type: ignore[arg-type]
    want_value = normalise_name(want.value) if want.value else domain
    have_value = normalise_name(have.value) if have.value else domain
    return (want_value, want.cidr4, want.cidr6) == (have_value, have.cidr4, have.cidr6)


def _locate(node: SpfNode, path: str, want: Term) -> tuple[str | None, str | None]:
    """Where ``want`` authorises in the tree below ``node`` (a path), else a near miss: the
    same mechanism with another qualifier or behind a non-pass include."""
    assert node.parsed is not None
    near: str | None = None
    for term in node.parsed.mechanisms:
        if not _matches(want, term, node.domain, qualifier=False):
            continue
        if want.qualifier == term.qualifier and node.authorising:
            return path, None
        near = near or f"{quote(term.text)} in {node.domain}" + (
            "" if node.authorising else " (reached through a non-pass include)"
        )
    for child in node.children:
        if child.parsed is not None:
            hit, child_near = _locate(child, f"{path} > {child.via}", want)
            if hit:
                return hit, None
            near = near or child_near
    return None, near


def _check_required(
    walker: Walker, tree: SpfNode, required: Sequence[str], found_at: dict[str, str]
) -> None:
    for raw in required:
        hit, near = _locate(tree, tree.domain, _parse_required(raw))
        if hit:
            found_at[raw] = hit
            continue
        if near:
            found = f"only {near}, which does not authorise"
        else:
            found = f"no such mechanism in {quote(tree.record or '')} or its includes"
        walker.add(
            "spf.missing_mechanism",
            tree.domain,
            f"mechanism {quote(raw)} (top level or through an include)",
            found,
        )


def _check_limits(walker: Walker, tree: SpfNode, max_lookups: int, max_void: int) -> None:
    if tree.total_lookups > max_lookups:
        at_least = "at least " if walker.capped else ""
        per = ", ".join(f"{n.domain}: {n.lookups}" for n in tree.walk() if n.lookups)
        walker.add(
            "spf.too_many_lookups",
            tree.domain,
            f"at most {max_lookups} DNS-querying terms (include, a, mx, ptr, exists,"
            " redirect) counted through includes and redirects",
            f"{at_least}{tree.total_lookups} ({per})",
        )
    if tree.total_void > max_void:
        voids = [v for n in tree.walk() for v in n.void]
        walker.add(
            "spf.too_many_void_lookups",
            tree.domain,
            f"at most {max_void} void lookups (NXDOMAIN or empty answers)",
            f"{tree.total_void}: {', '.join(voids)}",
        )


def _check_senders(
    walker: Walker, resolver: Resolver, domain: str, ips: Sequence[str], out: dict[str, SpfResult]
) -> None:
    """RFC 7208 check_host() for each known sending IP, as a null sender from ``domain``."""
    for ip in ips:
        result = out[ip] = check_host(resolver, ip, domain, "")
        if result.result != "pass":
            walker.add(
                "spf.check_host",
                domain,
                f"check_host({ip}) = 'pass' (a known sending IP)",
                f"{quote(result.result)}: {result.explanation}",
            )


def analyse_spf(
    resolver: Resolver,
    domain: str,
    *,
    required: Sequence[str] = (),
    allow_softfail: bool = False,
    max_lookups: int = 10,
    max_void_lookups: int = 2,
    sending_ips: Sequence[str] = (),
) -> SpfReport:
    """Analyse ``domain``'s SPF record; see the module docstring for what is checked.

    ``sending_ips``: addresses known to send for the domain; each must get ``pass`` from
    ``check_host`` (finding ``spf.check_host`` otherwise; results in ``report.senders``).
    Raises ``TargetUnreachable`` when DNS cannot answer (the check is then broken) and
    ``ConfigError`` for a ``required`` entry that is not a valid SPF mechanism or a
    sending IP that is not an address.
    """
    domain = normalise_name(domain)
    for raw in required:
        _parse_required(raw)  # fail fast on a bad inventory, before any query
    for ip in sending_ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"SPF sending IP {ip!r} is not an IP address") from None
    dns = Lookups(resolver)
    walker = Walker(dns, max_lookups)
    report = SpfReport(domain=domain)
    answer = dns.query(domain, "TXT")
    records = spf_records(answer)
    report.records = [r for r, _ in records]
    if not records:
        others = f"; other TXT records: {quote_all(list(answer.records))}" if answer.records else ""
        walker.add("spf.missing", domain, "one 'v=spf1' record", f"{answer.status}{others}")
    elif len(records) > 1:
        walker.add(
            "spf.multiple_records",
            domain,
            "exactly one 'v=spf1' record (several are a permerror: merge them)",
            f"{len(records)}: {quote_all(report.records)}",
        )
    else:
        record, strings = records[0]
        report.record = record
        walker.check_strings(domain, strings)
        tree = report.tree = walker.build(domain, "", record, (domain,), True)
        report.lookups = tree.total_lookups
        report.void_lookups = tree.total_void
        report.final_all = _check_all(walker, tree, allow_softfail)
        _check_required(walker, tree, required, report.required_found)
        _check_limits(walker, tree, max_lookups, max_void_lookups)
        _check_permissive(walker, dns, report, tree)
    _check_senders(walker, resolver, domain, sending_ips, report.senders)
    report.findings = walker.findings
    report.answers = dns.answers
    return report
