"""Authentication-Results (RFC 8601): parsed, and trusted only from the receiving side.

Anyone can write an ``Authentication-Results`` header into a message they send, claiming
``dkim=pass``. RFC 8601 section 5 says a receiver must only believe headers whose
authserv-id is one of its own; so every header is parsed, those from a trusted
authserv-id count, and the others are kept as evidence of what was *ignored* and why.
(The trusted border MTA must also strip incoming headers carrying its own authserv-id,
as RFC 8601 5 requires; no client-side parser can tell such a forgery apart.)

How trust is established, per receiving provider (the headers' real shapes are in the
unit tests):

- **Google** (Gmail, Workspace) writes ``mx.google.com; dkim=pass ...``: a fixed
  authserv-id, trusted by name (``trusted_authserv_ids = ["mx.google.com"]``), at any
  position.
- **Yahoo** (and AOL) name the receiving host: ``atlas212.free.mail.ne1.yahoo.com;
  ...``, a different one per message. A wildcard ``*.yahoo.com`` matches them, and
  because anyone can write such an id, a header trusted only through a wildcard counts
  only when it is the *topmost* Authentication-Results header: headers are prepended, so
  the receiving side's own is above everything the sender side wrote.
- **Microsoft 365** (Exchange Online Protection) writes *no* authserv-id at all:
  ``Authentication-Results: spf=pass (sender IP is 203.0.113.5) smtp.mailfrom=...``.
  Nothing names the writer, so only position can: with ``trust_topmost_without_id``, the
  topmost header counts when it has no authserv-id (EOP adds one to every message it
  accepts, above the sender side's headers); any other header without an id is ignored.

The grammar (RFC 8601 2.2) has ``authserv-id`` first, a ``value`` (a token or a
quoted-string, neither of which can hold ``=``), so a header that starts with
``method=`` has no authserv-id: that is how Microsoft's is recognised, instead of taking
``spf=pass`` for an id that then never matches.

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
    authserv_id: str  # "" when the header has none (Microsoft 365)
    results: tuple[AuthResult, ...]
    raw: str
    trusted: bool = False
    version: str | None = None
    errors: tuple[str, ...] = ()
    why: str = ""  # why it is trusted, or why it is ignored

    def evidence(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "authserv_id": self.authserv_id or None,
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


_RESINFO_START = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\s*(?:/\s*[0-9]+\s*)?=")


def parse_header(value: str, index: int = 0) -> AuthResultsHeader:
    """Parse one header's value (folded or not). Never raises: problems go to
    ``errors``. A header that starts with ``method=result`` has no authserv-id (Microsoft
    365): its ``authserv_id`` is empty and its first result is read as one."""
    raw = " ".join(value.split())
    scan = _Scanner(raw)
    errors: list[str] = []
    scan.skip_cfws()
    results: list[AuthResult] = []
    version = None
    saw_result_section = False
    if _RESINFO_START.match(raw, scan.pos):  # no authserv-id: a result comes first
        authserv_id = ""
        scan.take_comments()
        saw_result_section = True
        result, error = _resinfo(scan)
        if result is not None:
            results.append(result)
        if error:
            errors.append(error)
    else:
        authserv_id = scan.value() if scan.peek() != ";" else ""
        if not authserv_id:
            errors.append("no authserv-id")
        scan.skip_cfws()
        m = re.match(r"\d+(?=[\s;(]|$)", raw[scan.pos :])
        if m:
            version = m.group(0)
            scan.pos += m.end()
        scan.take_comments()
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
    topmost_without_id: bool = False

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
            "trust_topmost_without_id": self.topmost_without_id,
            "by_method": self.by_method(),
            "trusted": [{**h.evidence(), "why_trusted": h.why} for h in self.trusted],
            "ignored": [{**h.evidence(), "why_ignored": h.why} for h in self.ignored],
        }


def _matches(authserv_id: str, entry: str) -> bool:
    """An exact id, or ``*.example.com`` matching any host under example.com."""
    if entry.startswith("*."):
        return authserv_id.endswith(entry[1:]) and len(authserv_id) > len(entry) - 1
    return authserv_id == entry


def _judge(
    header: AuthResultsHeader, trusted_ids: Sequence[str], topmost_without_id: bool
) -> tuple[bool, str]:
    """(trusted?, why): by name for an exact id; by name and position (the topmost
    header) for a wildcard or a header without an id (see the module docstring)."""
    ident = header.authserv_id.lower()
    listed = ", ".join(trusted_ids) or "none configured"
    top = header.index == 0
    if not ident:
        if topmost_without_id and top:
            return True, "the topmost header, without an authserv-id (trust_topmost_without_id)"
        if topmost_without_id:
            return False, (
                "no authserv-id, and not the topmost header: trust_topmost_without_id trusts "
                "only the topmost one, which the receiving side writes last"
            )
        return False, (
            "no authserv-id, so nothing names its writer (Microsoft 365 writes none: set "
            "trust_topmost_without_id = true to trust the topmost such header)"
        )
    exact = [e for e in trusted_ids if not e.startswith("*.") and _matches(ident, e)]
    if exact:
        return True, f"authserv-id {header.authserv_id!r} is trusted"
    wild = [e for e in trusted_ids if e.startswith("*.") and _matches(ident, e)]
    if wild and top:
        return True, f"authserv-id {header.authserv_id!r} matches {wild[0]}, topmost header"
    if wild:
        return False, (
            f"authserv-id {header.authserv_id!r} matches {wild[0]} but is not the topmost "
            "header: a wildcard is trusted only on top, where the receiving side writes"
        )
    return False, f"authserv-id {header.authserv_id!r} is not trusted (trusted: {listed})"


def parse_values(
    values: Iterable[str], trusted_ids: Sequence[str], *, topmost_without_id: bool = False
) -> AuthResultsReport:
    """Parse the headers (``values`` top first) and split them by trust."""
    ids = tuple(t.strip().lower() for t in trusted_ids if t.strip())
    trusted: list[AuthResultsHeader] = []
    ignored: list[AuthResultsHeader] = []
    for index, value in enumerate(values):
        header = parse_header(value, index)
        ok, why = _judge(header, ids, topmost_without_id)
        if ok:
            trusted.append(replace(header, trusted=True, why=why))
        else:
            ignored.append(replace(header, why=why))
    return AuthResultsReport(tuple(trusted_ids), tuple(trusted), tuple(ignored), topmost_without_id)


def authentication_results(
    raw: bytes, trusted_ids: Sequence[str], *, topmost_without_id: bool = False
) -> AuthResultsReport:
    """Parse every ``Authentication-Results`` header of the raw message (top first)."""
    values = [str(v) for v in parse_headers(raw).get_all(HEADER) or []]
    return parse_values(values, trusted_ids, topmost_without_id=topmost_without_id)
