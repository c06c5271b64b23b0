"""Inventory sections for mail authentication: resolvers, providers, sending domains.

A sending domain's DNS is only "right" relative to what the organisation expects of it:
which providers send for it (and so which SPF mechanisms and DKIM selectors it must
publish), how strict its DMARC must be, whether it receives mail. These models hold those
expectations; the DNS checks compare them with what the resolvers answer. Like the rest of
the inventory, everything is validated on load and every problem is reported at once.

Names are normalised here (lower case, no trailing dot), so later code compares DNS names
with ``==`` and never meets ``Example.TEST.``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from opsdrill.config.fields import StrictModel

Policy = Literal["none", "quarantine", "reject"]
# DMARC policies by strength: a published policy satisfies a minimum of equal or lower rank.
POLICY_RANK: dict[str, int] = {"none": 0, "quarantine": 1, "reject": 2}

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def policy_at_least(found: str, minimum: str) -> bool:
    """Whether DMARC policy ``found`` is at least as strict as ``minimum``.

    An unknown ``found`` (a typo in the published record) never satisfies anything.
    """
    return POLICY_RANK.get(found.strip().lower(), -1) >= POLICY_RANK[minimum]


def _labels_ok(name: str) -> bool:
    return bool(name) and len(name) <= 253 and all(_LABEL.match(lb) for lb in name.split("."))


def normalise_domain(value: str) -> str:
    """A fully qualified DNS name, lower case and without the trailing dot."""
    name = value.rstrip(".").lower()
    if not name.isascii():
        raise ValueError("not ASCII; write the name in its xn-- (punycode) form")
    if not _labels_ok(name) or "." not in name:
        raise ValueError(
            "not a fully qualified domain name (labels of 1-63 letters, digits, '-' or '_', "
            "separated by dots)"
        )
    return name


def _selector(value: str) -> str:
    name = value.lower()
    if not name.isascii() or not _labels_ok(name):
        raise ValueError("not a DKIM selector (a DNS label, e.g. 'sel1' or 's1.mail')")
    if "_domainkey" in name.split("."):
        raise ValueError("give the selector alone, without ._domainkey")
    return name


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("not an IPv4 or IPv6 address") from None


_A_MX = re.compile(r"^(a|mx)(:[^/]+)?(/\d{1,2})?(//\d{1,3})?$")


def _spf_mechanism(value: str) -> str:
    """One mechanism a domain's SPF record must contain, as written in the record."""
    mech = value.strip().lower()
    if mech[:1] in "+-~?":
        raise ValueError(
            "give the mechanism without a qualifier; a required mechanism must "
            "authorise (pass), e.g. include:_spf.google.com"
        )
    name, _, arg = mech.partition(":")
    if name in ("include", "exists"):
        if not arg:
            raise ValueError(f"{name} needs a domain, e.g. {name}:_spf.example.com")
        if name == "include" and "%" not in arg:
            try:
                normalise_domain(arg)
            except ValueError as exc:
                raise ValueError(f"include target {arg!r}: {exc}") from None
        return mech
    if name in ("ip4", "ip6"):
        try:
            net = ipaddress.ip_network(arg, strict=False)
        except ValueError:
            raise ValueError(f"{arg!r} is not an IP address or CIDR range") from None
        if net.version != int(name[-1]):
            raise ValueError(f"{arg!r} is not an IPv{name[-1]} range")
        return mech
    if _A_MX.match(mech):
        return mech
    raise ValueError(
        "not an SPF mechanism a provider can require "
        "(include:DOMAIN, ip4:RANGE, ip6:RANGE, a, mx or exists:DOMAIN)"
    )


DomainName = Annotated[str, AfterValidator(normalise_domain)]
Selector = Annotated[str, AfterValidator(_selector)]
IpAddress = Annotated[str, AfterValidator(_ip)]
SpfMechanism = Annotated[str, AfterValidator(_spf_mechanism)]
ProviderName = Annotated[str, Field(pattern=_NAME)]


class DnsSettings(StrictModel):
    """Where the DNS checks ask. No nameservers: the system resolver (/etc/resolv.conf)."""

    nameservers: list[IpAddress] = Field(default_factory=list)
    port: int = Field(default=53, ge=1, le=65535)
    # Per query. Bounded: a resolver that needs 30 s is down, and the checks should say so.
    timeout_seconds: float = Field(default=2.0, gt=0, le=30)


class MailProvider(StrictModel):
    """A service that sends for our domains (Google Workspace, Amazon SES, a relay)."""

    spf: list[SpfMechanism] = Field(min_length=1)
    dkim_selectors: list[Selector] = Field(default_factory=list)
    # Providers that keep the key themselves (SES, Microsoft 365) have us publish CNAMEs into
    # their zone: then a TXT copy of the key at the selector is a stale key, not a match.
    dkim_cname_suffix: DomainName | None = None

    @model_validator(mode="after")
    def _suffix_needs_selectors(self) -> MailProvider:
        if self.dkim_cname_suffix is not None and not self.dkim_selectors:
            raise ValueError("dkim_cname_suffix needs dkim_selectors: name the selectors")
        return self


class DmarcExpectation(StrictModel):
    min_policy: Policy = "reject"
    # None: the same minimum as min_policy (a record without sp= inherits p=).
    min_subdomain_policy: Policy | None = None
    require_rua: bool = True
    adkim: Literal["r", "s"] | None = None
    aspf: Literal["r", "s"] | None = None

    @property
    def subdomain_minimum(self) -> Policy:
        return self.min_subdomain_policy or self.min_policy


class Migration(StrictModel):
    """Moving a domain between providers: until ``until`` both must be authorised."""

    from_: ProviderName = Field(alias="from")
    to: ProviderName
    until: datetime

    @field_validator("until")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                "until needs a time zone, e.g. 2026-12-31T00:00:00Z (a local time is ambiguous)"
            )
        return value

    def is_open(self, now: datetime) -> bool:
        return now < self.until


class SendingDomain(StrictModel):
    """What one domain that sends mail must publish."""

    providers: list[ProviderName] = Field(min_length=1)
    dkim_selectors: list[Selector] = Field(default_factory=list)
    # Required: the MX check's expectations are opposite for the two answers.
    receives_mail: bool
    forbidden_mx: list[DomainName] = Field(default_factory=list)
    sending_ips: list[IpAddress] = Field(default_factory=list)
    dkim_min_rsa_bits: int = Field(default=2048, ge=1024, le=16384)
    dmarc: DmarcExpectation = DmarcExpectation()
    migration: Migration | None = None

    def migrating(self, now: datetime | None = None) -> bool:
        """Whether a migration window is open at ``now`` (default: the current time)."""
        return self.migration is not None and self.migration.is_open(now or datetime.now(UTC))


class SendingDomainDiscovery(StrictModel):
    """A query returning the domains the application sends from, one per row."""

    database: str
    query: str = Field(min_length=1)

    @field_validator("query")
    @classmethod
    def _read_only(cls, value: str) -> str:
        if value.split(None, 1)[0].upper() not in ("SELECT", "WITH", "VALUES", "TABLE"):
            raise ValueError("query must be a single read-only SELECT")
        return value.strip()


def _no_case_duplicates(value: object) -> object:
    """TOML keys are case-sensitive, DNS names are not: two spellings of one domain would
    otherwise merge silently, the last one winning."""
    if isinstance(value, dict):
        seen: dict[str, str] = {}
        for key in value:
            if isinstance(key, str):
                folded = key.rstrip(".").lower()
                if folded in seen:
                    raise ValueError(
                        f"{seen[folded]!r} and {key!r} are the same domain; keep one of them"
                    )
                seen[folded] = key
    return value


SendingDomains = Annotated[dict[DomainName, SendingDomain], BeforeValidator(_no_case_duplicates)]


@dataclass(frozen=True)
class ExpectedSelector:
    """A DKIM selector a domain must publish, and whose it is (None: the domain's own)."""

    selector: str
    provider: str | None
    cname_suffix: str | None


def expected_providers(
    providers: dict[str, MailProvider], domain: SendingDomain, now: datetime | None = None
) -> dict[str, MailProvider]:
    """The providers whose records ``domain`` must carry at ``now``: its own list, plus
    both ends of a migration while its window is open."""
    names = list(domain.providers)
    if domain.migration is not None and domain.migrating(now):
        names += [domain.migration.from_, domain.migration.to]
    return {name: providers[name] for name in dict.fromkeys(names) if name in providers}


def expected_selectors(
    providers: dict[str, MailProvider], domain: SendingDomain, now: datetime | None = None
) -> list[ExpectedSelector]:
    found = [ExpectedSelector(sel, None, None) for sel in domain.dkim_selectors]
    for name, provider in expected_providers(providers, domain, now).items():
        found += [
            ExpectedSelector(sel, name, provider.dkim_cname_suffix)
            for sel in provider.dkim_selectors
        ]
    return found


def _migration_ends(spec: SendingDomain) -> list[str]:
    return [spec.migration.from_, spec.migration.to] if spec.migration else []


def _key(domain: str) -> str:
    """A domain as TOML needs it in a dotted key."""
    return f'"{domain}"'


class MailSections(Protocol):
    """What the cross-checks read of the whole inventory (``InventoryModel`` has it):
    named here so this module never imports the one that imports it."""

    @property
    def mail_providers(self) -> Mapping[str, MailProvider]: ...

    @property
    def sending_domains(self) -> Mapping[str, SendingDomain]: ...

    @property
    def sending_domain_discovery(self) -> SendingDomainDiscovery | None: ...

    @property
    def databases(self) -> Mapping[str, object]: ...


def mail_cross_checks(path: Path, model: MailSections) -> list[str]:
    """References between sections, which per-model validation cannot see."""
    problems: list[str] = []
    known = sorted(model.mail_providers)
    for domain, spec in model.sending_domains.items():
        where = f"{path}: sending_domains.{_key(domain)}"
        for name in spec.providers:
            if name not in model.mail_providers:
                problems.append(
                    f"{where}.providers: no mail provider {name!r} "
                    f"(fix: use one of {known} or add [mail_providers.{name}])"
                )
        if spec.migration is not None:
            for role, name in (("from", spec.migration.from_), ("to", spec.migration.to)):
                if name not in model.mail_providers:
                    problems.append(
                        f"{where}.migration.{role}: no mail provider {name!r} "
                        f"(fix: use one of {known} or add [mail_providers.{name}])"
                    )
            if spec.migration.from_ == spec.migration.to:
                problems.append(
                    f"{where}.migration: from and to are both {spec.migration.to!r} "
                    "(fix: name the old provider in from and the new one in to)"
                )
        named = [*spec.providers, *_migration_ends(spec)]
        provider_selectors = {
            sel: name
            for name in named
            if name in model.mail_providers
            for sel in model.mail_providers[name].dkim_selectors
        }
        for sel in spec.dkim_selectors:
            if sel in provider_selectors:
                problems.append(
                    f"{where}.dkim_selectors: {sel!r} is already provider "
                    f"{provider_selectors[sel]!r}'s selector (fix: list it in one place only)"
                )
        if not spec.dkim_selectors and not provider_selectors:
            problems.append(
                f"{where}: no DKIM selector is expected, so DKIM would go unchecked (fix: add "
                "dkim_selectors to the domain or to one of its mail_providers)"
            )
    discovery = model.sending_domain_discovery
    if discovery is not None and discovery.database not in model.databases:
        problems.append(
            f"{path}: sending_domain_discovery.database: no database {discovery.database!r} "
            f"(fix: use one of {sorted(model.databases)})"
        )
    return problems
