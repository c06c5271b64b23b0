"""The local stack's DNS server: Knot serving the demo zones, edited and restored at runtime.

Most tests share one server (module scope) and restore every zone after themselves; the
lifecycle tests start their own. Every server started here is stopped here.
"""

from __future__ import annotations

import base64
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from opsdrill.config.inventory import load
from opsdrill_stack import demo_dns
from opsdrill_stack.knot import (
    KnotControlError,
    KnotServer,
    _owner,
    _udp_and_tcp_free,
    quote_txt,
    txt_rdata,
)
from opsdrill_stack.procs import pid_alive
from tests.conftest import Stack


def txt(res: dns.resolver.Resolver, name: str) -> list[str]:
    answer = res.resolve(name, "TXT")
    return sorted(b"".join(r.strings).decode() for r in answer)


def key_bits(record: str) -> int:
    tags = dict(part.strip().split("=", 1) for part in record.split(";") if part.strip())
    key = serialization.load_der_public_key(base64.b64decode(tags["p"]))
    assert isinstance(key, rsa.RSAPublicKey)
    return key.key_size


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[demo_dns.DemoDns, Path]:
    base = tmp_path_factory.mktemp("dns")
    return demo_dns.publish(base / "dkim"), base


@pytest.fixture(scope="module")
def shared_knot(published: tuple[demo_dns.DemoDns, Path]) -> Iterator[KnotServer]:
    demo, base = published
    server = KnotServer("dns-test", base / "knot")
    server.start(demo.zones)
    try:
        yield server
    finally:
        server.stop()
    assert not pid_alive(server.pid)


@pytest.fixture
def knot(shared_knot: KnotServer) -> Iterator[KnotServer]:
    try:
        yield shared_knot
    finally:
        shared_knot.restore_all()


# -- TXT presentation -----------------------------------------------------------------------
def test_long_txt_is_split_into_255_byte_strings() -> None:
    assert quote_txt("v=spf1 -all") == '"v=spf1 -all"'
    parts = quote_txt("a" * 600).split(" ")
    assert [len(p) - 2 for p in parts] == [255, 255, 90]
    # counted in bytes, escaped for the zone-file parser
    assert quote_txt('say "hi" \\ é') == r'"say \"hi\" \\ \195\169"'
    assert txt_rdata(("one", "two")) == '"one" "two"'
    with pytest.raises(ValueError, match="at most 255 bytes"):
        txt_rdata(("x" * 256,))


def test_owner_names() -> None:
    assert _owner("example.test", "@") == "example.test."
    assert _owner("Example.Test.", "Sel1._domainkey") == "sel1._domainkey.example.test."
    assert _owner("example.test", "_dmarc.example.test") == "_dmarc.example.test."
    assert _owner("example.test", "mx.example.test.") == "mx.example.test."


# -- the demo zones as shipped -------------------------------------------------------------
def test_every_zone_answers_and_keys_are_2048_bit(
    knot: KnotServer, published: tuple[demo_dns.DemoDns, Path]
) -> None:
    demo, base = published
    res = knot.resolver()
    assert knot.zones() == sorted(demo.zones)
    for zone in demo.zones:
        assert res.resolve(zone, "SOA")[0].serial == demo_dns.SOA_SERIAL
    for selector, key in demo.keys.items():
        assert txt(res, key.owner) == [key.record]
        assert key_bits(key.record) == 2048
        assert key.private_file == base / "dkim" / f"{selector}.private"
        assert key.private_file.stat().st_mode & 0o777 == 0o600
        private = serialization.load_pem_private_key(key.private_file.read_bytes(), None)
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert base64.b64encode(public).decode() == key.public_b64
    # a 2048-bit key does not fit one TXT string: it is published as several
    sel1 = res.resolve("sel1._domainkey.example.test", "TXT")[0]
    assert len(sel1.strings) == 2 and all(len(s) <= 255 for s in sel1.strings)


def test_main_domain_records(knot: KnotServer) -> None:
    res = knot.resolver()
    spf = [t for t in txt(res, "example.test") if t.startswith("v=spf1")]
    assert spf == ["v=spf1 mx include:_spf.relay-one.test -all"]
    assert txt(res, "_spf.relay-one.test") == ["v=spf1 ip4:127.0.0.0/8 -all"]
    assert [r.to_text() for r in res.resolve("example.test", "MX")] == ["10 mx.example.test."]
    assert res.resolve("mx.example.test", "A")[0].to_text() == "127.0.0.1"
    assert res.resolve("app.example.test", "A")[0].to_text() == "127.0.0.2"
    assert txt(res, "_dmarc.example.test") == [demo_dns.DMARC_RECORD]
    assert "p=reject" in demo_dns.DMARC_RECORD and "rua=mailto:dmarc@reports.example.org" in (
        demo_dns.DMARC_RECORD
    )
    # relay-two is ready for a migration but not authorised yet
    assert "relay-two" not in spf[0]
    assert txt(res, "_spf.relay-two.test") == ["v=spf1 ip4:127.0.0.0/8 -all"]


def test_provider_selector_is_a_cname_that_the_client_follows(knot: KnotServer) -> None:
    """Knot is authoritative only: it answers the CNAME, and the provider's key when asked
    for the target (a recursive resolver in production chases it in one query)."""
    res = knot.resolver()
    for domain in demo_dns.SENDING_DOMAINS:
        answer = res.resolve(f"r1._domainkey.{domain}", "TXT", raise_on_no_answer=False)
        assert answer.canonical_name.to_text() == "r1.dkim.relay-one.test."
        cname = answer.response.find_rrset(
            answer.response.answer,
            dns.name.from_text(f"r1._domainkey.{domain}"),
            dns.rdataclass.IN,
            dns.rdatatype.CNAME,
        )
        assert cname[0].target.to_text() == "r1.dkim.relay-one.test."
        assert key_bits(txt(res, "r1.dkim.relay-one.test")[0]) == 2048


def test_portal_domain_and_report_authorisation(knot: KnotServer) -> None:
    res = knot.resolver()
    assert [r.to_text() for r in res.resolve("portal.example.net", "MX")] == ["0 ."]
    assert txt(res, "portal.example.net") == ["v=spf1 include:_spf.relay-one.test -all"]
    assert txt(res, "_dmarc.portal.example.net") == [demo_dns.DMARC_RECORD]
    assert key_bits(txt(res, "portal1._domainkey.portal.example.net")[0]) == 2048
    for domain in demo_dns.SENDING_DOMAINS:
        assert txt(res, f"{domain}._report._dmarc.reports.example.org") == ["v=DMARC1"]
    assert res.resolve("reports.example.org", "MX")[0].to_text() == "10 mx.reports.example.org."


# -- runtime edits -------------------------------------------------------------------------
def test_edit_a_txt_record_and_restore_it(knot: KnotServer) -> None:
    res = knot.resolver()
    knot.set_records("example.test", "@", "TXT", ["v=spf1 ~all", "v=spf1 -all"])
    assert txt(res, "example.test") == ["v=spf1 -all", "v=spf1 ~all"]
    knot.restore_zone("example.test")
    assert txt(res, "example.test") == ["v=spf1 mx include:_spf.relay-one.test -all"]


def test_long_txt_value_is_split_at_runtime(knot: KnotServer) -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 700
    knot.set_records("example.test", "sel1._domainkey", "TXT", value)
    record = knot.resolver().resolve("sel1._domainkey.example.test", "TXT")[0]
    assert [len(s) for s in record.strings] == [255, 255, 208]
    assert b"".join(record.strings).decode() == value


def test_cname_replaces_the_node_and_remove_deletes(knot: KnotServer) -> None:
    res = knot.resolver()
    knot.set_records("example.test", "mx", "CNAME", "app.example.test.")
    answer = res.resolve("mx.example.test", "A")
    assert answer.canonical_name.to_text() == "app.example.test."
    knot.remove_records("example.test", "_dmarc", "TXT")
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("_dmarc.example.test", "TXT")
    knot.set_records("relay-one.test", "_spf", "TXT", "v=spf1 ip4:10.0.0.0/8 -all")
    knot.restore_all()
    assert res.resolve("mx.example.test", "A")[0].to_text() == "127.0.0.1"
    assert txt(res, "_dmarc.example.test") == [demo_dns.DMARC_RECORD]
    assert txt(res, "_spf.relay-one.test") == ["v=spf1 ip4:127.0.0.0/8 -all"]


def test_failed_edit_names_knotc_output_and_leaves_no_open_transaction(knot: KnotServer) -> None:
    with pytest.raises(KnotControlError) as info:
        knot.set_records("example.test", "@", "MX", "not-a-preference mx.example.test.")
    assert "zone-set" in str(info.value) and "parser failed" in str(info.value)
    with pytest.raises(KnotControlError, match=r"no TXT at nothere\.example\.test\."):
        knot.remove_records("example.test", "nothere", "TXT")
    knot.remove_records("example.test", "nothere", missing_ok=True)
    with pytest.raises(KnotControlError, match="no such zone"):
        knot.set_records("nosuch.test", "@", "TXT", "x")
    # the aborted transactions do not block the next edit or a restore
    knot.set_records("example.test", "@", "MX", "20 mx.example.test.")
    assert knot.resolver().resolve("example.test", "MX")[0].to_text() == "20 mx.example.test."


# -- lifecycle -----------------------------------------------------------------------------
def test_port_must_be_free_for_udp_too() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        assert not _udp_and_tcp_free(s.getsockname()[1])


def test_rebuilt_from_state_it_edits_and_stops_by_pid(tmp_path: Path) -> None:
    zone = demo_dns._zone("solo.test", [("solo.test", "TXT", quote_txt("hello"))])
    # A deep base: the control socket moves to a short path derived from it.
    server = KnotServer("solo", tmp_path / ("deep-directory-" * 6) / "knot")
    assert len(str(server.base / "run" / "knot.sock")) > 107
    server.start({"solo.test": zone})
    try:
        assert server.status() == "running"
        assert len(str(server.control_socket)) < 107 and server.control_socket.exists()
        # what LocalStack.down() does from another process: only the recorded facts
        again = KnotServer(server.name, server.base, port=server.port, pid=server.pid)
        again.set_records("solo.test", "@", "TXT", "changed")
        assert txt(server.resolver(), "solo.test") == ["changed"]
        again.stop()
        assert again.status() == "stopped" and not pid_alive(server.pid)
        assert not server.control_socket.parent.exists()
    finally:
        server.stop()


def test_broken_zone_fails_fast_with_knots_message(tmp_path: Path) -> None:
    server = KnotServer("broken", tmp_path / "knot")
    try:
        with pytest.raises(KnotControlError, match="checking the zone files"):
            server.start({"broken.test": "$ORIGIN broken.test.\n@ MX nonsense\n"})
        assert server.pid == 0
    finally:
        server.stop()


# -- in the full local stack -----------------------------------------------------------------
def test_stack_serves_dns_and_inventory_describes_it(stack: Stack) -> None:
    data = tomllib.loads(stack.inventory_path.read_text())
    assert set(data["sending_domains"]) == set(demo_dns.SENDING_DOMAINS)
    assert set(data["mail_providers"]) == {"relay-one", "relay-two"}
    inv = load(stack.inventory_path)
    server = stack.stack.knot()
    assert server.status() == "running"
    assert inv.dns.nameservers == ["127.0.0.1"] and inv.dns.port == server.port
    assert stack.stack.state["components"]["dns"]["config"] == str(server.conf)
    assert list(inv.providers_for("example.test")) == ["relay-one"]
    portal = inv.sending_domain("portal.example.net")
    assert portal.receives_mail is False and portal.sending_ips == ["127.0.0.1"]
    res = server.resolver(timeout=inv.dns.timeout_seconds)
    assert txt(res, "_dmarc.example.test") == [demo_dns.DMARC_RECORD]
    assert (stack.stack.base / "dkim" / "sel1.private").stat().st_mode & 0o777 == 0o600
    discovery = inv.model.sending_domain_discovery
    assert discovery is not None and discovery.database == "crm"
    with stack.live_conn() as conn:
        found = [row[0] for row in conn.execute(discovery.query)]
    assert found == sorted(demo_dns.SENDING_DOMAINS)
