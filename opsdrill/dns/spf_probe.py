"""Does an SPF tree let the whole internet send as the domain? Evaluated, not guessed.

RFC 7208 5.2: ``include:`` matches when the included record's ``check_host()`` is
``pass``; ``fail``, ``softfail`` and ``neutral`` do not match. So ``-all``, ``~all`` and
``?all`` inside an include are harmless to the includer (an unlisted address falls
through to the includer's own ``-all``), while an included record that *passes* an
address passes it for the includer too. ``redirect=`` hands over the whole result.

Method: ``check_host()`` (pyspf, the RFC 7208 reference implementation) for two probe
addresses, at the domain and, when the domain passes one, at every record the tree
reaches through pass-qualified includes and redirects, to name the record at fault. The
probes are documentation addresses (RFC 5737 TEST-NET-3, RFC 9637 ``3fff::/20``): never
assigned to a host, so no record lists them for a reason. A record that passes one
passes it by a rule that ignores the address: ``+all`` or a bare ``all``, ``ip4:0.0.0.0/0``,
``ip6:::/0``, a range wide enough to cover it, ``exists:`` on a name that always resolves,
``a/0``. Evaluating catches every such rule, where a static reading of the tree would have
to enumerate them (and cannot judge ``exists:``). ``2001:db8::/32`` is avoided on purpose:
test zones (ours included) list it. A probe that ends in ``temperror`` or ``permerror``
(a ``ptr`` the server will not resolve, a broken include) says nothing here; it is kept in
the evidence, and the syntax and limit checks report the cause.

The evaluations run over the analysis's ``Lookups``: the records the tree walk fetched are
reused, and any new answer joins the evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

from opsdrill.dns.resolver import Resolver
from opsdrill.dns.spf_eval import SpfResult, check_host
from opsdrill.dns.spf_tree import SpfNode

PROBES = ("203.0.113.254", "3fff:fff:ffff::254")


@dataclass(frozen=True)
class Permissive:
    """A record that passes a probe: ``path`` is the chain of terms from the domain's own
    record to it (empty for the domain's own record)."""

    node: SpfNode
    path: tuple[str, ...]
    probe: str

    def evidence(self) -> dict[str, object]:
        return {
            "record_at": self.node.domain,
            "record": self.node.record,
            "path": list(self.path),
            "probe": self.probe,
        }


class _Probe:
    def __init__(self, dns: Resolver, top: str) -> None:
        self.dns = dns
        self.sender = f"postmaster@{top}"  # an include is evaluated for the same sender

    def passes(self, node: SpfNode, probes: list[str]) -> str | None:
        for ip in probes:
            if check_host(self.dns, ip, node.domain, self.sender).result == "pass":
                return ip
        return None

    def culprits(self, node: SpfNode, path: tuple[str, ...], probes: list[str]) -> list[Permissive]:
        """The deepest records under ``node`` (which passes) that pass a probe; ``node``
        itself when none below it does (its own terms let the probe through)."""
        found: list[Permissive] = []
        for child in node.children:
            if child.parsed is None or not child.authorising:
                continue
            probe = self.passes(child, probes)
            if probe is not None:
                deeper = self.culprits(child, (*path, child.via), [probe])
                found += deeper or [Permissive(child, (*path, child.via), probe)]
        return found


def probe_tree(dns: Resolver, tree: SpfNode) -> tuple[dict[str, SpfResult], list[Permissive]]:
    """The probes' results at the domain, and the records that let them pass."""
    probe = _Probe(dns, tree.domain)
    results = {ip: check_host(dns, ip, tree.domain, "") for ip in PROBES}
    passing = [ip for ip, r in results.items() if r.result == "pass"]
    if not passing:
        return results, []
    return results, probe.culprits(tree, (), passing) or [Permissive(tree, (), passing[0])]


def on_redirect_chain(path: tuple[str, ...]) -> bool:
    """Whether a record is reached from the domain by redirects alone (or is the domain's
    own): its final 'all' is judged with the domain's (``spf.all_qualifier``)."""
    return all(via.lower().startswith("redirect=") for via in path)
