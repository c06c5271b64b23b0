"""Organisational domains (RFC 7489 3.2): the one rule for DMARC policy inheritance,
external report destinations and relaxed DKIM/SPF alignment.

The organisational domain is the registrable name: the public suffix plus one label
(``mail.example.co.uk`` -> ``example.co.uk``, ``a.b.example.com`` -> ``example.com``). The
suffixes come from the Public Suffix List as shipped inside the ``publicsuffixlist``
package (a snapshot in the wheel: no network at run time; a new release refreshes it). A
last-two-labels rule would be wrong under two-label suffixes: it makes ``other.co.uk``
"the same organisation" as ``example.co.uk``, so it passes DKIM alignment it must not.

The whole list (ICANN and private sections) is used, as DMARC receivers do, and a name
under a TLD the list does not know (``.test``) falls under its default rule ``*``, so
``portal.example.test`` belongs to ``example.test``. A name that is itself a public
suffix (``co.uk``) has no registrable part: it is its own organisational domain.
"""

from __future__ import annotations

import threading

from publicsuffixlist import PublicSuffixList

_lock = threading.Lock()
_psl: PublicSuffixList | None = None


def _list() -> PublicSuffixList:
    """The parsed list, built once (about 10k rules) and read-only afterwards, so the DNS
    analyses may share it between threads."""
    global _psl
    with _lock:
        if _psl is None:
            _psl = PublicSuffixList()
        return _psl


def organisational_domain(name: str) -> str:
    """The registrable domain of ``name`` (lower case, no trailing dot)."""
    name = name.strip().rstrip(".").lower()  # as opsdrill.dns.resolver.normalise_name
    found = _list().privatesuffix(name)
    return found if isinstance(found, str) else name


def same_organisation(a: str, b: str) -> bool:
    """Whether two names share an organisational domain (DMARC relaxed alignment)."""
    return organisational_domain(a) == organisational_domain(b)
