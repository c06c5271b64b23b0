"""DnsResolver follows a CNAME that an authoritative server leaves unfinished.

Knot (the local stack's server) answers ``r1._domainkey.example.test TXT`` with only the
CNAME into the provider's zone, as every authoritative server does; a recursive resolver
would have chased it. These tests use an in-process UDP server that behaves like Knot:
each answer holds one name's records (a CNAME, or the records of the asked type) and the
resolver must ask for the target itself, boundedly and without looping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from opsdrill.dns import DnsResolver, analyse_dkim
from opsdrill.dns.resolver import MAX_CNAME_HOPS
from tests.unit.test_dns_records import Responder

KEY = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="


def authoritative(
    zone: dict[str, tuple[str, str]],
) -> Callable[[dns.message.Message], dns.message.Message]:
    """A server that knows ``name -> (type, rdata)`` and never follows a CNAME itself."""

    def handle(request: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(request)
        question = request.question[0]
        name = question.name.to_text().rstrip(".")
        if name not in zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        rtype, rdata = zone[name]
        if rtype == "CNAME" or rtype == dns.rdatatype.to_text(question.rdtype):
            response.answer.append(dns.rrset.from_text(name + ".", 300, "IN", rtype, rdata))
        return response

    return handle


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, tuple[str, str]]], DnsResolver]]:
    started: list[Responder] = []

    def start(zone: dict[str, tuple[str, str]]) -> DnsResolver:
        started.append(Responder(authoritative(zone)))
        return DnsResolver(["127.0.0.1"], port=started[-1].port, timeout=1.0)

    yield start
    for server in started:
        server.close()


def test_cname_into_another_zone_is_followed(
    serve: Callable[[dict[str, tuple[str, str]]], DnsResolver],
) -> None:
    resolver = serve(
        {
            "r1._domainkey.example.test": ("CNAME", "r1.dkim.relay-one.test."),
            "r1.dkim.relay-one.test": ("TXT", f'"{KEY}"'),
        }
    )
    answer = resolver.query("R1._domainkey.example.test.", "TXT")
    assert (answer.qname, answer.rdtype, answer.rcode) == (
        "r1._domainkey.example.test",
        "TXT",
        "NOERROR",
    )
    assert answer.records == (KEY,) and answer.strings == ((KEY.encode(),),)
    assert answer.cname_chain == ("r1.dkim.relay-one.test",)
    # the evidence shows both hops, in order
    lines = answer.text.splitlines()
    assert lines[0].startswith(";; r1._domainkey.example.test. TXT: NOERROR from 127.0.0.1:")
    assert lines[1] == "r1._domainkey.example.test. 300 IN CNAME r1.dkim.relay-one.test."
    assert lines[2].startswith(";; r1.dkim.relay-one.test. TXT: NOERROR")
    assert lines[3] == f'r1.dkim.relay-one.test. 300 IN TXT "{KEY}"'
    assert resolver.queries == 2
    report = analyse_dkim(resolver, "example.test", "r1", cname_suffix="dkim.relay-one.test")
    assert report.findings == [] and report.cname_target == "r1.dkim.relay-one.test"


def test_chain_of_several_cnames_and_a_dangling_target(
    serve: Callable[[dict[str, tuple[str, str]]], DnsResolver],
) -> None:
    resolver = serve(
        {
            "a.example.test": ("CNAME", "b.provider.test."),
            "b.provider.test": ("CNAME", "c.other.test."),
            "c.other.test": ("A", "192.0.2.7"),
            "dangling.example.test": ("CNAME", "gone.provider.test."),
        }
    )
    answer = resolver.query("a.example.test", "A")
    assert answer.records == ("192.0.2.7",)
    assert answer.cname_chain == ("b.provider.test", "c.other.test")
    assert resolver.queries == 3
    dangling = resolver.query("dangling.example.test", "TXT")
    assert (dangling.rcode, dangling.records, dangling.status) == ("NXDOMAIN", (), "NXDOMAIN")
    assert dangling.cname_chain == ("gone.provider.test",)
    # asking for the CNAME itself never chases it
    cname = resolver.query("a.example.test", "CNAME")
    assert cname.records == ("b.provider.test.",) and cname.cname_chain == ()


def test_cname_loop_across_zones_ends_as_nodata(
    serve: Callable[[dict[str, tuple[str, str]]], DnsResolver],
) -> None:
    resolver = serve(
        {
            "sel._domainkey.example.test": ("CNAME", "sel.dkim.provider.test."),
            "sel.dkim.provider.test": ("CNAME", "sel._domainkey.example.test."),
        }
    )
    answer = resolver.query("sel._domainkey.example.test", "TXT")
    assert (answer.rcode, answer.records, answer.status) == ("NOERROR", (), "NODATA")
    assert answer.cname_chain == ("sel.dkim.provider.test", "sel._domainkey.example.test")
    assert "CNAME loop: sel._domainkey.example.test is already in the chain" in answer.text
    assert resolver.queries == 2
    report = analyse_dkim(resolver, "example.test", "sel")
    assert [f.code for f in report.findings] == ["dkim.missing"]


def test_long_chain_stops_after_max_hops(
    serve: Callable[[dict[str, tuple[str, str]]], DnsResolver],
) -> None:
    hops = MAX_CNAME_HOPS + 5
    zone = {f"h{i}.zone{i}.test": ("CNAME", f"h{i + 1}.zone{i + 1}.test.") for i in range(hops)}
    zone[f"h{hops}.zone{hops}.test"] = ("TXT", '"the end"')
    resolver = serve(zone)
    answer = resolver.query("h0.zone0.test", "TXT")
    assert answer.records == () and answer.status == "NODATA"
    assert len(answer.cname_chain) == MAX_CNAME_HOPS + 1
    assert f"not followed further: {MAX_CNAME_HOPS} hops already" in answer.text
    assert resolver.queries == MAX_CNAME_HOPS + 1
