"""Probe messages: building one with a unique token, and reading received ones.

The token goes into a dedicated header (``X-Opsdrill-Probe``) because that is what IMAP
can search exactly (``SEARCH HEADER``), and into the subject so a human looking at the
mailbox, or a filter log, can tell our messages apart. It is not a secret.

Reading is deliberately lenient: a received message is evidence, and a malformed part
must not hide the rest of it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import format_datetime, getaddresses, make_msgid, parseaddr
from html.parser import HTMLParser

from opsdrill.errors import ConfigError

PROBE_HEADER = "X-Opsdrill-Probe"
SUBJECT_PREFIX = "opsdrill probe"
# Headers a check shows as evidence of how the message travelled and was judged.
HEADERS_OF_INTEREST: tuple[str, ...] = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Return-Path",
    "Delivered-To",
    PROBE_HEADER,
    "Received",
    "DKIM-Signature",
    "Authentication-Results",
    "X-Spam-Flag",
    "X-Spam-Status",
    "X-Spam-Score",
)
# The per-run token of a triggered probe: the trigger carries it (a ``{token}`` placeholder
# in its URL or JSON body) and the application's message shows it (the invitee's name, a
# reference, a plus-address). Lower case and digits only: it survives an address's local
# part, a case-folding server and a quoted-printable body unchanged.
RUN_TOKEN_PREFIX = "opsdrill-"
RUN_TOKEN = re.compile(r"opsdrill-\d{14}-[0-9a-f]{12}", re.I)
PLACEHOLDER = "{token}"
_URL = re.compile(r"""https?://[^\s<>"'`]+""", re.I)
_TRAILING = ".,;:!?)]}>'\""


def new_token(now: datetime | None = None) -> str:
    """Unique per probe; starts with the UTC time so a stale one is recognisable."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"


def new_run_token(now: datetime | None = None) -> str:
    """A triggered probe's per-run token; starts with the UTC time (a stale one is
    recognisable, and the sweep of orphaned invitations finds it by its shape)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{RUN_TOKEN_PREFIX}{moment:%Y%m%d%H%M%S}-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class ProbeMessage:
    token: str
    message_id: str
    sender: str
    recipient: str
    subject: str
    date: str
    raw: bytes = field(repr=False)

    def evidence(self) -> dict[str, str]:
        return {
            "token": self.token,
            "message_id": self.message_id,
            "from": self.sender,
            "to": self.recipient,
            "subject": self.subject,
            "date": self.date,
        }


def bare_address(address: str) -> str:
    """``local@domain`` from ``"Name <local@domain>"`` or a bare address."""
    addr = parseaddr(address)[1]
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise ConfigError(f"mail address {address!r}: expected local@domain")
    return addr


def domain_of(address: str) -> str:
    return bare_address(address).rpartition("@")[2].rstrip(".").lower()


def build_probe_message(
    sender: str,
    recipient: str,
    token: str,
    *,
    now: datetime | None = None,
    body: str | None = None,
) -> ProbeMessage:
    """A small text message, CRLF line ends (what goes over SMTP, and what DKIM signs)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    msg = EmailMessage(policy=policy.SMTP)
    subject = f"{SUBJECT_PREFIX} {token}"
    message_id = make_msgid(idstring=token, domain=domain_of(sender))
    date = format_datetime(moment)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = date
    msg["Message-ID"] = message_id
    msg[PROBE_HEADER] = token
    msg.set_content(
        body
        or (
            "This is an automated delivery probe sent by opsdrill.\n"
            f"Token: {token}\nSent: {moment.isoformat()}\n"
            "It is deleted automatically once it has been found.\n"
        )
    )
    return ProbeMessage(token, message_id, sender, recipient, subject, date, msg.as_bytes())


def parse_headers(raw: bytes) -> Message:
    """Headers only, values as written (folding kept): compat32 does not reinterpret."""
    return BytesHeaderParser(policy=policy.compat32).parsebytes(raw)


def header_values(raw: bytes, names: Iterable[str] = HEADERS_OF_INTEREST) -> dict[str, list[str]]:
    """Each named header's values in message order (top first), unfolded."""
    headers = parse_headers(raw)
    found: dict[str, list[str]] = {}
    for name in names:
        values = [" ".join(str(v).split()) for v in headers.get_all(name) or []]
        if values:
            found[name] = values
    return found


def from_domain(raw: bytes) -> str | None:
    """The RFC5322.From domain, when there is exactly one From address (DMARC's rule:
    with none or several there is no single domain to align with)."""
    values = parse_headers(raw).get_all("From") or []
    addresses = [addr for _, addr in getaddresses([str(v) for v in values]) if addr]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].rstrip(".").lower() or None


class _Html(HTMLParser):
    """Link attributes and visible text of an HTML part, entities decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value.strip())

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _text_parts(raw: bytes) -> list[tuple[str, str]]:
    """(subtype, decoded text) of every inline text/plain and text/html part: transfer
    encodings (quoted-printable, base64) and charsets undone by the email package."""
    msg = message_from_bytes(raw, policy=policy.default)
    parts: list[tuple[str, str]] = []
    for part in msg.walk():
        if part.get_content_maintype() != "text" or part.is_attachment():
            continue
        subtype = part.get_content_subtype()
        if subtype not in ("plain", "html"):
            continue
        try:
            text = part.get_content()
        except (LookupError, ValueError):  # an unknown charset: decode what we can
            payload = part.get_payload(decode=True)
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        parts.append((subtype, str(text)))
    return parts


def _clean(url: str) -> str:
    """Drop what ends a sentence around a URL in plain text ("see https://x/a.")."""
    return url.rstrip(_TRAILING)


def message_text(raw: bytes) -> str:
    """Every header (unfolded, RFC 2047 words decoded) and every text part (transfer
    encodings and charsets undone): what a reader sees, to look for a run's token in."""
    msg = message_from_bytes(raw, policy=policy.default)
    lines: list[str] = []
    for name, value in msg.items():
        try:
            text = str(value)
        except (LookupError, ValueError):  # a header the email package cannot decode
            text = str(msg.get_all(name, [""])[0])
        lines.append(f"{name}: {' '.join(text.split())}")
    lines.extend(text for _, text in _text_parts(raw))
    return "\n".join(lines)


def shows_token(raw: bytes, token: str) -> bool:
    """Whether the message shows ``token`` (case-insensitive) in a header or a text part."""
    return token.lower() in message_text(raw).lower()


def extract_links(raw: bytes, pattern: str | re.Pattern[str] | None = None) -> list[str]:
    """Links in the message's text and HTML parts whose URL matches ``pattern``
    (``re.search``; all http(s) links when None), in order of appearance, once each.

    HTML links come from ``href``/``src`` attributes with entities decoded (``&amp;``),
    so the URL is the one a browser would open, then from the visible text.
    """
    try:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    except re.error as exc:
        raise ConfigError(
            f"link pattern {pattern!r}: not a valid regular expression: {exc}"
        ) from None
    found: list[str] = []
    for subtype, text in _text_parts(raw):
        candidates: list[str] = []
        if subtype == "html":
            parser = _Html()
            parser.feed(text)
            parser.close()
            candidates.extend(u for u in parser.links if _URL.fullmatch(u))
            text = " ".join(parser.text)
        candidates.extend(_clean(m.group(0)) for m in _URL.finditer(text))
        for url in candidates:
            if (regex is None or regex.search(url)) and url not in found:
                found.append(url)
    return found


def summary(raw: bytes, names: Sequence[str] = HEADERS_OF_INTEREST) -> dict[str, object]:
    """Size and headers of interest, for evidence next to the attached .eml."""
    return {"size": len(raw), "headers": header_values(raw, names)}
