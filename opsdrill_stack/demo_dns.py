"""The demo DNS world: sending domains, their mail providers and a DMARC report receiver.

Every record the DNS checks look at is published here so that each check passes as
shipped; the fault tests then break one record at a time on the running server. The same
constants feed the stack's inventory (``inventory_tables``), so what the inventory expects
and what the zones publish cannot drift apart.

Zones (all served by the stack's Knot):

- ``example.test``: the main sending domain. Receives mail (MX ``mx.example.test``),
  sends through provider relay-one (SPF include, DKIM selector ``r1`` as a CNAME into the
  provider's zone) and with its own key (selector ``sel1``). ``app.example.test`` is the
  application host, which must never be an MX.
- ``portal.example.net``: a per-port sending domain, found by the discovery query. Same
  provider, own selector ``portal1``, does not receive mail (null MX).
- ``reports.example.org``: where both domains send DMARC aggregate reports; it authorises
  them (``<domain>._report._dmarc``), as RFC 7489 7.1 requires of an external receiver.
- ``relay-one.test`` / ``relay-two.test``: the providers' own zones (SPF ranges, DKIM
  keys). relay-two is not in any SPF record yet: migration tests add it at runtime.

Only key material varies between runs: fresh 2048-bit RSA keys at every ``stack up``.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from opsdrill_stack.knot import quote_txt

DKIM_BITS = 2048
SOA_SERIAL = 1
TTL = 300
NAMESERVER = "ns1.example.test"
LOOPBACK = "127.0.0.1"
SENDING_IPS = (LOOPBACK,)
APP_HOST = "app.example.test"
APP_IP = "127.0.0.2"
MAIL_HOST = "mx.example.test"
REPORTS_DOMAIN = "reports.example.org"
REPORTS_MAIL_HOST = f"mx.{REPORTS_DOMAIN}"
RUA = f"mailto:dmarc@{REPORTS_DOMAIN}"
DMARC_RECORD = f"v=DMARC1; p=reject; sp=reject; adkim=r; aspf=r; rua={RUA}"
DISCOVERY_QUERY = (
    "SELECT DISTINCT split_part(from_address, '@', 2) FROM crm.email_settings ORDER BY 1"
)


@dataclass(frozen=True)
class DemoProvider:
    """A fake mail provider: it publishes its sending range and the DKIM key it signs with;
    customers include the first and CNAME their selector to the second."""

    name: str
    zone: str
    selector: str
    spf_ranges: tuple[str, ...] = ("ip4:127.0.0.0/8",)

    @property
    def spf_host(self) -> str:
        return f"_spf.{self.zone}"

    @property
    def spf_mechanism(self) -> str:
        return f"include:{self.spf_host}"

    @property
    def dkim_suffix(self) -> str:
        return f"dkim.{self.zone}"

    @property
    def selector_target(self) -> str:
        return f"{self.selector}.{self.dkim_suffix}"


@dataclass(frozen=True)
class DemoDomain:
    """A sending domain: its providers, its own DKIM selector, whether it receives mail."""

    name: str
    providers: tuple[str, ...]
    selector: str
    receives_mail: bool

    @property
    def spf_record(self) -> str:
        own = ["mx"] if self.receives_mail else []  # its own mail host sends bounces
        includes = [PROVIDERS[p].spf_mechanism for p in self.providers]
        return "v=spf1 " + " ".join([*own, *includes, "-all"])


RELAY_ONE = DemoProvider("relay-one", "relay-one.test", "r1")
RELAY_TWO = DemoProvider("relay-two", "relay-two.test", "r2")
PROVIDERS = {p.name: p for p in (RELAY_ONE, RELAY_TWO)}
MAIN = DemoDomain("example.test", ("relay-one",), "sel1", receives_mail=True)
PORTAL = DemoDomain("portal.example.net", ("relay-one",), "portal1", receives_mail=False)
SENDING_DOMAINS = {d.name: d for d in (MAIN, PORTAL)}
# The from_address rows of crm.email_settings: their domains are exactly SENDING_DOMAINS.
EMAIL_SETTINGS = (
    (1, "crm", f"crm@{MAIN.name}"),
    (2, "billing", f"invoices@{MAIN.name}"),
    (3, "partner-portal", f"no-reply@{PORTAL.name}"),
)


@dataclass(frozen=True)
class DkimKey:
    """A generated DKIM key: the TXT record is published, the private half kept on disk."""

    owner: str  # the name its TXT record sits at
    selector: str
    private_file: Path
    public_b64: str

    @property
    def record(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_b64}"


@dataclass(frozen=True)
class DemoDns:
    """What ``publish`` produced: zone file texts by zone name, and the keys by selector."""

    zones: dict[str, str]
    keys: dict[str, DkimKey]


def dkim_owner(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}"


def _generate_key(owner: str, selector: str, dkim_dir: Path) -> DkimKey:
    """A fresh RSA key; the private half goes to ``dkim_dir/<selector>.private`` (0600,
    PKCS#1 PEM, which OpenDKIM and dkimpy both read)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=DKIM_BITS)
    path = dkim_dir / f"{selector}.private"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKey(owner, selector, path, base64.b64encode(der).decode())


def _zone(origin: str, records: list[tuple[str, str, str]]) -> str:
    """A zone file: SOA and NS, then ``(owner, type, rdata)`` rows with absolute owners."""
    lines = [
        f"; {origin}: written by opsdrill stack up (demo_dns)",
        f"$ORIGIN {origin}.",
        f"$TTL {TTL}",
        f"@ SOA {NAMESERVER}. hostmaster.{origin}. {SOA_SERIAL} 3600 600 86400 {TTL}",
        f"@ NS {NAMESERVER}.",
    ]
    lines += [f"{owner}. {rtype} {rdata}" for owner, rtype, rdata in records]
    return "\n".join(lines) + "\n"


def _txt(owner: str, text: str) -> tuple[str, str, str]:
    return (owner, "TXT", quote_txt(text))


def _sending_domain_records(domain: DemoDomain, own_key: DkimKey) -> list[tuple[str, str, str]]:
    name = domain.name
    rows = [
        _txt(name, domain.spf_record),
        _txt(own_key.owner, own_key.record),
        _txt(f"_dmarc.{name}", DMARC_RECORD),
    ]
    for provider in (PROVIDERS[p] for p in domain.providers):
        rows.append((dkim_owner(name, provider.selector), "CNAME", provider.selector_target + "."))
    if domain.receives_mail:
        rows.append((name, "MX", f"10 {MAIL_HOST}."))
    else:
        rows.append((name, "MX", "0 ."))  # RFC 7505 null MX: accepts no mail
    return rows


def publish(dkim_dir: Path) -> DemoDns:
    """Generate the keys (private halves into ``dkim_dir``) and render every zone."""
    dkim_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(dkim_dir, 0o700)
    keys: dict[str, DkimKey] = {}
    for domain in SENDING_DOMAINS.values():
        keys[domain.selector] = _generate_key(
            dkim_owner(domain.name, domain.selector), domain.selector, dkim_dir
        )
    for provider in PROVIDERS.values():
        keys[provider.selector] = _generate_key(
            provider.selector_target, provider.selector, dkim_dir
        )
    main = [
        *_sending_domain_records(MAIN, keys[MAIN.selector]),
        (NAMESERVER, "A", LOOPBACK),
        (MAIL_HOST, "A", LOOPBACK),
        (APP_HOST, "A", APP_IP),
    ]
    reports = [
        (REPORTS_DOMAIN, "MX", f"10 {REPORTS_MAIL_HOST}."),
        (REPORTS_MAIL_HOST, "A", LOOPBACK),
        _txt(REPORTS_DOMAIN, "v=spf1 -all"),  # receives reports, sends nothing
        _txt(f"_dmarc.{REPORTS_DOMAIN}", "v=DMARC1; p=reject"),
    ] + [_txt(f"{name}._report._dmarc.{REPORTS_DOMAIN}", "v=DMARC1") for name in SENDING_DOMAINS]
    zones = {
        MAIN.name: _zone(MAIN.name, main),
        PORTAL.name: _zone(PORTAL.name, _sending_domain_records(PORTAL, keys[PORTAL.selector])),
        REPORTS_DOMAIN: _zone(REPORTS_DOMAIN, reports),
    }
    for provider in PROVIDERS.values():
        zones[provider.zone] = _zone(
            provider.zone,
            [
                _txt(provider.spf_host, "v=spf1 " + " ".join([*provider.spf_ranges, "-all"])),
                _txt(provider.selector_target, keys[provider.selector].record),
            ],
        )
    return DemoDns(zones=zones, keys=keys)


def inventory_tables(dns_port: int, database: str) -> dict[str, Any]:
    """The inventory sections describing this world, for the stack's inventory.toml.

    Both sending domains are listed explicitly: a discovered domain without expectations
    is itself a finding, so the shipped inventory must not have one.
    """
    providers = {
        p.name: {
            "spf": [p.spf_mechanism],
            "dkim_selectors": [p.selector],
            "dkim_cname_suffix": p.dkim_suffix,
        }
        for p in PROVIDERS.values()
    }
    domains = {
        d.name: {
            "providers": list(d.providers),
            "dkim_selectors": [d.selector],
            "receives_mail": d.receives_mail,
            "forbidden_mx": [APP_HOST],
            "sending_ips": list(SENDING_IPS),
            "dkim_min_rsa_bits": DKIM_BITS,
            "dmarc": {
                "min_policy": "reject",
                "min_subdomain_policy": "reject",
                "require_rua": True,
                "adkim": "r",
                "aspf": "r",
            },
        }
        for d in SENDING_DOMAINS.values()
    }
    return {
        "dns": {"nameservers": [LOOPBACK], "port": dns_port, "timeout_seconds": 2.0},
        "mail_providers": providers,
        "sending_domains": domains,
        "sending_domain_discovery": {"database": database, "query": DISCOVERY_QUERY},
    }
