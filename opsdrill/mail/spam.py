"""SpamAssassin scoring through spamd (the SPAMC/1.5 protocol, REPORT command).

Hand-written: the protocol is one request and one response over a socket. Of the client
libraries, ``aiospamc`` is asyncio-only (an event loop per call in this synchronous
library) and ``spamc``/``spamassassin-client`` are unmaintained; none parses the
report's rule table, which is the part we need. Talking to spamd directly (instead of
running ``spamc``) needs no binary on the machine that runs the checks.

The only SPAMC client of the repository: the local stack's spamd uses it too (``PING`` for
its readiness, ``REPORT`` for the tests).

Request:  ``REPORT SPAMC/1.5`` / ``Content-length: N`` / blank line / the message.
Response: ``SPAMD/1.1 0 EX_OK`` / ``Spam: True ; 15.3 / 5.0`` / blank line / the report,
whose "Content analysis details" table lists each rule that fired:

     pts rule name              description
    ---- ---------------------- --------------------------------------------------
     1.2 MISSING_HEADERS        Missing To: header
     0.1 DKIM_SIGNED            Message has a DKIM or DK signature, not necessarily
                                valid
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from opsdrill.errors import TargetUnreachable
from opsdrill.mail._net import excerpt, unreachable
from opsdrill.mail.errors import ProbeFailed

STAGE = "spam"
MAX_RESPONSE = 4 * 1024 * 1024
_STATUS = re.compile(r"^SPAMD/(\d+\.\d+)\s+(\d+)\s*(.*)$")
_SPAM = re.compile(
    r"^\s*(True|False|Yes|No)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.I
)
_RULE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Za-z0-9_]+)\s+(.*?)\s*$")
_CONTINUATION = re.compile(r"^\s{6,}\S")
_DETAILS = re.compile(r"^\s*pts\s+rule\s+name\s+description", re.I)


@dataclass(frozen=True)
class SpamRule:
    name: str
    score: float
    description: str

    def evidence(self) -> dict[str, Any]:
        return {"rule": self.name, "score": self.score, "description": self.description}


@dataclass(frozen=True)
class SpamVerdict:
    score: float
    threshold: float
    is_spam: bool
    rules: tuple[SpamRule, ...]
    report: str
    elapsed_seconds: float = 0.0

    def evidence(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "threshold": self.threshold,
            "is_spam": self.is_spam,
            "rules": [r.evidence() for r in self.rules],
            "elapsed_seconds": round(self.elapsed_seconds, 3),
        }


def parse_rules(report: str) -> list[SpamRule]:
    """The rule table of a REPORT body, continuation lines joined to the description."""
    rules: list[SpamRule] = []
    in_table = False
    for line in report.splitlines():
        if not in_table:
            in_table = bool(_DETAILS.match(line))
            continue
        if not line.strip() or set(line.strip()) <= {"-", " "}:
            continue
        m = _RULE.match(line)
        if m:
            rules.append(SpamRule(m.group(2), float(m.group(1)), m.group(3)))
        elif rules and _CONTINUATION.match(line):
            last = rules[-1]
            rules[-1] = SpamRule(last.name, last.score, f"{last.description} {line.strip()}")
    return rules


def parse_response(data: bytes, where: str = "spamd") -> SpamVerdict:
    """Parse a complete spamd response to REPORT (headers, blank line, report)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    lines = head.decode("utf-8", "replace").splitlines()
    status = _STATUS.match(lines[0].strip()) if lines else None
    if status is None:
        raise ProbeFailed(STAGE, f"{where}: not a SPAMD response: {excerpt(data[:200])}")
    if status.group(2) != "0":
        raise ProbeFailed(STAGE, f"{where} answered {status.group(2)} {status.group(3)}".rstrip())
    spam = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "spam":
            spam = _SPAM.match(value)
    if spam is None:
        raise ProbeFailed(STAGE, f"{where}: response without a valid Spam: header")
    report = body.decode("utf-8", "replace")
    return SpamVerdict(
        score=float(spam.group(2)),
        threshold=float(spam.group(3)),
        is_spam=spam.group(1).lower() in ("true", "yes"),
        rules=tuple(parse_rules(report)),
        report=report,
    )


def score_with_spamd(
    raw: bytes,
    host: str = "127.0.0.1",
    port: int = 783,
    timeout: float = 30.0,
    *,
    user: str | None = None,
) -> SpamVerdict:
    """Score ``raw`` with spamd. ``timeout`` bounds connecting and each read; the whole
    exchange is bounded by twice that. Raises ``TargetUnreachable`` when spamd cannot be
    reached or stops answering, ``ProbeFailed`` when it answers with an error."""
    where = f"spamd {host}:{port}"
    request = [b"REPORT SPAMC/1.5", f"Content-length: {len(raw)}".encode()]
    if user:
        request.append(f"User: {user}".encode())
    payload = b"\r\n".join(request) + b"\r\n\r\n" + raw
    started = time.monotonic()
    deadline = started + 2 * timeout
    doing = "connecting"
    chunks: list[bytes] = []
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            doing = "sending the message"
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            doing = "reading the report"
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_RESPONSE:
                    raise ProbeFailed(STAGE, f"{where}: response larger than {MAX_RESPONSE} bytes")
    except OSError as exc:
        raise unreachable("spamd", host, port, doing, exc, timeout) from None
    data = b"".join(chunks)
    if not data:
        raise TargetUnreachable(f"{where}: closed the connection without answering")
    verdict = parse_response(data, where)
    return SpamVerdict(
        score=verdict.score,
        threshold=verdict.threshold,
        is_spam=verdict.is_spam,
        rules=verdict.rules,
        report=verdict.report,
        elapsed_seconds=time.monotonic() - started,
    )


def spamd_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether spamd answers ``PING`` (``SPAMD/1.5 0 PONG``): it is up and has compiled its
    rules. Never raises: a closed port or a silent server is False."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith(b"SPAMD/")
