"""DNS lookups for the analyses: one answer type, a Protocol, and a dnspython resolver.

The analyses take any object with ``query(name, rdtype) -> DnsAnswer`` so unit tests can
feed zone data from a dict while checks ask a real server. The contract that matters:

- NXDOMAIN and NODATA (NOERROR, no records) are *answers*: they are facts about the zone
  that an analysis reports on (a missing SPF record, a void lookup).
- A timeout, REFUSED or SERVFAIL from every server raises ``TargetUnreachable``: we could
  not learn anything, and a check must call that broken, never pass.
- Every query is bounded by a lifetime: nothing waits forever.
- A CNAME whose target the server does not answer for in the same response (an
  authoritative server, such as the local stack's Knot, stops at the edge of its zone) is
  followed with further queries, as a recursive resolver would: at most
  ``MAX_CNAME_HOPS`` more, loop-safe, the chain in ``cname_chain``.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset

from opsdrill.errors import ConfigError, TargetUnreachable

ADDRESS_TYPES = ("A", "AAAA")
# Further queries to follow a CNAME chain the server left unfinished. A recursive resolver
# gives up on long chains too (dnspython's own limit within one response is 16 names).
MAX_CNAME_HOPS = 8


def normalise_name(name: str) -> str:
    """Compare DNS names case-insensitively and without the root dot."""
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True)
class DnsAnswer:
    """One answer, as evidence and as data.

    ``records``: presentation form of each record of the asked type (TXT: the character
    strings joined and decoded as UTF-8; MX: ``"10 mx.example.com."``). ``strings``: the raw
    TXT character-strings per record, to check the 255-byte limit. ``cname_chain``: the
    CNAME targets followed from ``qname``, in order. ``text``: the answer in zone-file form.
    """

    qname: str
    rdtype: str
    rcode: str
    records: tuple[str, ...] = ()
    strings: tuple[tuple[bytes, ...], ...] = ()
    cname_chain: tuple[str, ...] = ()
    text: str = ""
    elapsed_ms: float = 0.0
    server: str = ""

    @property
    def void(self) -> bool:
        """NXDOMAIN or an empty answer: a "void lookup" in RFC 7208 4.6.4 terms."""
        return not self.records

    @property
    def status(self) -> str:
        """``NXDOMAIN``, ``NODATA`` or ``N record(s)``, for messages."""
        if self.rcode != "NOERROR":
            return self.rcode
        return f"{len(self.records)} record(s)" if self.records else "NODATA"

    def evidence(self) -> dict[str, Any]:
        return {
            "qname": self.qname,
            "rdtype": self.rdtype,
            "rcode": self.rcode,
            "records": list(self.records),
            "cname_chain": list(self.cname_chain),
            "server": self.server,
            "elapsed_ms": round(self.elapsed_ms, 2),
            "text": self.text,
        }


class Resolver(Protocol):
    def query(self, name: str, rdtype: str) -> DnsAnswer: ...


def mx_records(answer: DnsAnswer) -> list[tuple[int, str]]:
    """``(preference, exchange)`` pairs of an MX answer; the exchange without the root dot
    (a null MX keeps ``"."``)."""
    pairs = []
    for record in answer.records:
        pref, _, exchange = record.partition(" ")
        exchange = exchange.strip()
        pairs.append((int(pref), "." if exchange == "." else normalise_name(exchange)))
    return pairs


def decode_txt(strings: tuple[bytes, ...]) -> str:
    """A TXT record's strings joined, as text. Invalid UTF-8 is replaced, not fatal: the
    raw bytes stay in ``DnsAnswer.strings`` and record syntax checks reject non-ASCII."""
    return b"".join(strings).decode("utf-8", errors="replace")


class DnsResolver:
    """Resolver on dnspython: the given servers (or the system's), bounded.

    ``timeout`` bounds one try at one server; ``lifetime`` (default: ``timeout`` per server)
    bounds the whole query including retries. ``queries`` counts the queries sent, for the
    benchmark. Thread-safe: dnspython's ``Resolver.resolve`` keeps per-call state only,
    and the counter and the answers kept are under a lock.

    ``remember=True`` keeps every answer (NOERROR or NXDOMAIN; a failure is asked again)
    for the resolver's life: one check run then reads one snapshot of DNS, and the records
    many domains share (a provider's SPF include, its DKIM key behind a CNAME) are asked
    once, not once per domain. dnspython's own cache would do it by TTL, and would drop the
    answer text and timing that evidence shows; and a check run lasts seconds.
    """

    def __init__(
        self,
        nameservers: list[str] | None = None,
        port: int = 53,
        timeout: float = 2.0,
        *,
        lifetime: float | None = None,
        remember: bool = False,
    ) -> None:
        if nameservers:
            for server in nameservers:
                try:
                    ipaddress.ip_address(server)
                except ValueError:
                    raise ConfigError(
                        f"DNS resolver: nameserver {server!r} is not an IP address"
                    ) from None
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
        else:
            try:
                self._resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                raise ConfigError(
                    "DNS resolver: no nameservers given and none configured on this system"
                ) from None
        self._resolver.port = port
        self._resolver.cache = None
        self._resolver.timeout = timeout
        servers = len(self._resolver.nameservers)
        self._resolver.lifetime = lifetime if lifetime is not None else timeout * max(1, servers)
        self.port = port
        self._lock = threading.Lock()
        self.queries = 0
        # remember=True: an answer per question, or the Future of the query in flight
        self._answers: dict[tuple[str, str], Future[DnsAnswer]] | None = {} if remember else None

    @property
    def servers(self) -> list[str]:
        return [f"{ns}:{self.port}" for ns in self._resolver.nameservers]

    def query(self, name: str, rdtype: str) -> DnsAnswer:
        key = (normalise_name(name), rdtype.upper())
        if self._answers is None:
            return self._resolve(*key)
        with self._lock:
            known = self._answers.get(key)
            if known is None:  # ours to ask; a thread asking the same meanwhile waits for it
                mine = self._answers[key] = Future()
        if known is not None:
            return known.result()
        try:
            mine.set_result(self._resolve(*key))
        except BaseException as exc:
            with self._lock:  # not remembered: the next question asks again
                del self._answers[key]
            mine.set_exception(exc)
        return mine.result()

    def _resolve(self, qname: str, rdtype: str) -> DnsAnswer:
        answer = self._ask(qname, rdtype)
        if answer.records or answer.rcode != "NOERROR" or not answer.cname_chain:
            return answer
        if answer.rdtype == "CNAME":
            return answer
        return self._follow(answer)

    def _follow(self, first: DnsAnswer) -> DnsAnswer:
        """Finish a CNAME chain the server did not resolve (an authoritative server does
        not chase a CNAME into another zone): ask for the last target, up to
        ``MAX_CNAME_HOPS`` more queries, stopping at a name already in the chain.

        The result reads as one answer to the original question: the final records and
        rcode, the whole chain, every hop's text (evidence) and the summed time.
        """
        hops = [first]
        chain = list(first.cname_chain)
        seen = {first.qname, *chain}
        note = ""
        current = first
        while not current.records and current.rcode == "NOERROR" and current.cname_chain:
            if len(hops) > MAX_CNAME_HOPS:
                note = f";; CNAME chain not followed further: {MAX_CNAME_HOPS} hops already"
                break
            current = self._ask(chain[-1], first.rdtype)
            hops.append(current)
            looped = [n for n in current.cname_chain if n in seen]
            chain.extend(current.cname_chain)
            seen.update(current.cname_chain)
            if looped and not current.records:
                note = f";; CNAME loop: {looped[0]} is already in the chain, not followed"
                break
        final = hops[-1]
        return DnsAnswer(
            qname=first.qname,
            rdtype=first.rdtype,
            rcode=final.rcode,
            records=final.records,
            strings=final.strings,
            cname_chain=tuple(chain),
            text="\n".join([*(hop.text for hop in hops), *([note] if note else [])]),
            elapsed_ms=sum(hop.elapsed_ms for hop in hops),
            server=final.server,
        )

    def _ask(self, qname: str, rdtype: str) -> DnsAnswer:
        """One query to the servers, as they answer it (no CNAME chasing of our own)."""
        with self._lock:
            self.queries += 1
        where = f"DNS {qname or '.'} {rdtype}"
        try:
            dname = dns.name.from_text(qname or ".")
            dtype = dns.rdatatype.from_text(rdtype)
        except (dns.exception.DNSException, ValueError) as exc:
            raise ConfigError(f"{where}: not a valid query: {exc}") from None
        started = time.monotonic()
        try:
            answer = self._resolver.resolve(dname, dtype, raise_on_no_answer=False, search=False)
            response: dns.message.Message = answer.response
            rcode = "NOERROR"
            server = f"{answer.nameserver}:{answer.port}"
        except dns.resolver.NXDOMAIN as exc:
            responses: dict[Any, dns.message.Message] = exc.kwargs.get("responses") or {}
            response = next(iter(responses.values())) if responses else dns.message.Message()
            rcode = "NXDOMAIN"
            server = ""
        except dns.exception.Timeout as exc:
            raise TargetUnreachable(
                f"{where}: timed out asking {', '.join(self.servers)}: {exc}"
            ) from None
        except dns.resolver.NoNameservers as exc:
            # Every server failed: SERVFAIL, REFUSED, or an unusable answer (a CNAME loop).
            raise TargetUnreachable(
                f"{where}: no usable answer from {', '.join(self.servers)}: {exc}"
            ) from None
        except dns.exception.DNSException as exc:
            raise TargetUnreachable(
                f"{where}: query to {', '.join(self.servers)} failed: {exc}"
            ) from None
        elapsed = (time.monotonic() - started) * 1000
        return _to_answer(qname, rdtype.upper(), rcode, response, elapsed, server)


def _to_answer(
    qname: str,
    rdtype: str,
    rcode: str,
    response: dns.message.Message,
    elapsed_ms: float,
    server: str,
) -> DnsAnswer:
    records: list[str] = []
    strings: list[tuple[bytes, ...]] = []
    chain: list[str] = []
    answer_rrset: dns.rrset.RRset | None = None
    if isinstance(response, dns.message.QueryMessage) and response.question:
        try:
            chaining = response.resolve_chaining()
        except dns.exception.DNSException:
            chaining = None
        if chaining is not None:
            answer_rrset = chaining.answer
            for cname_rrset in chaining.cnames:
                for rdata in cname_rrset:
                    chain.append(normalise_name(rdata.target.to_text()))
    if answer_rrset is not None:
        for rdata in answer_rrset:
            if rdtype in ("TXT", "SPF"):
                parts = tuple(bytes(s) for s in rdata.strings)
                strings.append(parts)
                records.append(decode_txt(parts))
            else:
                records.append(rdata.to_text())
    header = f";; {qname}. {rdtype}: {rcode}"
    if server:
        header += f" from {server}"
    header += f" in {elapsed_ms:.1f} ms"
    body = [rrset.to_text() for rrset in getattr(response, "answer", [])]
    return DnsAnswer(
        qname=qname,
        rdtype=rdtype,
        rcode=rcode,
        records=tuple(records),
        strings=tuple(strings),
        cname_chain=tuple(chain),
        text="\n".join([header, *body]),
        elapsed_ms=elapsed_ms,
        server=server,
    )


class Lookups:
    """One analysis's view of DNS: each (name, type) asked once, every answer kept.

    Not shared between analyses, so it needs no lock; the resolver underneath is shared.
    """

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._memo: dict[tuple[str, str], DnsAnswer] = {}
        self.answers: list[DnsAnswer] = []

    def query(self, name: str, rdtype: str) -> DnsAnswer:
        key = (normalise_name(name), rdtype.upper())
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        answer = self.resolver.query(key[0], key[1])
        self._memo[key] = answer
        self.answers.append(answer)
        return answer

    def addresses(self, name: str) -> tuple[list[str], list[DnsAnswer]]:
        """A and AAAA addresses of ``name`` (normalised), and the two answers."""
        answers = [self.query(name, rdtype) for rdtype in ADDRESS_TYPES]
        found = [str(ipaddress.ip_address(r)) for a in answers for r in a.records]
        return found, answers
