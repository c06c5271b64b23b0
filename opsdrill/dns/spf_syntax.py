"""SPF record syntax (RFC 7208 section 12), validated term by term.

Hand-written rather than taken from pyspf because pyspf stops at the first error (it
raises), and a finding must explain *every* problem in a record at once. The evaluation
(``check_host``) does use pyspf; the RFC 7208 test suite keeps the two in agreement on
what is a syntax error.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
# Terms that cost a DNS query during evaluation (RFC 7208 4.6.4), redirect= included.
QUERYING = ("include", "a", "mx", "ptr", "exists", "redirect")
QUALIFIERS = "+-?~"
MACRO_LETTERS = "slodiphcrtv"
EXP_ONLY_LETTERS = "crt"  # RFC 7208 7.2: allowed only in exp= text

RE_VERSION = re.compile(r"^v=spf1( |$)", re.IGNORECASE)
RE_MODIFIER = re.compile(r"^([A-Za-z][A-Za-z0-9_.\-]*)=(.*)$", re.DOTALL)
RE_DIRECTIVE = re.compile(r"^([+\-?~]?)([A-Za-z][A-Za-z0-9]*)(.*)$", re.DOTALL)
RE_MACRO_TOKEN = re.compile(
    r"%\{(?P<letter>[A-Za-z])(?P<digits>[0-9]*)(?P<reverse>[rR]?)(?P<delims>[.\-+,/_=]*)\}"
    r"|%[%_-]|[\x21-\x24\x26-\x7e]"
)
RE_ENDS_WITH_MACRO = re.compile(r"(%\{[^}]*\}|%[%_-])$")
RE_TOPLABEL = re.compile(
    r"^(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])$"
)
RE_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9][0-9]|[0-9])"
RE_IP4 = re.compile(rf"^{RE_QNUM}(?:\.{RE_QNUM}){{3}}$")
RE_DUAL_CIDR = re.compile(r"^(?::(?P<dom>.*?))?(?P<c4>/[0-9]+)?(?P<c6>//[0-9]+)?$", re.DOTALL)
RE_TRAILING_CIDR = re.compile(r"/[0-9]+$")


def is_spf_record(text: str) -> bool:
    """Whether a TXT record is an SPF record: ``v=spf1`` alone or followed by a space."""
    return bool(RE_VERSION.match(text))


@dataclass(frozen=True)
class Term:
    """One parsed term. ``value`` is the domain-spec, network or modifier value (None when
    the mechanism has no argument, e.g. a bare ``a``). ``ip4`` keeps its prefix length in
    ``cidr4``, ``ip6`` in ``cidr6``."""

    text: str
    modifier: bool
    name: str
    qualifier: str = "+"
    value: str | None = None
    cidr4: int | None = None
    cidr6: int | None = None

    @property
    def querying(self) -> bool:
        return self.name in QUERYING and (not self.modifier or self.name == "redirect")

    @property
    def has_macro(self) -> bool:
        return self.value is not None and "%" in self.value


@dataclass(frozen=True)
class ParsedRecord:
    text: str
    terms: tuple[Term, ...]
    errors: tuple[str, ...]

    @property
    def mechanisms(self) -> list[Term]:
        return [t for t in self.terms if not t.modifier]

    def modifier(self, name: str) -> Term | None:
        return next((t for t in self.terms if t.modifier and t.name == name), None)

    @property
    def all_term(self) -> Term | None:
        return next((t for t in self.mechanisms if t.name == "all"), None)


def macro_error(value: str, *, domain_spec: bool) -> str | None:
    """Why ``value`` is not a valid macro-string, or None."""
    pos = 0
    while pos < len(value):
        m = RE_MACRO_TOKEN.match(value, pos)
        if m is None:
            char = value[pos]
            if char == "%":
                return f"invalid macro at {value[pos : pos + 4]!r}"
            return f"invalid character {char!r}"
        letter = m.group("letter")
        if letter is not None:
            low = letter.lower()
            if low not in MACRO_LETTERS:
                return f"unknown macro letter {letter!r} in {m.group(0)!r}"
            if domain_spec and low in EXP_ONLY_LETTERS:
                return f"macro {m.group(0)!r} is allowed only in exp= text"
            if m.group("digits") and int(m.group("digits")) == 0:
                return f"macro {m.group(0)!r}: the number of parts must be nonzero"
        pos = m.end()
    return None


def domain_spec_error(value: str) -> str | None:
    """Why ``value`` is not a valid domain-spec (macro-string domain-end), or None."""
    if not value:
        return "empty domain"
    error = macro_error(value, domain_spec=True)
    if error:
        return error
    if RE_ENDS_WITH_MACRO.search(value):
        return None
    name = value[:-1] if value.endswith(".") else value
    _head, dot, toplabel = name.rpartition(".")
    if not dot or not RE_TOPLABEL.match(toplabel):
        return f"{value!r} does not end in a valid top-level label (use a FQDN)"
    if "%" not in name:
        labels = name.split(".")
        if any(not label for label in labels):
            return f"{value!r} has an empty label"
        if any(len(label) > 63 for label in labels):
            return f"{value!r} has a label longer than 63 characters"
        if len(name) > 253:
            return f"{value!r} is longer than 253 characters"
    return None


def _cidr(raw: str | None, maximum: int, what: str) -> tuple[int | None, str | None]:
    if raw is None:
        return None, None
    digits = raw.lstrip("/")
    if (len(digits) > 1 and digits.startswith("0")) or int(digits) > maximum:
        return None, f"invalid {what} CIDR length {raw!r} (0-{maximum}, no leading zeros)"
    return int(digits), None


def _parse_mechanism(text: str) -> tuple[Term | None, list[str]]:
    m = RE_DIRECTIVE.match(text)
    if m is None:
        return None, [f"{text!r}: not a mechanism or modifier"]
    qualifier, raw_name, rest = m.group(1) or "+", m.group(2), m.group(3)
    name = raw_name.lower()
    if name not in MECHANISMS:
        return None, [f"{text!r}: unknown mechanism {raw_name!r}"]
    errors: list[str] = []
    value: str | None = None
    c4: int | None = None
    c6: int | None = None
    if name == "all":
        if rest:
            errors.append(f"{text!r}: 'all' takes no argument")
    elif name in ("a", "mx"):
        dm = RE_DUAL_CIDR.match(rest)
        if dm is None:
            errors.append(f"{text!r}: expected {name}[:domain][/cidr4][//cidr6]")
        else:
            value = dm.group("dom")
            c4, e4 = _cidr(dm.group("c4"), 32, "IPv4")
            c6, e6 = _cidr(dm.group("c6"), 128, "IPv6")
            errors += [f"{text!r}: {e}" for e in (e4, e6) if e]
    elif name in ("include", "exists", "ptr"):
        if name == "ptr" and not rest:
            pass
        elif not rest.startswith(":"):
            hint = "a domain" if name != "ptr" else "':domain' or nothing"
            errors.append(f"{text!r}: {name} takes {hint} (no CIDR length)")
        else:
            value = rest[1:]
            if RE_TRAILING_CIDR.search(value):
                errors.append(f"{text!r}: a CIDR length is not allowed on {name}")
                value = None
    else:  # ip4, ip6
        if not rest.startswith(":"):
            errors.append(f"{text!r}: {name} needs ':network'")
        elif "//" in rest:
            errors.append(f"{text!r}: dual CIDR length is not allowed on {name}")
        else:
            network, slash, length = rest[1:].partition("/")
            value = network
            maximum = 32 if name == "ip4" else 128
            if slash:
                if not length.isdigit():
                    errors.append(f"{text!r}: invalid CIDR length {'/' + length!r}")
                else:
                    prefix, e = _cidr("/" + length, maximum, name.upper())
                    errors += [f"{text!r}: {e}"] if e else []
                    c4, c6 = (prefix, None) if name == "ip4" else (None, prefix)
            if name == "ip4" and not RE_IP4.match(network):
                errors.append(f"{text!r}: invalid IPv4 address {network!r}")
            if name == "ip6" and not _valid_ip6(network):
                errors.append(f"{text!r}: invalid IPv6 address {network!r}")
    if value is not None and name in ("a", "mx", "include", "exists", "ptr"):
        error = domain_spec_error(value)
        if error and RE_IP4.match(value):
            error = f"{value!r} is an address, not a domain (use ip4:{value})"
        if error:
            errors.append(f"{text!r}: {error}")
    term = Term(text, False, name, qualifier, value, c4, c6)
    return (term if not errors else None), errors


def _valid_ip6(network: str) -> bool:
    if "%" in network or ":" not in network:
        return False
    try:
        ipaddress.IPv6Address(network)
    except ValueError:
        return False
    return True


def parse_record(text: str) -> ParsedRecord:
    """Parse an SPF record (which must start with ``v=spf1``) and list every error."""
    errors: list[str] = []
    terms: list[Term] = []
    if not is_spf_record(text):
        return ParsedRecord(text, (), ("the record does not start with 'v=spf1'",))
    if not text.isascii():
        errors.append("the record contains non-ASCII characters")
    seen_modifiers: set[str] = set()
    for raw in text.split(" ")[1:]:
        if not raw:
            continue  # terms are separated by one or more spaces
        if not raw.isprintable() or not raw.isascii():
            errors.append(f"{raw!r}: invalid characters (terms are separated by spaces only)")
            continue
        mod = RE_MODIFIER.match(raw)
        if mod:
            name, value = mod.group(1).lower(), mod.group(2)
            if name in ("redirect", "exp"):
                if name in seen_modifiers:
                    errors.append(f"{raw!r}: {name}= may appear only once")
                error = domain_spec_error(value)
                if error:
                    errors.append(f"{raw!r}: {error}")
            else:
                error = macro_error(value, domain_spec=False)
                if error:
                    errors.append(f"{raw!r}: {error}")
            seen_modifiers.add(name)
            terms.append(Term(raw, True, name, "", value))
            continue
        term, term_errors = _parse_mechanism(raw)
        errors += term_errors
        if term is not None:
            terms.append(term)
    return ParsedRecord(text, tuple(terms), tuple(errors))
