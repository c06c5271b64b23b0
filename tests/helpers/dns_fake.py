"""A fake ``Resolver`` serving zone data from a dict, for unit tests of opsdrill.dns.

It fakes only the DNS boundary (the checks use a real server). The zone format is the one
of the RFC 7208 test suite's ``zonedata``, so the suite's scenarios load as they are:

    {"example.com": [{"TXT": "v=spf1 -all"}, {"MX": [10, "mx.example.com"]}],
     "mx.example.com": [{"A": "192.0.2.1"}, {"AAAA": "2001:db8::1"}],
     "alias.example.com": [{"CNAME": "example.com"}],
     "slow.example.com": ["TIMEOUT"]}

Semantics, as the suite's reference driver (pyspf's testspf.py) defines them:
- a name not in the dict is NXDOMAIN; a listed name without records of the type is NODATA;
- ``TXT``/``SPF`` values are a string or a list of character-strings;
- ``SPF`` (type 99) records are also served as TXT unless the name lists TXT records;
  ``{"TXT": "NONE"}`` means "no TXT record" and stops that copying;
- ``"TIMEOUT"`` makes every query of that name time out (``TargetUnreachable``) unless a
  record of the asked type is listed before it;
- CNAMEs are followed like a recursive resolver does; a CNAME loop ends in an empty
  answer (NODATA) with the chain shown.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opsdrill.dns.resolver import DnsAnswer, decode_txt, normalise_name
from opsdrill.errors import TargetUnreachable

MAX_CHAIN = 10
Zone = Mapping[str, Sequence[Any]]


def _absolute(name: str) -> str:
    return normalise_name(name) + "."


class FakeResolver:
    def __init__(self, zone: Zone) -> None:
        self.zone: dict[str, list[Any]] = {}
        for name, entries in zone.items():
            self.zone[normalise_name(name)] = self._expand(list(entries))
        self.queries = 0
        self.asked: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @staticmethod
    def _expand(entries: list[Any]) -> list[Any]:
        """Apply the SPF-to-TXT copy rule and drop ``NONE`` markers (pyspf's getrdata)."""
        out: list[Any] = []
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        copies = []
        for entry in entries:
            if isinstance(entry, dict):
                ((rdtype, value),) = entry.items()
                if value == "NONE":
                    continue
                out.append((rdtype, value))
                if rdtype == "SPF" and not has_txt:
                    copies.append(("TXT", value))
            else:
                out.append(entry)
        return out + copies

    def _lookup(self, name: str, rdtype: str) -> list[Any] | None:
        """Values of ``rdtype`` at ``name``; None for NXDOMAIN. Raises on TIMEOUT."""
        entries = self.zone.get(name)
        if entries is None:
            return None
        values = []
        for entry in entries:
            if entry == "TIMEOUT":
                if not values:
                    raise TargetUnreachable(
                        f"DNS {name} {rdtype}: timed out asking the fake resolver"
                    )
                break
            if entry[0] == rdtype:
                values.append(entry[1])
        return values

    def query(self, name: str, rdtype: str) -> DnsAnswer:
        with self._lock:
            self.queries += 1
            self.asked.append((normalise_name(name), rdtype))
        qname = current = normalise_name(name)
        chain: list[str] = []
        lines: list[str] = []
        while True:
            values = self._lookup(current, rdtype)
            if values is None:
                return self._answer(qname, rdtype, "NXDOMAIN", current, [], chain, lines)
            if values or rdtype == "CNAME":
                return self._answer(qname, rdtype, "NOERROR", current, values, chain, lines)
            cname = self._lookup(current, "CNAME") or []
            if not cname:
                return self._answer(qname, rdtype, "NOERROR", current, [], chain, lines)
            target = normalise_name(str(cname[0]))
            lines.append(f"{current}. 300 IN CNAME {_absolute(target)}")
            if target in chain or target == qname or len(chain) >= MAX_CHAIN:
                return self._answer(qname, rdtype, "NOERROR", current, [], chain, lines)
            chain.append(target)
            current = target

    @staticmethod
    def _answer(
        qname: str,
        rdtype: str,
        rcode: str,
        owner: str,
        values: list[Any],
        chain: list[str],
        lines: list[str],
    ) -> DnsAnswer:
        records: list[str] = []
        strings: list[tuple[bytes, ...]] = []
        for value in values:
            if rdtype in ("TXT", "SPF"):
                parts = [value] if isinstance(value, str) else list(value)
                raw = tuple(str(p).encode("utf-8") for p in parts)
                strings.append(raw)
                records.append(decode_txt(raw))
                quoted = " ".join('"' + str(p).replace('"', '\\"') + '"' for p in parts)
                lines.append(f"{owner}. 300 IN {rdtype} {quoted}")
                continue
            if rdtype in ("A", "AAAA"):
                text = str(ipaddress.ip_address(str(value)))
            elif rdtype == "MX":
                pref, host = value
                text = f"{int(pref)} {'.' if host in ('', '.') else _absolute(str(host))}"
            else:  # PTR, CNAME
                text = _absolute(str(value))
            records.append(text)
            lines.append(f"{owner}. 300 IN {rdtype} {text}")
        header = f";; {qname}. {rdtype}: {rcode} from fake"
        return DnsAnswer(
            qname=qname,
            rdtype=rdtype,
            rcode=rcode,
            records=tuple(records),
            strings=tuple(strings),
            cname_chain=tuple(chain),
            text="\n".join([header, *lines]),
            server="fake",
        )
