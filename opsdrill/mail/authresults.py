"""Authentication-Results (RFC 8601): parsed, and trusted only from our own servers.

Anyone can write an ``Authentication-Results`` header into a message they send, claiming
``dkim=pass``. RFC 8601 section 5 says a receiver must only believe headers whose
authserv-id is one of its own; so every header is parsed, those from a trusted
authserv-id count, and the others are kept as evidence of what was *ignored* and why.
(The trusted border MTA must also strip incoming headers carrying its own authserv-id,
as RFC 8601 5 requires; no client-side parser can tell such a forgery apart.)

Hand-written rather than the ``authres`` package: its last release is from 2019 (RFC
7601), it rejects a whole header over a trailing ``;`` (which real servers emit),
cannot parse a header without results, and drops the comments (``(2048-bit key)``,
``(p=reject dis=none)``) that are useful evidence. This parser follows the RFC 8601
ABNF but is lenient where the real world is: a trailing ``;``, Microsoft's
ptype-less ``action=none``, a value with ``=`` in it; what it cannot parse it records
in ``errors`` and resynchronises at the next ``;`` instead of losing the header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from opsdrill.mail.message import parse_headers

HEADER = "Authentication-Results"
_KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?")
_VALUE_END = " \t\r\n;()"


@dataclass(frozen=True)
class AuthResult:
    """One ``method=result`` with its reason, properties (``header.d`` -> value, keys
    lower-case) and comments, as evidence."""

    method: str
    result: str
    version: str | None = None
    reason: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    comments: tuple[str, ...] = ()

    def prop(self, name: str) -> str | None:
        return self.properties.get(name.lower())

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "result": self.result}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.properties:
            out["properties"] = dict(self.properties)
        if self.comments:
            out["comments"] = list(self.comments)
        return out


@dataclass(frozen=True)
class AuthResultsHeader:
    """One header: who wrote it (authserv-id), its results, whether we trust it."""

    index: int  # 0 = topmost (the last one added)
    authserv_id: str
    results: tuple[AuthResult, ...]
    raw: str
    trusted: bool = False
    version: str | None = None
    errors: tuple[str, ...] = ()

    def evidence(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "authserv_id": self.authserv_id,
            "trusted": self.trusted,
            "results": [r.evidence() for r in self.results],
            "errors": list(self.errors),
            "raw": self.raw,
        }


class _Scanner:
    """A cursor over one unfolded header value, with CFWS skipping (comments kept)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.comments: list[str] = []

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_cfws(self) -> None:
        while not self.at_end():
            ch = self.peek()
            if ch in " \t\r\n":
                self.pos += 1
            elif ch == "(":
                self.comments.append(self._comment())
            else:
                return

    def _comment(self) -> str:
        depth, start = 0, self.pos
        while not self.at_end():
            ch = self.text[self.pos]
            if ch == "\\":
                self.pos += 2
                continue
            self.pos += 1
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    return " ".join(self.text[start + 1 : self.pos - 1].split())
        return " ".join(self.text[start + 1 :].split())  # unterminated: take the rest

    def take_comments(self) -> list[str]:
        taken, self.comments = self.comments, []
        return taken

    def accept(self, ch: str) -> bool:
        if self.peek() == ch:
            self.pos += 1
            return True
        return False

    def keyword(self) -> str | None:
        m = _KEYWORD.match(self.text, self.pos)
        if not m:
            return None
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        """A quoted-string (unquoted) or everything up to whitespace, ``;`` or a comment."""
        if self.peek() == '"':
            out: list[str] = []
            self.pos += 1
            while not self.at_end():
                ch = self.text[self.pos]
                self.pos += 1
                if ch == "\\" and not self.at_end():
                    out.append(self.text[self.pos])
                    self.pos += 1
                elif ch == '"':
                    break
                else:
                    out.append(ch)
            # a quoted local-part: "a b"@example.com
            rest = self.value() if self.peek() == "@" else ""
            return "".join(out) + rest
        start = self.pos
        while not self.at_end() and self.text[self.pos] not in _VALUE_END:
            self.pos += 1
        return self.text[start : self.pos]

    def skip_to_semicolon(self) -> str:
        start = self.pos
        while not self.at_end() and self.peek() != ";":
            if self.peek() == "(":
                self._comment()
            elif self.peek() == '"':
                self.value()
            else:
                self.pos += 1
        return self.text[start : self.pos].strip()


def _resinfo(scan: _Scanner) -> tuple[AuthResult | None, str | None]:
    """One ``method[/version]=result [reason=...] [ptype.prop=value ...]`` after a ``;``."""
    scan.skip_cfws()
    method = scan.keyword()
    if method is None:
        return None, f"expected a method at {scan.skip_to_semicolon()[:60]!r}"
    version = None
    scan.skip_cfws()
    if scan.accept("/"):
        scan.skip_cfws()
        version = scan.keyword()
        scan.skip_cfws()
    if not scan.accept("="):
        if method.lower() == "none":  # no-result: "; none"
            return None, None
        return None, f"{method}: expected '=' at {scan.skip_to_semicolon()[:60]!r}"
    scan.skip_cfws()
    result = scan.keyword()
    if result is None:
        return None, f"{method}: expected a result at {scan.skip_to_semicolon()[:60]!r}"
    reason: str | None = None
    props: dict[str, str] = {}
    while True:
        scan.skip_cfws()
        if scan.at_end() or scan.peek() == ";":
            break
        start = scan.pos
        name = scan.keyword()
        scan.skip_cfws()
        if name is not None and scan.accept("."):
            scan.skip_cfws()
            prop = scan.keyword()
            scan.skip_cfws()
            if prop is not None and scan.accept("="):
                scan.skip_cfws()
                props[f"{name}.{prop}".lower()] = scan.value()
                continue
        elif name is not None and scan.accept("="):
            scan.skip_cfws()
            if name.lower() == "reason":
                reason = scan.value()
            else:  # not RFC 8601 (Microsoft's action=none): kept, without a ptype
                props[name.lower()] = scan.value()
            continue
        scan.pos = start
        junk = scan.skip_to_semicolon()
        return _make(method, result, version, reason, props, scan), (
            f"{method}: could not parse {junk[:60]!r}"
        )
    return _make(method, result, version, reason, props, scan), None


def _make(
    method: str,
    result: str,
    version: str | None,
    reason: str | None,
    props: dict[str, str],
    scan: _Scanner,
) -> AuthResult:
    return AuthResult(
        method=method.lower(),
        result=result.lower(),
        version=version,
        reason=reason,
        properties=props,
        comments=tuple(scan.take_comments()),
    )


def parse_header(value: str, index: int = 0) -> AuthResultsHeader:
    """Parse one header's value (folded or not). Never raises: problems go to
    ``errors``; a header whose authserv-id cannot be read gets an empty one."""
    raw = " ".join(value.split())
    scan = _Scanner(raw)
    errors: list[str] = []
    scan.skip_cfws()
    authserv_id = scan.value() if scan.peek() != ";" else ""
    if not authserv_id:
        errors.append("no authserv-id")
    scan.skip_cfws()
    version = None
    m = re.match(r"\d+(?=[\s;(]|$)", raw[scan.pos :])
    if m:
        version = m.group(0)
        scan.pos += m.end()
    scan.take_comments()
    results: list[AuthResult] = []
    saw_result_section = False
    while True:
        scan.skip_cfws()
        if scan.at_end():
            break
        if not scan.accept(";"):
            errors.append(f"expected ';' at {scan.skip_to_semicolon()[:60]!r}")
            continue
        scan.skip_cfws()
        if scan.at_end():  # a trailing ';'
            break
        saw_result_section = True
        result, error = _resinfo(scan)
        if result is not None:
            results.append(result)
        if error:
            errors.append(error)
    if not saw_result_section:
        errors.append("no results (not even 'none')")
    return AuthResultsHeader(
        index=index,
        authserv_id=authserv_id,
        results=tuple(results),
        raw=raw,
        version=version,
        errors=tuple(errors),
    )


@dataclass(frozen=True)
class AuthResultsReport:
    """Every Authentication-Results header of a message, split by trust."""

    trusted_ids: tuple[str, ...]
    trusted: tuple[AuthResultsHeader, ...]
    ignored: tuple[AuthResultsHeader, ...]

    def results(self, method: str) -> list[AuthResult]:
        """The trusted results for ``method`` (several: one per DKIM signature, or one per
        trusted header), topmost header first."""
        want = method.lower()
        return [r for h in self.trusted for r in h.results if r.method == want]

    def by_method(self) -> dict[str, list[str]]:
        """``method -> [result, ...]`` from the trusted headers, e.g. ``{"spf": ["pass"]}``."""
        out: dict[str, list[str]] = {}
        for header in self.trusted:
            for r in header.results:
                out.setdefault(r.method, []).append(r.result)
        return out

    def reported(self, methods: Sequence[str] = ("spf", "dkim", "dmarc")) -> list[AuthResult]:
        """Trusted results of ``methods``: what there is to judge (empty: nothing is)."""
        return [r for m in methods for r in self.results(m)]

    def not_passing(self, methods: Sequence[str] = ("spf", "dkim", "dmarc")) -> list[AuthResult]:
        """Trusted results of ``methods`` that are present and not ``pass``."""
        return [r for m in methods for r in self.results(m) if r.result != "pass"]

    def evidence(self) -> dict[str, Any]:
        return {
            "trusted_authserv_ids": list(self.trusted_ids),
            "by_method": self.by_method(),
            "trusted": [h.evidence() for h in self.trusted],
            "ignored": [
                {
                    **h.evidence(),
                    "why_ignored": f"authserv-id {h.authserv_id!r} is not trusted "
                    f"(trusted: {', '.join(self.trusted_ids) or 'none configured'})",
                }
                for h in self.ignored
            ],
        }


def parse_values(values: Iterable[str], trusted_ids: Sequence[str]) -> AuthResultsReport:
    trusted_set = {t.strip().lower() for t in trusted_ids}
    trusted: list[AuthResultsHeader] = []
    ignored: list[AuthResultsHeader] = []
    for index, value in enumerate(values):
        header = parse_header(value, index)
        if header.authserv_id.lower() in trusted_set and header.authserv_id:
            trusted.append(replace(header, trusted=True))
        else:
            ignored.append(header)
    return AuthResultsReport(tuple(trusted_ids), tuple(trusted), tuple(ignored))


def authentication_results(raw: bytes, trusted_ids: Sequence[str]) -> AuthResultsReport:
    """Parse every ``Authentication-Results`` header of the raw message (top first)."""
    values = [str(v) for v in parse_headers(raw).get_all(HEADER) or []]
    return parse_values(values, trusted_ids)
