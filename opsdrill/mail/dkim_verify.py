"""DKIM verification of the message as received (dkimpy), keys from our resolver.

dkimpy does the cryptography; the key lookups go through ``opsdrill.dns.Resolver`` (its
``dnsfunc`` hook), so the probe reads the same DNS server as the DNS checks, with their
timeouts, and a DNS outage raises ``TargetUnreachable`` (broken) instead of turning into
a signature failure. Every ``DKIM-Signature`` is verified and reported on its own: a
message commonly carries the provider's signature and ours.

Alignment (DMARC, RFC 7489 3.1.1): relaxed means ``d=`` and the From domain share an
organisational domain, found with the Public Suffix List (``opsdrill.dns.orgdomain``, the rule
DMARC policy discovery uses too: ``d=other.co.uk`` does not align with ``example.co.uk``);
strict means they are equal. ``aligned`` serves SPF alignment (the envelope domain) alike.
"""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import dkim
from dkim.util import DuplicateTag, InvalidTagValueList

from opsdrill.dns.orgdomain import same_organisation
from opsdrill.dns.resolver import Resolver, normalise_name
from opsdrill.mail.message import from_domain, parse_headers


@dataclass(frozen=True)
class DkimSignatureVerdict:
    """One signature: ``result`` is ``pass`` or ``fail`` (``error`` says why)."""

    index: int  # 0 = topmost DKIM-Signature header
    result: str
    domain: str | None  # d=
    selector: str | None  # s=
    algorithm: str | None  # a=
    signed_headers: tuple[str, ...]
    key_name: str | None
    key_bits: int | None
    aligned: bool | None  # None: no single From domain to align with
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.result == "pass"

    def evidence(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "result": self.result,
            "d": self.domain,
            "s": self.selector,
            "a": self.algorithm,
            "h": list(self.signed_headers),
            "key": self.key_name,
            "key_bits": self.key_bits,
            "aligned": self.aligned,
            "error": self.error,
        }


@dataclass(frozen=True)
class DkimReport:
    from_domain: str | None
    alignment: str  # "relaxed" or "strict"
    signatures: tuple[DkimSignatureVerdict, ...] = ()
    keys: dict[str, str | None] = field(default_factory=dict)  # key name -> record text

    @property
    def aligned_pass(self) -> bool:
        """What DMARC needs from DKIM: at least one passing signature that aligns."""
        return any(s.passed and s.aligned for s in self.signatures)

    def evidence(self) -> dict[str, Any]:
        return {
            "from_domain": self.from_domain,
            "alignment": self.alignment,
            "aligned_pass": self.aligned_pass,
            "signatures": [s.evidence() for s in self.signatures],
            "keys": dict(self.keys),
        }


def aligned(signing_domain: str, author_domain: str, *, strict: bool = False) -> bool:
    """DMARC identifier alignment of ``signing_domain`` (DKIM ``d=``, or the SPF envelope
    domain) with the From domain."""
    d, f = normalise_name(signing_domain), normalise_name(author_domain)
    if strict:
        return d == f
    return same_organisation(d, f)


class _Errors(logging.Handler):
    """dkimpy reports key problems (missing, revoked, malformed) through its logger and
    returns False; this keeps those messages as the verdict's error text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# A Python bytes literal, b'...' or b"...", as dkimpy puts raw header values in its messages.
_BYTES_LITERAL = re.compile(r"""b(['"])(?:\\.|(?!\1).)*\1""")


def readable(text: str) -> str:
    """``text`` with every bytes literal shown as the text it holds: an operator reads
    ``missing public key: sel1._domainkey.example.com.``, not ``b'sel1...'``."""

    def decoded(match: re.Match[str]) -> str:
        try:
            value = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError):
            return match.group(0)
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else match.group(0)

    return _BYTES_LITERAL.sub(decoded, text)


def _reason(exc: dkim.DKIMException) -> str:
    """Why dkimpy refused a signature, in words (it wraps some errors bare: ``b'x'``)."""
    inner = exc.args[0] if exc.args else None
    if isinstance(inner, DuplicateTag):
        return f"malformed DKIM-Signature header: tag {readable(str(inner))} appears twice"
    if isinstance(inner, InvalidTagValueList):
        return f"malformed DKIM-Signature header: {readable(str(inner))}"
    return readable(str(exc)) or type(exc).__name__


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return None if value is None else str(value)


def _key_record(answer_records: tuple[str, ...]) -> str | None:
    """RFC 6376 3.6.2.2: several records at a selector give undefined results; take the
    first one that holds a key, as verifiers commonly do."""
    for record in answer_records:
        if "p=" in record.replace(" ", ""):
            return record
    return answer_records[0] if answer_records else None


def verify_dkim(raw: bytes, resolver: Resolver, *, strict: bool = False) -> DkimReport:
    """Verify every DKIM-Signature of ``raw``. Raises ``TargetUnreachable`` when DNS
    cannot answer a key lookup; every other problem is a ``fail`` with its reason."""
    author = from_domain(raw)
    keys: dict[str, str | None] = {}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        qname = normalise_name(name.decode("ascii", "replace"))
        record = _key_record(resolver.query(qname, "TXT").records)
        keys[qname] = record
        return None if record is None else record.encode()

    count = len(parse_headers(raw).get_all("DKIM-Signature") or [])
    verdicts: list[DkimSignatureVerdict] = []
    for index in range(count):
        handler = _Errors()
        logger = logging.Logger(f"opsdrill.mail.dkim.{index}")  # private: not in the tree
        logger.addHandler(handler)
        verifier = dkim.DKIM(raw, logger=logger, minkey=1024)
        error: str | None = None
        try:
            ok = bool(verifier.verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException as exc:
            ok, error = False, _reason(exc)
        if not ok and error is None:
            error = readable("; ".join(handler.messages)) or "signature did not verify"
        fields = getattr(verifier, "signature_fields", {}) or {}
        domain = _text(fields.get(b"d"))
        selector = _text(fields.get(b"s"))
        signed = tuple(
            h.strip().lower() for h in (_text(fields.get(b"h")) or "").split(":") if h.strip()
        )
        verdicts.append(
            DkimSignatureVerdict(
                index=index,
                result="pass" if ok else "fail",
                domain=normalise_name(domain) if domain else None,
                selector=selector,
                algorithm=_text(fields.get(b"a")),
                signed_headers=signed,
                key_name=f"{selector}._domainkey.{normalise_name(domain)}"
                if domain and selector
                else None,
                key_bits=getattr(verifier, "keysize", None) if ok else None,
                aligned=aligned(domain, author, strict=strict) if domain and author else None,
                error=None if ok else error,
            )
        )
    return DkimReport(
        from_domain=author,
        alignment="strict" if strict else "relaxed",
        signatures=tuple(verdicts),
        keys=keys,
    )
