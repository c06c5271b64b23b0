"""RFC 7208 ``check_host()`` on pyspf, fed by our ``Resolver``.

pyspf (module ``spf``) is the reference implementation, tested against the same RFC 7208
suite we run (tests/unit/test_dns_spf_rfc7208.py): macros, a/mx/ptr/exists/ip4/ip6 with dual
CIDR, redirect, exp, and the lookup and void-lookup limits. We only replace its DNS
boundary. pyspf calls one module-level function, ``spf.DNSLookup``; we install a single
dispatcher once that asks the resolver held in a ``ContextVar``, so concurrent calls from
several threads, each with its own resolver, never see each other's resolver.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import spf

from opsdrill.dns.resolver import Resolver, mx_records, normalise_name
from opsdrill.errors import ConfigError, TargetUnreachable

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
# pyspf's default explanations (used when a record has no usable exp=).
DEFAULT_EXPLANATIONS: dict[str, str] = dict(spf.EXPLANATIONS)

_current: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "opsdrill_spf_resolver", default=None
)
_install_lock = threading.Lock()
_installed = False


@dataclass(frozen=True)
class SpfResult:
    result: str
    explanation: str

    def evidence(self) -> dict[str, str]:
        return {"result": self.result, "explanation": self.explanation}


def _lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Iterator[Any]:
    """pyspf's DNS hook: ``((name, type), value)`` pairs in the shapes its dnspython
    driver produces; a resolver failure becomes ``spf.TempError`` (temperror)."""
    resolver = _current.get()
    if resolver is None:  # not called from check_host: pyspf's own dnspython driver
        yield from spf.DNSLookup_dnspython(name, qtype, strict, timeout)
        return
    try:
        answer = resolver.query(name, qtype)
    except TargetUnreachable as exc:
        raise spf.TempError(f"DNS {exc}") from None
    except ConfigError:
        return  # not a valid DNS name: no data, as RFC 7208 4.3 asks
    key = (normalise_name(name), qtype)
    if qtype in ("TXT", "SPF"):
        for strings in answer.strings:
            yield key, strings
    elif qtype == "MX":
        for pref, exchange in mx_records(answer):
            yield key, (pref, exchange)
    elif qtype in ("PTR", "CNAME"):
        for record in answer.records:
            yield key, normalise_name(record)
    else:
        for record in answer.records:
            yield key, record


def _install() -> None:
    global _installed
    with _install_lock:
        if not _installed:
            spf.DNSLookup = _lookup
            _installed = True


def check_host(
    resolver: Resolver, ip: str, domain: str, sender: str, *, helo: str | None = None
) -> SpfResult:
    """Evaluate SPF for a message from ``ip`` claiming ``sender`` (a MAIL FROM address,
    or empty for a null sender: then ``postmaster@<domain>``) at ``domain``.

    ``helo`` feeds the ``%{h}`` macro; it defaults to ``domain``. Returns one of
    ``RESULTS`` and the explanation (the exp= text for a fail, the error for a
    permerror/temperror).
    """
    _install()
    domain = normalise_name(domain)
    helo = helo or domain
    sender = sender or f"postmaster@{domain}"
    token = _current.set(resolver)
    try:
        try:
            query = spf.query(i=ip, s=sender, h=helo, strict=True)
        except spf.PermError as exc:  # an invalid IP address
            raise ConfigError(f"SPF check_host: {exc}") from None
        query.d = domain
        result, _code, explanation = query.check()
    finally:
        _current.reset(token)
    return SpfResult(str(result), str(explanation))


# pytest in this project collects ``check_*`` functions (checks/ and tests/); a module that
# imports check_host must not have it collected as a check.
check_host.__test__ = False  # type: ignore[attr-defined]
