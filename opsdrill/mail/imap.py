"""IMAP access for the probe (imap-tools over imaplib): sessions, fetching raw bytes,
deleting, sweeping stale probes.

imap-tools gives us the three connection flavours, LOGIN and folder selection; the few
commands it does not wrap the way we need (``BODY.PEEK[]`` raw bytes, which imap-tools
does not keep; ``UID EXPUNGE``) go through its underlying ``imaplib`` client.

Every socket has a timeout (``ImapMailbox.timeout``), so no command waits forever. A
command naming many UIDs is sent in batches (``uid_batches``: compact sets of bounded
length): a server refuses a command line past its limit (Dovecot: 64 KiB), and a sweep
that sent 15,000 UIDs at once failed on every later run.
Connection-level failures raise ``TargetUnreachable``; a rejected LOGIN raises
``AuthRejected`` (the probe mailbox's own credentials: broken, like unreachable); any
other NO/BAD raises ``ProbeFailed``.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

from imap_tools import BaseMailBox, MailBox, MailBoxStartTls, MailBoxUnencrypted
from imap_tools.errors import (
    ImapToolsError,
    MailboxLoginError,
    MailboxStarttlsError,
    UnexpectedCommandStatusError,
)

from opsdrill.mail._net import (
    EndpointFields,
    TlsMode,
    check_tls_mode,
    excerpt,
    tls_context,
    unreachable,
)
from opsdrill.mail.errors import AuthRejected, ProbeFailed
from opsdrill.mail.message import PROBE_HEADER

STAGE = "receive"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_INTERNALDATE = re.compile(
    rb'INTERNALDATE "\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"'
)
_UID = re.compile(rb"\bUID (\d+)")
# A command's UID set stays far below any server's line limit (Dovecot 64 KiB, Gmail
# about 10 KB), and a batch below a size whose answer stays small.
MAX_SET_CHARS = 2000
MAX_BATCH = 500
_NEW_RECORD = re.compile(rb"^\d+ \(")


@dataclass(frozen=True)
class ImapMailbox(EndpointFields):
    """A mailbox the probe reads. ``password`` is never shown (repr, evidence, messages)."""

    host: str
    port: int = 993
    tls: TlsMode = "tls"
    user: str = ""
    password: str = field(default="", repr=False)
    ca_file: str | None = None
    verify: bool = True
    timeout: float = 10.0

    @property
    def label(self) -> str:
        return f"{self.user} at {self.where}"


@dataclass(frozen=True)
class Fetched:
    """One FETCH record: the UID, INTERNALDATE (delivery time) and the literal, if any."""

    uid: int
    internaldate: datetime | None
    literal: bytes | None


def _status_text(exc: UnexpectedCommandStatusError) -> str:
    result = exc.command_result
    data = result[1] if len(result) > 1 else b""
    parts = data if isinstance(data, list) else [data]
    text = " ".join(
        p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in parts if p
    )
    return excerpt(f"{result[0]} {text}")


def _open(mailbox: ImapMailbox) -> BaseMailBox:
    context = tls_context(mailbox.ca_file, mailbox.verify)
    if mailbox.tls == "tls":
        return MailBox(mailbox.host, mailbox.port, timeout=mailbox.timeout, ssl_context=context)
    if mailbox.tls == "starttls":
        return MailBoxStartTls(
            mailbox.host, mailbox.port, timeout=mailbox.timeout, ssl_context=context
        )
    return MailBoxUnencrypted(mailbox.host, mailbox.port, timeout=mailbox.timeout)


@contextmanager
def session(mailbox: ImapMailbox) -> Iterator[BaseMailBox]:
    """A logged-in connection, logged out afterwards; errors mapped as the module says."""
    check_tls_mode("IMAP", mailbox.host, mailbox.port, mailbox.tls)
    doing = f"connecting, tls={mailbox.tls}"
    try:
        box = _open(mailbox)
        doing = f"LOGIN as {mailbox.user}"
        box.login(mailbox.user, mailbox.password, initial_folder=None)
    except MailboxLoginError as exc:
        raise AuthRejected(
            STAGE,
            f"IMAP {mailbox.where} rejected LOGIN for user {mailbox.user}: {_status_text(exc)}",
            credential="imap",
        ) from None
    except MailboxStarttlsError as exc:
        raise ProbeFailed(
            STAGE, f"IMAP {mailbox.where} refused STARTTLS: {_status_text(exc)}"
        ) from None
    except imaplib.IMAP4.abort as exc:
        raise unreachable("IMAP", mailbox.host, mailbox.port, doing, exc, mailbox.timeout) from None
    except imaplib.IMAP4.error as exc:  # e.g. "TLS not supported by server"
        raise ProbeFailed(STAGE, f"IMAP {mailbox.where}: {doing}: {excerpt(str(exc))}") from None
    except OSError as exc:  # refused, timeout, TLS handshake, DNS
        raise unreachable("IMAP", mailbox.host, mailbox.port, doing, exc, mailbox.timeout) from None
    try:
        yield box
    except UnexpectedCommandStatusError as exc:
        raise ProbeFailed(STAGE, f"IMAP {mailbox.label}: {_status_text(exc)}") from None
    except imaplib.IMAP4.abort as exc:
        raise unreachable(
            "IMAP", mailbox.host, mailbox.port, "talking to the server", exc, mailbox.timeout
        ) from None
    except (imaplib.IMAP4.error, ImapToolsError) as exc:
        raise ProbeFailed(STAGE, f"IMAP {mailbox.label}: {excerpt(str(exc))}") from None
    except OSError as exc:
        raise unreachable(
            "IMAP", mailbox.host, mailbox.port, "talking to the server", exc, mailbox.timeout
        ) from None
    finally:
        with suppress(Exception):  # the work is done; a failed LOGOUT changes nothing
            box.logout()


def capabilities(box: BaseMailBox) -> frozenset[str]:
    """Asked after LOGIN: servers may advertise more once authenticated."""
    _, data = box.client.capability()
    words: list[str] = []
    for item in data:
        if isinstance(item, bytes):
            words.extend(item.decode("ascii", "replace").upper().split())
    return frozenset(words)


def select(box: BaseMailBox, folder: str, *, readonly: bool) -> int | None:
    """SELECT (or EXAMINE when read-only) ``folder``; returns its UIDVALIDITY.

    Raises ``imap_tools`` MailboxFolderSelectError when the folder does not exist.
    """
    box.folder.set(folder, readonly=readonly)
    _, data = box.client.response("UIDVALIDITY")
    value = data[-1] if data else None
    return int(value) if isinstance(value, bytes) and value.isdigit() else None


def folder_exists(box: BaseMailBox, folder: str) -> bool:
    return bool(box.folder.exists(folder))


def uid_search(box: BaseMailBox, criteria: str) -> list[int]:
    """UID SEARCH in the selected folder (criteria are ASCII: no CHARSET argument, which
    some servers reject)."""
    typ, data = box.client.uid("SEARCH", criteria)
    if typ != "OK":
        raise ProbeFailed(STAGE, f"IMAP SEARCH {criteria} failed: {excerpt(repr(data))}")
    found: list[int] = []
    for item in data:
        if isinstance(item, bytes):
            found.extend(int(n) for n in item.split() if n.isdigit())
    return sorted(found)


def _internaldate(meta: bytes) -> datetime | None:
    m = _INTERNALDATE.search(meta)
    if not m or m.group(2).decode().title() not in MONTHS:
        return None
    day, mon, year, hh, mm, ss, sign, oh, om = m.groups()
    offset = timedelta(hours=int(oh), minutes=int(om)) * (-1 if sign == b"-" else 1)
    return datetime(
        int(year),
        MONTHS.index(mon.decode().title()) + 1,
        int(day),
        int(hh),
        int(mm),
        int(ss),
        tzinfo=timezone(offset),
    ).astimezone(UTC)


def uid_fetch(box: BaseMailBox, uids: Sequence[int], items: str) -> list[Fetched]:
    """UID FETCH, parsed into records, in batches (``uid_batches``). imaplib hands back
    ``(meta, literal)`` tuples and bare bytes; what follows a literal (``" UID 5)"``)
    belongs to the same record."""
    out: list[Fetched] = []
    for batch in uid_batches(uids):
        out.extend(_uid_fetch(box, batch, items))
    return out


def _uid_fetch(box: BaseMailBox, uids: Sequence[int], items: str) -> list[Fetched]:
    typ, data = box.client.uid("FETCH", uid_set(uids), items)
    if typ != "OK":
        raise ProbeFailed(STAGE, f"IMAP FETCH {items} failed: {excerpt(repr(data))}")
    records: list[tuple[bytes, bytes | None]] = []
    for item in data:
        if isinstance(item, tuple):
            records.append((bytes(item[0]), bytes(item[1])))
        elif isinstance(item, bytes) and item:
            if _NEW_RECORD.match(item) or not records:
                records.append((item, None))
            else:
                meta, literal = records[-1]
                records[-1] = (meta + b" " + item, literal)
    out: list[Fetched] = []
    for meta, literal in records:
        uid = _UID.search(meta)
        if uid:
            out.append(Fetched(int(uid.group(1)), _internaldate(meta), literal))
    return out


def fetch_raw(box: BaseMailBox, uid: int) -> Fetched | None:
    """The whole message as stored, without setting \\Seen; None if it is gone."""
    for record in uid_fetch(box, [uid], "(UID INTERNALDATE BODY.PEEK[])"):
        if record.uid == uid and record.literal is not None:
            return record
    return None


def uid_set(uids: Iterable[int]) -> str:
    """An IMAP sequence set, runs compressed: ``1:3,7,9:12``."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def uid_batches(
    uids: Iterable[int], max_chars: int = MAX_SET_CHARS, max_count: int = MAX_BATCH
) -> Iterator[list[int]]:
    """``uids`` (sorted, once each) in batches of at most ``max_count`` whose compact set
    (``uid_set``) is at most ``max_chars`` long: every command stays short."""
    batch: list[int] = []
    chars = 0  # len(uid_set(batch))
    run_start = 0
    for uid in sorted(set(uids)):
        extends = bool(batch) and uid == batch[-1] + 1
        if extends:  # "a" becomes "a:uid", "a:prev" becomes "a:uid"
            prev = batch[-1]
            drop = len(str(prev)) + 1 if prev != run_start else 0
            grown = chars - drop + len(str(uid)) + 1
        else:
            grown = chars + (1 if batch else 0) + len(str(uid))
        if batch and (len(batch) >= max_count or grown > max_chars):
            yield batch
            batch, extends, grown = [], False, len(str(uid))
        if not extends:
            run_start = uid
        batch.append(uid)
        chars = grown
    if batch:
        yield batch


def _expunge(box: BaseMailBox, uids: Sequence[int], caps: frozenset[str]) -> None:
    """Flag and expunge exactly ``uids``, in batches: UID EXPUNGE (UIDPLUS) where offered,
    so messages someone else flagged \\Deleted are not expunged along with ours."""
    for batch in uid_batches(uids):
        batch_set = uid_set(batch)
        typ, data = box.client.uid("STORE", batch_set, "+FLAGS.SILENT", r"(\Deleted)")
        if typ != "OK":
            raise ProbeFailed(
                STAGE, f"IMAP STORE \\Deleted {_shown(batch_set)} failed: {excerpt(repr(data))}"
            )
        if "UIDPLUS" in caps:
            typ, data = box.client.uid("EXPUNGE", batch_set)
        else:
            typ, data = box.client.expunge()
        if typ != "OK":
            raise ProbeFailed(
                STAGE, f"IMAP EXPUNGE {_shown(batch_set)} failed: {excerpt(repr(data))}"
            )


def _shown(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def delete_messages(mailbox: ImapMailbox, folder: str, uids: Sequence[int]) -> int:
    """Delete ``uids`` from ``folder``; returns how many of them still existed."""
    if not uids:
        return 0
    with session(mailbox) as box:
        caps = capabilities(box)
        select(box, folder, readonly=False)
        wanted = set(uids)
        present = [
            u
            for batch in uid_batches(uids)
            for u in uid_search(box, f"UID {uid_set(batch)}")
            if u in wanted
        ]
        if present:
            _expunge(box, present, caps)
        return len(present)


def sweep_stale_probes(
    mailbox: ImapMailbox,
    folders: Sequence[str],
    older_than_minutes: float = 60.0,
    *,
    header: str = PROBE_HEADER,
    now: datetime | None = None,
) -> int:
    """Delete probe messages (any carrying ``header``) delivered more than
    ``older_than_minutes`` ago, in every existing folder of ``folders``: what runs that
    crashed before their cleanup left behind. Returns how many were deleted.

    Age is INTERNALDATE (delivery time on the server), not the Date header a sender set.
    A message younger than the limit may belong to a probe running right now: kept.
    Every command names a bounded batch of UIDs, however many stale messages there are.
    """
    # HEADER with an empty string matches every message that has the field.
    return sweep_stale(mailbox, folders, older_than_minutes, f'HEADER {header} ""', None, now=now)


# What a sweep asks the server for a message it may delete, and how it decides locally.
Keep = Callable[[Fetched], bool]


def sweep_stale(
    mailbox: ImapMailbox,
    folders: Sequence[str],
    older_than_minutes: float,
    criteria: str,
    ours: Keep | None,
    *,
    items: str = "(UID INTERNALDATE)",
    now: datetime | None = None,
) -> int:
    """Delete the messages ``criteria`` finds that were delivered more than
    ``older_than_minutes`` ago and that ``ours`` accepts (given ``items``, fetched for the
    old ones only; None: all of them), in every existing folder of ``folders``. Every
    command names a bounded batch of UIDs."""
    cutoff = (now or datetime.now(UTC)) - timedelta(minutes=older_than_minutes)
    deleted = 0
    with session(mailbox) as box:
        caps = capabilities(box)
        for folder in folders:
            if not folder_exists(box, folder):
                continue
            select(box, folder, readonly=False)
            stale = [
                r.uid
                for r in uid_fetch(box, uid_search(box, criteria), "(UID INTERNALDATE)")
                if r.internaldate is not None and r.internaldate < cutoff
            ]
            if ours is not None:
                stale = [r.uid for r in uid_fetch(box, stale, items) if ours(r)]
            if stale:
                _expunge(box, stale, caps)
                deleted += len(stale)
    return deleted


def snapshot_uidnext(mailbox: ImapMailbox, folders: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``folder -> (UIDVALIDITY, UIDNEXT)`` for the existing folders: taken before an
    application is triggered, it tells which messages arrived afterwards without relying
    on clocks (a message with UID >= UIDNEXT is new, while UIDVALIDITY is unchanged)."""
    out: dict[str, tuple[int, int]] = {}
    with session(mailbox) as box:
        for folder in folders:
            if not folder_exists(box, folder):
                continue
            status = box.folder.status(folder, ["UIDNEXT", "UIDVALIDITY"])
            if "UIDNEXT" in status and "UIDVALIDITY" in status:
                out[folder] = (status["UIDVALIDITY"], status["UIDNEXT"])
    return out
