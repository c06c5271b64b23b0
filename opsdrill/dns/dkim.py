"""DKIM key records (RFC 6376 3.6.1, RFC 8301, RFC 8463): present, usable, strong.

``analyse_dkim`` looks up ``<selector>._domainkey.<domain>`` (following a CNAME to the
email provider, which is how most providers publish and rotate their keys) and checks:
exactly one key record; ``v=DKIM1`` first when present (RFC 6376 allows it to be absent);
``k=rsa`` (the default) or ``ed25519``; the key not revoked (empty ``p=``); an RSA key of
at least ``min_rsa_bits`` read from the DER public key itself (not guessed from the
base64 length); an Ed25519 key of 32 bytes; ``h=`` allowing sha256 (RFC 8301 forbids
sha1); ``s=`` covering email; no ``t=y`` (testing mode: receivers may ignore failures)
unless ``allow_testing``. With ``cname_suffix`` the selector must be a CNAME into that
suffix (the provider's zone), so the provider can rotate the key.

Codes: dkim.missing, dkim.multiple_records, dkim.not_cname, dkim.syntax, dkim.bad_version,
dkim.key_type, dkim.revoked, dkim.bad_key, dkim.weak_key, dkim.hash, dkim.service,
dkim.testing.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from opsdrill.dns.findings import DnsReport, finding, quote, quote_all
from opsdrill.dns.resolver import Lookups, Resolver, normalise_name
from opsdrill.dns.tags import TagList, parse_tags

RE_KEY_RECORD = re.compile(r"^\s*v\s*=\s*DKIM1\s*(;|$)")
ED25519_KEY_BYTES = 32


@dataclass(kw_only=True)
class DkimReport(DnsReport):
    selector: str
    name: str
    record: str | None = None
    cname_target: str | None = None
    key_type: str | None = None
    key_bits: int | None = None
    testing: bool = False

    def details(self) -> dict[str, Any]:
        return {
            "selector": self.selector,
            "name": self.name,
            "record": self.record,
            "cname_target": self.cname_target,
            "key_type": self.key_type,
            "key_bits": self.key_bits,
            "testing": self.testing,
        }


def _is_key_record(text: str) -> bool:
    """A DKIM key record: starts ``v=DKIM1``, or has a p= tag (v= is optional; a wrong
    v= on a record with a key is reported as dkim.bad_version, not ignored)."""
    return bool(RE_KEY_RECORD.match(text)) or "p" in parse_tags(text).tags


class _Checker:
    def __init__(self, report: DkimReport) -> None:
        self.report = report

    def add(self, code: str, expected: str, found: str) -> None:
        self.report.findings.append(finding(code, self.report.name, "TXT", "dkim", expected, found))

    def check_record(self, tags: TagList, min_rsa_bits: int, allow_testing: bool) -> None:
        for error in tags.errors:
            self.add("dkim.syntax", "a valid tag=value list (RFC 6376 3.2)", error)
        version = tags.get("v")
        if version is not None and (tags.order[0] != "v" or version != "DKIM1"):
            where = "first" if tags.order[0] == "v" else f"at position {tags.order.index('v') + 1}"
            self.add(
                "dkim.bad_version",
                "'v=DKIM1' as the first tag (or no v= at all)",
                f"'v={version}' {where}",
            )
        key_type = tags.get("k") or "rsa"
        self.report.key_type = key_type
        if key_type not in ("rsa", "ed25519"):
            self.add("dkim.key_type", "k=rsa or k=ed25519", f"k={key_type}")
        hashes = tags.get("h")
        if hashes is not None and "sha256" not in [h.strip() for h in hashes.split(":")]:
            self.add(
                "dkim.hash", "h= to allow sha256 (RFC 8301: sha1 must not be used)", f"h={hashes}"
            )
        services = tags.get("s")
        if services is not None and not {"*", "email"} & {s.strip() for s in services.split(":")}:
            self.add("dkim.service", "s= to include '*' or 'email'", f"s={services}")
        flags = {f.strip() for f in (tags.get("t") or "").split(":")}
        self.report.testing = "y" in flags
        if self.report.testing and not allow_testing:
            self.add(
                "dkim.testing",
                "no t=y (testing mode: receivers may ignore DKIM failures)",
                f"t={tags.get('t')}",
            )
        key = tags.get("p")
        if key is None:
            self.add("dkim.syntax", "a p= tag with the public key", "no p= tag")
            return
        self.check_key(re.sub(r"\s+", "", key), key_type, min_rsa_bits)

    def check_key(self, key: str, key_type: str, min_rsa_bits: int) -> None:
        if not key:
            self.add("dkim.revoked", "a public key in p=", "an empty p= (the key is revoked)")
            return
        try:
            der = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            self.add("dkim.bad_key", "p= in base64", f"p={quote(key, 60)} does not decode")
            return
        if key_type == "ed25519":
            self.report.key_bits = len(der) * 8
            if len(der) != ED25519_KEY_BYTES:
                self.add(
                    "dkim.bad_key",
                    f"an Ed25519 key of {ED25519_KEY_BYTES} bytes",
                    f"{len(der)} bytes",
                )
            return
        if key_type != "rsa":
            return
        try:
            public = load_der_public_key(der)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            self.add("dkim.bad_key", "p= to hold a DER RSA public key", f"unreadable key: {exc}")
            return
        if not isinstance(public, rsa.RSAPublicKey):
            self.add("dkim.key_type", "an RSA key for k=rsa", f"a {type(public).__name__}")
            return
        self.report.key_bits = public.key_size
        if public.key_size < min_rsa_bits:
            self.add(
                "dkim.weak_key",
                f"an RSA key of at least {min_rsa_bits} bits",
                f"a weak key of {public.key_size} bits",
            )


def analyse_dkim(
    resolver: Resolver,
    domain: str,
    selector: str,
    *,
    min_rsa_bits: int = 2048,
    allow_testing: bool = False,
    cname_suffix: str | None = None,
) -> DkimReport:
    """Analyse the DKIM key of ``selector`` for ``domain``; see the module docstring.

    Raises ``TargetUnreachable`` when DNS cannot answer.
    """
    domain = normalise_name(domain)
    selector = normalise_name(selector)
    name = f"{selector}._domainkey.{domain}"
    dns = Lookups(resolver)
    report = DkimReport(domain=domain, selector=selector, name=name)
    checker = _Checker(report)
    answer = dns.query(name, "TXT")
    report.answers = dns.answers
    if answer.cname_chain:
        report.cname_target = answer.cname_chain[0]
    if cname_suffix is not None:
        suffix = normalise_name(cname_suffix)
        target = report.cname_target
        if target is None:
            checker.add(
                "dkim.not_cname",
                f"a CNAME into {quote(suffix)} (the provider's key)",
                f"no CNAME ({answer.status})",
            )
        elif target != suffix and not target.endswith("." + suffix):
            checker.add(
                "dkim.not_cname",
                f"a CNAME into {quote(suffix)} (the provider's key)",
                f"a CNAME to {quote(target)}",
            )
    via = f" (via CNAME {' -> '.join(answer.cname_chain)})" if answer.cname_chain else ""
    keys = [r for r in answer.records if _is_key_record(r)]
    if not keys:
        others = f"; other TXT records: {quote_all(list(answer.records))}" if answer.records else ""
        checker.add(
            "dkim.missing",
            "a DKIM key record ('v=DKIM1; k=...; p=...')",
            f"{answer.status}{via}{others}",
        )
        return report
    if len(keys) > 1:
        checker.add(
            "dkim.multiple_records",
            "exactly one DKIM key record",
            f"{len(keys)}{via}: {quote_all(keys)}",
        )
        return report
    report.record = keys[0]
    checker.check_record(parse_tags(keys[0]), min_rsa_bits, allow_testing)
    return report
