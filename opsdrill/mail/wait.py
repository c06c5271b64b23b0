"""Waiting for a message to become visible over IMAP: IDLE where offered, else polling.

One search interface, two matchers:

- ``TokenMatch``: the direct probe's token, found exactly by the server
  (``SEARCH HEADER X-Opsdrill-Probe <token>``).
- ``AppMessageMatch``: a message the application sent on its own, recognised by the
  run's token (which the trigger carried and the message shows: the invitee's name, a
  reference, a plus-address), recipient (To or Delivered-To), a subject regex and a time
  window (received no earlier than ``window_seconds`` before the trigger: the slack
  covers the clocks of this host and the IMAP server). The server narrows by token,
  recipient and date; we check the token, subject and delivery time (INTERNALDATE)
  locally on the decoded message. Recipient, subject and
  time alone are not enough: two runs at once, or a run whose application sent nothing
  while another run's invitation arrived, would claim a message another run owns. An
  optional UIDNEXT snapshot taken before the trigger (``imap.snapshot_uidnext``) also
  excludes older messages without trusting clocks.

The loop: every ``interval`` a round searches each folder, INBOX last so that it stays
selected. In between, INBOX is re-checked every ``recheck`` seconds (0.25 by default): the
wait is spent in IDLE (or asleep when IDLE is off or not offered), then a ``NOOP``, the
poll RFC 3501 recommends, makes the server sync and report a new message count
(``EXISTS``), and only then is INBOX searched. IDLE alone is not enough: Dovecot pushes
``EXISTS`` 500 ms after the delivery (``NOTIFY_DELAY_MSECS``, compiled in) and not at
``DONE``, so a message in INBOX is seen within ``recheck`` whatever the server, and at
once by one that pushes at once. A re-check costs one command (three with IDLE: IDLE,
DONE, NOOP). IDLE covers one folder per connection, so junk folders are searched once
per round: a message filed into Junk is found within one ``interval``. Every round
selects each folder afresh, so even a change the NOOPs missed costs at most one
interval, never the message. The search order reported is the configured one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.utils import getaddresses
from typing import Any, Literal

from imap_tools import BaseMailBox
from imap_tools.errors import MailboxFolderSelectError

from opsdrill.errors import ConfigError
from opsdrill.mail.errors import MessageNotFound
from opsdrill.mail.imap import (
    MONTHS,
    STAGE,
    Fetched,
    ImapMailbox,
    capabilities,
    fetch_raw,
    select,
    session,
    sweep_stale,
    uid_fetch,
    uid_search,
)
from opsdrill.mail.message import (
    PLACEHOLDER,
    PROBE_HEADER,
    RUN_TOKEN,
    RUN_TOKEN_PREFIX,
    message_text,
    shows_token,
)

Method = Literal["idle", "poll"]
# How often INBOX is re-checked between rounds: a message there is seen at most this late.
RECHECK_SECONDS = 0.25
_ASCII_VALUE = re.compile(r"^[\x20-\x7e]*$")


def _quoted(value: str) -> str:
    if not _ASCII_VALUE.match(value):
        raise ConfigError(f"IMAP search value {value!r}: only printable ASCII is supported")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class TokenMatch:
    token: str
    header: str = PROBE_HEADER

    def criteria(self, folder: str) -> str:
        return f"HEADER {self.header} {_quoted(self.token)}"

    def accepts(
        self, candidates: list[int], box: BaseMailBox, folder: str, uidvalidity: int | None
    ) -> list[int]:
        return candidates  # the server matched the header exactly

    def describe(self) -> str:
        return f"token {self.token}"


@dataclass(frozen=True)
class AppMessageMatch:
    recipient: str
    subject_pattern: str
    since: datetime
    # The run's token: a message that does not show it belongs to someone else.
    token: str
    # How long before ``since`` a message may have been received (INTERNALDATE, the IMAP
    # server's clock) and still count: an older one never does (expect.window_seconds).
    window_seconds: float = 120.0
    # folder -> (UIDVALIDITY, UIDNEXT) before the trigger: only newer UIDs count.
    uid_floor: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # Only the newest candidates are examined, so a busy mailbox cannot slow a round.
    max_candidates: int = 50

    def __post_init__(self) -> None:
        if self.since.tzinfo is None:
            raise ConfigError("AppMessageMatch.since must be timezone-aware")
        if not self.window_seconds > 0:
            raise ConfigError(
                f"AppMessageMatch.window_seconds must be positive, got {self.window_seconds:g}"
            )
        if len(self.token.strip()) < 8:
            raise ConfigError(
                "AppMessageMatch.token: a per-run token of at least 8 characters is required "
                "(without it another run's message could be claimed)"
            )
        try:
            re.compile(self.subject_pattern)
        except re.error as exc:
            raise ConfigError(
                f"subject pattern {self.subject_pattern!r}: not a valid regular expression: {exc}"
            ) from None

    @property
    def earliest(self) -> datetime:
        """The oldest delivery time that counts."""
        return self.since - timedelta(seconds=self.window_seconds)

    def criteria(self, folder: str) -> str:
        day = (self.earliest.astimezone(UTC) - timedelta(days=1)).date()  # SINCE: date only
        since = f"{day.day}-{MONTHS[day.month - 1]}-{day.year}"
        rcpt = _quoted(self.recipient)
        return f"SINCE {since} TEXT {_quoted(self.token)} OR TO {rcpt} HEADER Delivered-To {rcpt}"

    def accepts(
        self, candidates: list[int], box: BaseMailBox, folder: str, uidvalidity: int | None
    ) -> list[int]:
        floor = self.uid_floor.get(folder)
        if floor is not None and uidvalidity in (None, floor[0]):
            candidates = [u for u in candidates if u >= floor[1]]
        candidates = candidates[-self.max_candidates :]
        # The whole message: the token may be in a header or in a (decoded) text part.
        items = "(UID INTERNALDATE BODY.PEEK[])"
        return [r.uid for r in uid_fetch(box, candidates, items) if self._fits(r, self.earliest)]

    def _fits(self, record: Fetched, earliest: datetime) -> bool:
        if record.internaldate is None or record.internaldate < earliest:
            return False
        raw = record.literal or b""
        headers = message_from_bytes(raw, policy=policy.default)
        subject = str(headers.get("Subject", ""))
        return re.search(self.subject_pattern, subject) is not None and shows_token(raw, self.token)

    def describe(self) -> str:
        return (
            f"a message to {self.recipient} showing this run's token {self.token} with "
            f"subject matching {self.subject_pattern!r} delivered since "
            f"{self.earliest.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({self.window_seconds:g} s "
            "before the trigger)"
        )


def recipient_regex(template: str) -> re.Pattern[str]:
    """``probe+{token}@example.com`` (or a plain address) as a case-insensitive regex
    matching that address for any run's token."""
    parts = [re.escape(p) for p in template.split(PLACEHOLDER)]
    return re.compile("^" + RUN_TOKEN.pattern.join(parts) + "$", re.I)


def sweep_orphaned_invitations(
    mailbox: ImapMailbox,
    folders: Sequence[str],
    older_than_minutes: float,
    *,
    recipient: str,
    subject_pattern: str,
    now: datetime | None = None,
) -> int:
    """Delete application messages that earlier triggered runs caused and never cleaned
    up (a crash, a message that arrived after its run gave up): older than
    ``older_than_minutes``, showing a run token's shape (``opsdrill-<UTC time>-<hex>``),
    addressed to ``recipient`` (a ``{token}`` in it matches any token) and with a subject
    matching ``subject_pattern``. Real mail shows no such token, so it is never touched.
    Returns how many were deleted."""
    address = recipient_regex(recipient)
    subject = re.compile(subject_pattern)

    def ours(record: Fetched) -> bool:
        raw = record.literal or b""
        msg = message_from_bytes(raw, policy=policy.default)
        rcpts = [a for _, a in getaddresses([str(v) for k in _RCPT for v in msg.get_all(k, [])])]
        return (
            subject.search(str(msg.get("Subject", ""))) is not None
            and any(address.match(a) for a in rcpts)
            and RUN_TOKEN.search(message_text(raw)) is not None
        )

    criteria = f"TEXT {_quoted(RUN_TOKEN_PREFIX)}"
    items = "(UID INTERNALDATE BODY.PEEK[])"
    return sweep_stale(mailbox, folders, older_than_minutes, criteria, ours, items=items, now=now)


_RCPT = ("To", "Cc", "Delivered-To", "X-Original-To")


Matcher = TokenMatch | AppMessageMatch


@dataclass(frozen=True)
class FoundMessage:
    """Where and when the message became visible, and its raw bytes (BODY.PEEK[])."""

    folder: str
    uid: int
    uidvalidity: int | None
    raw: bytes = field(repr=False)
    internaldate: datetime | None
    visible_utc: datetime
    visible_monotonic: float
    method: Method
    searched_folders: tuple[str, ...]
    missing_folders: tuple[str, ...]
    rounds: int
    matches: int

    def evidence(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "uid": self.uid,
            "uidvalidity": self.uidvalidity,
            "internaldate": self.internaldate.isoformat() if self.internaldate else None,
            "visible_utc": self.visible_utc.isoformat(),
            "method": self.method,
            "searched_folders": list(self.searched_folders),
            "missing_folders": list(self.missing_folders),
            "rounds": self.rounds,
            "matches": self.matches,
            "size": len(self.raw),
        }


def _is_inbox(folder: str) -> bool:
    return folder.upper() == "INBOX"


def _order(folders: Sequence[str]) -> list[str]:
    """INBOX last: the round ends with it selected, ready to re-check (and IDLE on)."""
    return [f for f in folders if not _is_inbox(f)] + [f for f in folders if _is_inbox(f)]


def wait_for_message(
    mailbox: ImapMailbox,
    match: Matcher,
    *,
    folders: Sequence[str] = ("INBOX", "Junk"),
    timeout: float = 30.0,
    interval: float = 1.0,
    use_idle: bool = True,
    recheck: float = RECHECK_SECONDS,
) -> FoundMessage:
    """Search ``folders`` until ``match`` finds a message or ``timeout`` seconds pass.

    Every ``interval`` a round searches every folder; in between, INBOX is re-checked
    every ``recheck`` seconds (see the module docstring). Raises ``MessageNotFound``
    (what was searched where, for how long, how), and the errors of ``imap.session``.
    A folder that does not exist is reported, not fatal: Junk may be created only when
    the first junk arrives.
    """
    if not folders:
        raise ConfigError(f"IMAP {mailbox.label}: no folders to search")
    if timeout <= 0 or interval <= 0 or recheck <= 0:
        raise ConfigError("IMAP wait: timeout, interval and recheck must be positive")
    deadline = time.monotonic() + timeout
    missing: set[str] = set()
    searches = 0
    inbox = next((f for f in folders if _is_inbox(f)), None)
    with session(mailbox) as box:
        idle = use_idle and inbox is not None and "IDLE" in capabilities(box)
        method: Method = "idle" if idle else "poll"

        def search(folder: str, uidvalidity: int | None) -> FoundMessage | None:
            hits = match.accepts(uid_search(box, match.criteria(folder)), box, folder, uidvalidity)
            record = fetch_raw(box, hits[0]) if hits else None
            if record is None or record.literal is None:  # none, or expunged meanwhile
                return None
            return FoundMessage(
                folder=folder,
                uid=record.uid,
                uidvalidity=uidvalidity,
                raw=record.literal,
                internaldate=record.internaldate,
                visible_utc=datetime.now(UTC),
                visible_monotonic=time.monotonic(),
                method=method,
                searched_folders=tuple(folders),
                missing_folders=tuple(f for f in folders if f in missing),
                rounds=searches,
                matches=len(hits),
            )

        while True:
            searches += 1
            inbox_validity: int | None = None
            for folder in _order(folders):
                try:
                    uidvalidity = select(box, folder, readonly=True)
                except MailboxFolderSelectError:
                    missing.add(folder)
                    continue
                missing.discard(folder)
                if folder == inbox:
                    inbox_validity = uidvalidity
                hit = search(folder, uidvalidity)
                if hit is not None:
                    return hit
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            until = time.monotonic() + min(interval, remaining)
            if inbox is None or inbox in missing:
                time.sleep(until - time.monotonic())
                continue
            _news(box)  # forget what the EXAMINE reported: only later changes count
            while (left := until - time.monotonic()) > 0:
                # No NOOP before the round's own search: it would find nothing more.
                if _recheck(box, min(recheck, left), idle, noop=left > recheck):
                    searches += 1
                    hit = search(inbox, inbox_validity)
                    if hit is not None:
                        return hit
    raise _not_found(mailbox, match, folders, missing, timeout, method, interval, searches)


def _news(box: BaseMailBox) -> bool:
    """Whether the server reported a new message count (``* n EXISTS``) since the last
    call; the report is consumed."""
    return box.client.untagged_responses.pop("EXISTS", None) is not None


def _recheck(box: BaseMailBox, seconds: float, idle: bool, noop: bool) -> bool:
    """Wait ``seconds`` on the selected INBOX (IDLE, or sleep), then NOOP if ``noop``:
    True when the server reported a new message count, so INBOX is worth a search."""
    if idle:
        box.idle.start()  # type: ignore[no-untyped-call]
        try:
            pushed = box.idle.poll(timeout=seconds)
        finally:
            box.idle.stop()  # type: ignore[no-untyped-call]
        if any(b"EXISTS" in line.upper() for line in pushed):
            return True
    else:
        time.sleep(seconds)
    if not noop:
        return False
    # RFC 3501 6.1.2: NOOP is the poll for new messages; the server syncs the mailbox
    # and reports ``EXISTS`` at once (Dovecot's IDLE push comes 0.5 s after delivery).
    box.client.noop()
    return _news(box)


def _not_found(
    mailbox: ImapMailbox,
    match: Matcher,
    folders: Sequence[str],
    missing: set[str],
    timeout: float,
    method: Method,
    interval: float,
    rounds: int,
) -> MessageNotFound:
    how = "IDLE" if method == "idle" else f"polling every {interval:g} s"
    gone = [f for f in folders if f in missing]
    note = f"; {', '.join(gone)} does not exist" if gone else ""
    message = (
        f"{match.describe()} not found in {', '.join(folders)} of {mailbox.label} "
        f"after {timeout:.1f} s ({how}, {rounds} searches{note})"
    )
    details: dict[str, Any] = {
        "looked_for": match.describe(),
        "mailbox": mailbox.evidence(),
        "searched_folders": list(folders),
        "missing_folders": gone,
        "timeout_seconds": timeout,
        "method": method,
        "interval_seconds": interval,
        "rounds": rounds,
    }
    return MessageNotFound(STAGE, message, details)
