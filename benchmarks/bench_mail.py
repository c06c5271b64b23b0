"""Benchmark the mail probe on a local stack: detection delay, and time to a verdict vs a peer.

Detection delay = the moment the probe sees the message over IMAP (``visible_utc``, taken
right after the FETCH that found it) minus the moment Dovecot delivered it into the
Maildir. The delivery time is the ctime of the message file in ``Maildir/new``: Dovecot
writes the message into ``tmp/`` and renames it into ``new/`` when the delivery commits,
and that rename, which sets the ctime, is the instant an IMAP session can first see it
(the kernel takes ctime from its coarse clock: a few ms early at most, never late).
Dovecot's own log has whole seconds only (``log_timestamp`` default), so it is used as a
cross-check.

Every probe is a real ``run_direct_probe`` (SMTP submission through Postfix, OpenDKIM,
LMTP into Dovecot, then the library's IMAP wait). The local stack delivers within a few
ms of the SMTP 250, before the probe has even logged in to IMAP, so every probe would be
found by its first search and IDLE and polling could not differ. To measure the waiting
itself, as in production where delivery takes seconds, delivery is held in Postfix
(``defer_delivery()``) and released (``restore_delivery()``: relink + ``postqueue -f``)
after a random 0.3-1.3 s, drawn once per round and shared by every method of that round,
so the message lands at a random phase of the IDLE/poll cycle. A held probe found by its
first search (delivered before the wait began) says nothing about the method: counted
and left out of its statistics.

Methods run interleaved: each round runs one probe of every method, the order rotated
per round. Measured: the library default (IDLE on INBOX in 0.25 s windows, each ended by a
NOOP that makes the server report a delivery at once, and a search of every folder every
1 s) and the same without IDLE (a NOOP every 0.25 s). Targets: the default's median
detection delay <= 100 ms (the original line), and every detection <= 500 ms (issue 16).
Dovecot delays its IDLE notification by a hard-coded 500 ms after the filesystem event
(``NOTIFY_DELAY_MSECS`` in src/lib-storage/mailbox-watch.c), hence the NOOP re-check.
Extra rows, clearly labelled, measure alternatives (library options, not its defaults:
searching every 0.1 / 0.2 s) with their cost in IMAP commands per probe and per second of
waiting. A context row runs the probe exactly as the check does (defaults, delivery not
held) for SMTP accepted -> visible.

Then the peer, check_email_delivery 0.7.1 (Debian monitoring-plugins-contrib, its
defaults: wait 5 s after sending, then search INBOX every 5 s, 5 times), against the
same Postfix and Dovecot, beside opsdrill's probe (library defaults, the inventory's
timeout), --peer-rounds rounds: a message that arrives (held 0.3-1.3 s, the same hold
for both), and one that never does (Postfix keeps it; the queue is purged after). Time
to a verdict: from the start (process start for the peer, the call for opsdrill) to the
verdict, and for an arrived message from its delivery, which here is the moment the file
lands in Maildir/new (inotify): the peer's read-write session moves its message on to
cur/, which resets ctime. The peer also runs its lost case as it runs in production,
right after a delivered run: it keeps the newest message it found and any message with
its subject answers its search. Its SMTP half needs SSL_CERT_FILE for the stack's CA.
Targets: opsdrill's verdict on an arrived message <= 0.5 s after delivery and on a lost
one 0-0.2 s after the configured timeout, in every round. A missing peer (or a Perl
module of it) prints SKIP with the apt-get command.

A measurement: exits 0 even on a MISS, 1 only when something failed (stack, a probe, a
missing Maildir file, the peer crashing). Results also go to
benchmarks/results/mail-latest.json.
Usage: python benchmarks/bench_mail.py [--probes 20] [--seed N] [--no-alternatives]
       [--peer-rounds 3] [--peer-only] [--lost-timeout S] [--check-email-delivery PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import imaplib
import json
import math
import os
import platform
import random
import re
import select as selectmod
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import as_installed
from imap_tools.errors import MailboxFolderSelectError

from opsdrill.config.inventory import Inventory, load
from opsdrill.errors import OpsdrillError
from opsdrill.mail import (
    ImapMailbox,
    MessageNotFound,
    ProbeResult,
    ReceiveOptions,
    SmtpEndpoint,
    run_direct_probe,
)
from opsdrill.mail.imap import delete_messages, select, session, uid_search
from opsdrill_stack.dovecot import Dovecot
from opsdrill_stack.local import LocalStack
from opsdrill_stack.mail import JUNK_FOLDER, PROBE
from opsdrill_stack.postfix import Postfix

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "mail-latest.json"
TARGET_SECONDS = 0.100  # IDLE's median detection delay over delivery
MAX_TARGET_SECONDS = 0.5  # and the slowest one (issue 16)
PROBE_NAME = "transactional"  # the local stack's direct probe
DOVECOT_NOTIFY_DELAY = 0.5  # NOTIFY_DELAY_MSECS, src/lib-storage/mailbox-watch.c
_MAILDIR_NAME = re.compile(r"^(\d+)\.M(\d+)P")  # "<secs>.M<usecs>P<pid>.<host>,S=..."
_LOG_STAMP = "%b %d %H:%M:%S"  # Dovecot's default log_timestamp, local time

Role = Literal["measured", "alternative", "context"]


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    use_idle: bool
    interval: float
    role: Role
    held: bool = True  # delivery held in Postfix and released at a random moment


METHODS = (
    Method("idle", "IDLE+NOOP every 0.25 s, search 1 s (default)", True, 1.0, "measured"),
    Method("poll-1s", "NOOP every 0.25 s, search every 1 s", False, 1.0, "measured"),
    Method("idle-0.1s", "IDLE ended every 0.1 s to search", True, 0.1, "alternative"),
    Method("poll-0.1s", "search every 0.1 s", False, 0.1, "alternative"),
    Method("poll-0.2s", "search every 0.2 s", False, 0.2, "alternative"),
    Method("check", "as the check runs: defaults, delivery not held", True, 1.0, "context", False),
)


@dataclass
class Sample:
    method: str
    round: int
    hold_seconds: float | None
    token: str
    folder: str
    searches: int  # rounds of the library's wait loop, the finding one included
    accepted_to_delivered: float
    detection: float  # visible over IMAP - delivered into the Maildir
    accepted_to_visible: float
    maildir_file: str
    write_seconds: float  # ctime - the time in the file name (tmp file created)
    log_consistent: bool | None  # the LMTP log line's second agrees with ctime
    imap_commands: dict[str, int] = field(default_factory=dict)
    imap_session_seconds: float = 0.0

    @property
    def commands(self) -> int:
        return sum(self.imap_commands.values())


# -- counting IMAP commands -------------------------------------------------------------
class CommandCounter:
    """Counts the IMAP commands imaplib sends (imap-tools goes through it), by name,
    while ``counting()`` is active. IDLE's terminating ``DONE`` line is counted too."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first = self.last = 0.0
        self.active = False
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        command: Callable[..., Any] = imaplib.IMAP4._command  # type: ignore[attr-defined]
        send: Callable[..., Any] = imaplib.IMAP4.send
        counter = self

        def counted_command(imap: imaplib.IMAP4, name: str, *args: Any) -> Any:
            if counter.active:
                sub = f" {str(args[0]).upper()}" if name == "UID" and args else ""
                counter.seen(name + sub)
            return command(imap, name, *args)

        def counted_send(imap: imaplib.IMAP4, data: Any) -> None:
            if counter.active and bytes(data[:4]) == b"DONE":
                counter.seen("DONE")
            send(imap, data)

        imaplib.IMAP4._command = counted_command  # type: ignore[attr-defined]
        imaplib.IMAP4.send = counted_send  # type: ignore[method-assign,assignment]
        self._installed = True

    def seen(self, name: str) -> None:
        now = time.monotonic()
        if not self.counts:
            self.first = now
        self.last = now
        self.counts[name] += 1

    @contextmanager
    def counting(self) -> Iterator[None]:
        self.counts = Counter()
        self.first = self.last = 0.0
        self.active = True
        try:
            yield
        finally:
            self.active = False


# -- the stack's side: delivery time ----------------------------------------------------
def maildir_file(maildir: Path, token: str) -> Path:
    """The delivered message file carrying ``token`` (INBOX or a ``.Folder`` of it)."""
    needle = token.encode()
    for sub in ("new", "cur"):
        for path in [*maildir.glob(f"{sub}/*"), *maildir.glob(f".*/{sub}/*")]:
            try:
                if needle in path.read_bytes():
                    return path
            except FileNotFoundError:  # expunged meanwhile (another probe's cleanup)
                continue
    raise RuntimeError(f"no file with probe token {token} under {maildir}")


def name_time(path: Path) -> float:
    """When Dovecot created the tmp file: the name starts with its time, to the µs."""
    found = _MAILDIR_NAME.match(path.name)
    if not found:
        raise RuntimeError(f"unexpected Maildir file name {path.name}")
    return int(found.group(1)) + int(found.group(2)) / 1e6


def log_second(logfile: Path, token: str, near: float) -> float | None:
    """The (whole-second, local-time) stamp of the LMTP line that stored ``token``'s
    message, or None when there is none."""
    if not logfile.exists():
        return None
    year = datetime.fromtimestamp(near).year
    for line in logfile.read_text(errors="replace").splitlines():
        if token in line and "lmtp(" in line and "mail" in line:
            try:
                stamp = datetime.strptime(f"{year} {line[:15]}", f"%Y {_LOG_STAMP}")
            except ValueError:
                return None
            return stamp.timestamp()  # naive: local time, as Dovecot wrote it
    return None


# -- one probe --------------------------------------------------------------------------
@dataclass(frozen=True)
class Targets:
    smtp: SmtpEndpoint
    mailbox: ImapMailbox
    sender: str
    recipient: str
    folders: tuple[str, ...]
    timeout: float
    maildir: Path
    postfix: Postfix
    dovecot_log: Path


def targets(inv: Inventory, stack: LocalStack) -> Targets:
    probe = inv.probe(PROBE_NAME)
    s, i = probe.smtp, probe.imap
    if s is None or probe.from_address is None or probe.to_address is None:
        raise RuntimeError(f"probes.{PROBE_NAME} in {inv.path} is not a direct probe")

    def ca(value: str | None) -> str | None:
        return str(inv.resolve_path(value)) if value else None

    password = inv.secret(s.password_env) if s.password_env else None
    smtp = SmtpEndpoint(s.host, s.port, s.tls, s.user, password, ca(s.ca_file), s.verify)
    mailbox = ImapMailbox(
        i.host, i.port, i.tls, i.user, inv.secret(i.password_env), ca(i.ca_file), i.verify
    )
    dovecot: Dovecot = stack.dovecot()
    return Targets(
        smtp=smtp,
        mailbox=mailbox,
        sender=probe.from_address,
        recipient=probe.to_address,
        folders=(*i.folders, *i.junk_folders),
        timeout=probe.timeout_seconds,
        maildir=dovecot.home(PROBE.address) / "Maildir",
        postfix=stack.postfix(),
        dovecot_log=dovecot.logfile,
    )


def probe_once(
    t: Targets, method: Method, hold: float | None, counter: CommandCounter
) -> ProbeResult:
    """One ``run_direct_probe``; with ``hold``, Postfix keeps the message until a timer
    releases it ``hold`` seconds after the submission starts."""
    receive = ReceiveOptions(
        folders=t.folders,
        timeout=t.timeout,
        interval=method.interval,
        use_idle=method.use_idle,
        sweep_older_than_minutes=None,  # every probe is cleaned up at once
    )
    timer: threading.Timer | None = None
    failed: list[BaseException] = []
    if hold is not None:

        def release() -> None:
            try:
                t.postfix.restore_delivery()
            except BaseException as exc:  # reported by the main thread
                failed.append(exc)

        t.postfix.defer_delivery()
        timer = threading.Timer(hold, release)
        timer.daemon = True
        timer.start()
    try:
        with counter.counting():
            return run_direct_probe(
                t.smtp, t.mailbox, sender=t.sender, recipient=t.recipient, receive=receive
            )
    finally:
        if timer is not None:
            timer.join()
            if failed:
                raise RuntimeError(f"releasing Postfix's queue failed: {failed[0]}")


def measure(
    t: Targets, method: Method, round_no: int, hold: float | None, counter: CommandCounter
) -> Sample:
    result = probe_once(t, method, hold, counter)
    try:
        expected = "idle" if method.use_idle else "poll"
        if result.method != expected:
            raise RuntimeError(f"{method.label}: the wait used {result.method} (IDLE not offered?)")
        path = maildir_file(t.maildir, result.token or "")
        if path.parent.name != "new":
            # A move into cur/ happens when a session SELECTs read-write; the wait only
            # EXAMINEs, so this means someone else touched the mailbox: ctime is not delivery.
            raise RuntimeError(f"{path} was moved out of new/: its ctime is not the delivery")
        delivered = path.stat().st_ctime
        logged = log_second(t.dovecot_log, result.token or "", delivered)
        return Sample(
            method=method.key,
            round=round_no,
            hold_seconds=hold,
            token=result.token or "",
            folder=result.folder,
            searches=result.found.rounds,
            accepted_to_delivered=delivered - result.accepted_utc.timestamp(),
            detection=result.visible_utc.timestamp() - delivered,
            accepted_to_visible=result.latency_seconds,
            maildir_file=str(path.relative_to(t.maildir)),
            write_seconds=delivered - name_time(path),
            log_consistent=None if logged is None else delivered - 1 < logged <= delivered + 1,
            imap_commands=dict(counter.counts),
            imap_session_seconds=counter.last - counter.first,
        )
    finally:
        result.cleanup()


# -- the peer: check_email_delivery on the same stack ------------------------------------
CHECK_EMAIL_DELIVERY = Path("/usr/lib/nagios/plugins/check_email_delivery")
PEER_PACKAGES = (
    "monitoring-plugins-contrib libnet-smtp-tls-perl libmail-imapclient-perl "
    "libio-socket-ssl-perl libemail-simple-perl"
)
# What its two halves load (check_smtp_send --tls, check_imap_receive --ssl).
PEER_PERL_MODULES = ("Net::SMTP::TLS", "Mail::IMAPClient", "IO::Socket::SSL", "Email::Simple")
PEER_SUBJECT = "Nagios Message SMTP"  # its subject: "... <server> ID <epoch seconds>."
PEER_TIMEOUT = 300.0
ARRIVED_TARGET = 0.5  # opsdrill's verdict at most this long after the delivery
LOST_TARGET = 0.2  # and on a lost message, at most this long after the configured timeout
_IN_CREATE, _IN_MOVED_TO = 0x100, 0x80
_PEER_STATUS = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
ROW_ORDER = (
    "opsdrill: arrived",
    "check_email_delivery: arrived",
    "opsdrill: lost",
    "check_email_delivery: lost",
    "check_email_delivery: lost, its previous message kept",
)


class MaildirWatch:
    """When each file lands in ``new/`` of INBOX and of Junk (inotify: CREATE or
    MOVED_TO, timestamped by a thread blocked on the inotify descriptor): the delivery
    time, also for a message a read-write session later moves on to ``cur/``."""

    def __init__(self, maildir: Path) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        for sub in (maildir / "new", maildir / f".{JUNK_FOLDER}" / "new"):
            sub.mkdir(parents=True, exist_ok=True)  # Junk may not exist yet
            if self.libc.inotify_add_watch(self.fd, bytes(sub), _IN_CREATE | _IN_MOVED_TO) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {sub} failed")
        self.landed: dict[str, float] = {}  # file name up to ':' -> time.time()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="maildir-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            ready, _, _ = selectmod.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            now = time.time()
            data = os.read(self.fd, 65536)
            pos = 0
            while pos + 16 <= len(data):
                _wd, _mask, _cookie, size = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16 : pos + 16 + size].rstrip(b"\0").decode(errors="replace")
                self.landed.setdefault(name.split(":", 1)[0], now)
                pos += 16 + size

    def delivered(self, path: Path) -> float:
        """When ``path`` (in new/ or cur/) landed in new/; waits a moment for the thread."""
        key = path.name.split(":", 1)[0]
        for _ in range(100):
            if key in self.landed:
                return self.landed[key]
            time.sleep(0.01)
        raise RuntimeError(f"the Maildir watch never saw {path.name} land in new/")

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        os.close(self.fd)


def peer_missing(binary: Path) -> str:
    """Why check_email_delivery cannot run here ('' when it can)."""
    install = f"apt-get install {PEER_PACKAGES}"
    if not binary.is_file():
        return f"SKIP check_email_delivery: {binary} not installed ({install})"
    perl = shutil.which("perl")
    if perl is None:
        return f"SKIP check_email_delivery: perl not installed ({install})"
    loads = [f"-M{m}" for m in PEER_PERL_MODULES]
    proc = subprocess.run([perl, *loads, "-e", "1"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["?"])[0]
        return f"SKIP check_email_delivery: a Perl module is missing: {first} ({install})"
    return ""


@dataclass(frozen=True)
class Peer:
    """check_email_delivery 0.7.1 with its defaults (wait 5 s after sending, then search
    INBOX every 5 s, 5 times) against the probe's SMTP submission and IMAPS mailbox."""

    binary: Path
    t: Targets

    def argv(self) -> list[str]:
        s, i = self.t.smtp, self.t.mailbox
        if s.tls != "starttls" or i.tls != "tls" or not s.user or not s.password:
            raise RuntimeError("the peer is wired for STARTTLS + AUTH submission and IMAPS")
        return [
            str(self.binary),
            *("--smtp-server", s.host, "--smtp-port", str(s.port), "--smtptls"),
            *("--smtp-username", s.user, "--smtp-password", s.password),
            *("--mailto", self.t.recipient, "--mailfrom", self.t.sender),
            *("--imap-server", i.host, "--imap-port", str(i.port), "--imapssl"),
            # It insists on --username/--password even when both halves have their own.
            *("--username", i.user, "--password", i.password),
        ]

    def run(self) -> tuple[float, float, int, str]:
        """(start, end: time.time(), exit code, its status line). Its SMTP half verifies
        the server against OpenSSL's default CA file, hence SSL_CERT_FILE."""
        env = {**os.environ, "SSL_CERT_FILE": self.t.mailbox.ca_file or ""}
        start = time.time()
        try:
            proc = subprocess.run(
                self.argv(), capture_output=True, text=True, env=env, timeout=PEER_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"check_email_delivery ran over {PEER_TIMEOUT:g} s") from None
        end = time.time()
        line = (proc.stdout.strip().splitlines() or [proc.stderr.strip()])[0]
        if proc.returncode not in (0, 1, 2):
            raise RuntimeError(f"check_email_delivery exited {proc.returncode}: {line}")
        return start, end, proc.returncode, line


def delete_peer_messages(mailbox: ImapMailbox, folders: Sequence[str]) -> int:
    """Remove check_email_delivery's messages: it keeps the newest one it found, which
    would answer its next search whatever happens to the next message."""
    removed = 0
    for folder in folders:
        with session(mailbox) as box:
            try:
                select(box, folder, readonly=True)
            except MailboxFolderSelectError:
                continue
            uids = uid_search(box, f'SUBJECT "{PEER_SUBJECT}"')
        if uids:
            removed += delete_messages(mailbox, folder, uids)
    return removed


def peer_file(maildir: Path, since: float) -> Path | None:
    """check_email_delivery's newest message file, created after ``since``."""
    newest: tuple[float, Path] | None = None
    for path in [*maildir.glob("new/*"), *maildir.glob("cur/*")]:
        try:
            created = name_time(path)
            if created < since or PEER_SUBJECT.encode() not in path.read_bytes()[:4096]:
                continue
        except (FileNotFoundError, RuntimeError):
            continue
        if newest is None or created > newest[0]:
            newest = (created, path)
    return newest[1] if newest else None


def purge_queue(postfix: Postfix) -> None:
    """Drop what the lost trial left in Postfix's queue, so it never lands later."""
    binary = shutil.which("postsuper") or "/usr/sbin/postsuper"
    env = {**os.environ, "MAIL_CONFIG": str(postfix.etc.resolve())}
    proc = subprocess.run(
        [binary, "-c", str(postfix.etc.resolve()), "-d", "ALL"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"postsuper -d ALL failed: {(proc.stdout + proc.stderr).strip()}")


@dataclass
class Trial:
    who: Literal["opsdrill", "check_email_delivery"]
    case: Literal["arrived", "lost", "lost, its previous message kept"]
    round: int
    hold_seconds: float | None
    seconds: float  # start of the run (process start, or the probe's call) -> verdict
    verdict: str
    after_delivery: float | None = None  # arrived: verdict - the file landed in new/
    after_timeout: float | None = None  # opsdrill lost: verdict - (accepted + timeout)
    name_to_new_ms: float | None = None  # the file's name time (tmp/) -> landed in new/


@contextmanager
def held(postfix: Postfix, release_after: float | None) -> Iterator[None]:
    """Delivery held in Postfix; released after ``release_after`` s, or never (a lost
    message: the queue is purged afterwards)."""
    failed: list[BaseException] = []

    def release() -> None:
        try:
            postfix.restore_delivery()
        except BaseException as exc:  # reported by the main thread
            failed.append(exc)

    postfix.defer_delivery()
    timer = threading.Timer(release_after, release) if release_after is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.join()
        else:
            purge_queue(postfix)
            postfix.restore_delivery()
        if failed:
            raise RuntimeError(f"releasing Postfix's queue failed: {failed[0]}")


def opsdrill_trial(
    t: Targets, watch: MaildirWatch, n: int, hold: float, lost: bool, timeout: float
) -> Trial:
    """``run_direct_probe`` with the library's wait defaults, as the check runs it."""
    receive = ReceiveOptions(folders=t.folders, timeout=timeout, sweep_older_than_minutes=None)
    result: ProbeResult | None = None
    accepted = 0.0
    start = time.time()
    with held(t.postfix, None if lost else hold):
        try:
            result = run_direct_probe(
                t.smtp, t.mailbox, sender=t.sender, recipient=t.recipient, receive=receive
            )
            verdict_at, verdict = time.time(), f"found ({result.method})"
        except MessageNotFound as exc:
            verdict_at, verdict = time.time(), "MessageNotFound"
            accepted = datetime.fromisoformat(exc.sent["send"]["accepted_utc"]).timestamp()
    trial = Trial("opsdrill", "lost" if lost else "arrived", n, hold, verdict_at - start, verdict)
    if result is None:
        if not lost:
            raise RuntimeError("opsdrill did not find a message that was delivered")
        trial.after_timeout = verdict_at - accepted - timeout
        return trial
    try:
        if lost:
            raise RuntimeError("opsdrill found a message that was never delivered")
        path = maildir_file(t.maildir, result.token or "")
        landed = watch.delivered(path)
        trial.after_delivery = verdict_at - landed
        trial.name_to_new_ms = (landed - name_time(path)) * 1e3
    finally:
        result.cleanup()
    return trial


def peer_trial(
    peer: Peer,
    watch: MaildirWatch,
    n: int,
    hold: float,
    case: Literal["arrived", "lost", "lost, its previous message kept"],
) -> Trial:
    t = peer.t
    if case != "lost, its previous message kept":
        delete_peer_messages(t.mailbox, t.folders)
    with held(t.postfix, hold if case == "arrived" else None):
        start, end, code, line = peer.run()
    trial = Trial("check_email_delivery", case, n, hold, end - start, f"{_PEER_STATUS[code]}")
    trial.verdict += f": {line.split(' - ', 1)[-1].split(';')[0][:70]}" if code else ""
    if case == "arrived":
        path = peer_file(t.maildir, start)
        if path is None:
            raise RuntimeError("check_email_delivery's message is not in the Maildir")
        landed = watch.delivered(path)
        trial.after_delivery = end - landed
        trial.name_to_new_ms = (landed - name_time(path)) * 1e3
    return trial


def compare_with_peer(t: Targets, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Rounds of: a message that arrives (held 0.3-1.3 s, the same hold for both), then
    one that never does (Postfix keeps it, then drops it), for opsdrill and the peer, the
    order rotated per round. The peer also runs its lost case in its normal state: its
    previous message still in INBOX (it keeps the newest one it found)."""
    skip = peer_missing(args.check_email_delivery)
    if skip:
        print(skip, flush=True)
    peer = None if skip else Peer(args.check_email_delivery, t)
    timeout = args.lost_timeout or t.timeout
    print(
        f"peer comparison: {args.peer_rounds} rounds; opsdrill's probe: library defaults, "
        f"timeout {timeout:g} s",
        flush=True,
    )
    trials: list[Trial] = []
    watch = MaildirWatch(t.maildir)
    try:
        for n in range(1, args.peer_rounds + 1):
            hold = round(rng.uniform(0.3, 1.3), 3)
            arrived: list[Callable[[], Trial]] = [
                partial(opsdrill_trial, t, watch, n, hold, False, timeout)
            ]
            lost: list[Callable[[], Trial]] = [
                partial(opsdrill_trial, t, watch, n, hold, True, timeout)
            ]
            if peer is not None:
                arrived.append(partial(peer_trial, peer, watch, n, hold, "arrived"))
                lost.append(partial(peer_trial, peer, watch, n, hold, "lost"))
            if n % 2 == 0:
                arrived.reverse()
                lost.reverse()
            for trial in arrived:
                trials.append(trial())
                print(f"round {n}: {describe(trials[-1])}", flush=True)
            if peer is not None:  # right after its arrived run: its message is still there
                trials.append(peer_trial(peer, watch, n, hold, "lost, its previous message kept"))
                print(f"round {n}: {describe(trials[-1])}", flush=True)
            for trial in lost:
                trials.append(trial())
                print(f"round {n}: {describe(trials[-1])}", flush=True)
        if peer is not None:
            delete_peer_messages(t.mailbox, t.folders)
    finally:
        watch.close()
    return peer_summary(trials, skip, timeout, args)


def describe(trial: Trial) -> str:
    extra = ""
    if trial.after_delivery is not None:
        extra = f", {trial.after_delivery:.3f} s after delivery"
    if trial.after_timeout is not None:
        extra = f", {trial.after_timeout:+.3f} s past the timeout"
    return (
        f"{trial.who} {trial.case} (hold {trial.hold_seconds:.2f} s): {trial.verdict} "
        f"in {trial.seconds:.3f} s{extra}"
    )


def peer_summary(
    trials: list[Trial], skip: str, timeout: float, args: argparse.Namespace
) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for trial in trials:
        row = rows.setdefault(f"{trial.who}: {trial.case}", {"who": trial.who, "case": trial.case})
        row.setdefault("seconds", []).append(round(trial.seconds, 3))
        row.setdefault("verdicts", []).append(trial.verdict)
        if trial.after_delivery is not None:
            row.setdefault("after_delivery", []).append(round(trial.after_delivery, 3))
        if trial.after_timeout is not None:
            row.setdefault("after_timeout", []).append(round(trial.after_timeout, 3))
    for row in rows.values():
        row["median_seconds"] = round(statistics.median(row["seconds"]), 3)
        for key in ("after_delivery", "after_timeout"):
            if key in row:
                row[f"{key}_median"] = round(statistics.median(row[key]), 3)
                row[f"{key}_max"] = max(row[key])
    out: dict[str, Any] = {
        "rounds": args.peer_rounds,
        "opsdrill_timeout_seconds": timeout,
        "peer": skip or "check_email_delivery 0.7.1, defaults",
        "rows": rows,
        "trials": [asdict(t) for t in trials],
        "maildir_name_to_new_ms_median": round(
            statistics.median(t.name_to_new_ms for t in trials if t.name_to_new_ms is not None),
            2,
        )
        if any(t.name_to_new_ms is not None for t in trials)
        else None,
    }
    ours_arrived = rows.get("opsdrill: arrived", {})
    ours_lost = rows.get("opsdrill: lost", {})
    if ours_arrived:
        out["pass_arrived"] = ours_arrived["after_delivery_max"] <= ARRIVED_TARGET
    if ours_lost:
        out["pass_lost"] = all(0 <= x <= LOST_TARGET for x in ours_lost["after_timeout"])
    theirs = rows.get("check_email_delivery: arrived")
    if theirs and ours_arrived:
        ratios = [
            p.after_delivery / o.after_delivery
            for o, p in zip(
                [t for t in trials if t.who == "opsdrill" and t.case == "arrived"],
                [t for t in trials if t.who != "opsdrill" and t.case == "arrived"],
                strict=True,
            )
            if o.after_delivery and p.after_delivery is not None
        ]
        out["arrived_ratio_median"] = round(statistics.median(ratios), 1) if ratios else None
    return out


def print_peer(r: dict[str, Any]) -> None:
    print(
        f"\n== time to a verdict, opsdrill's probe (library defaults) against "
        f"{r['peer'].removeprefix('SKIP ')}; {r['rounds']} rounds, interleaved =="
    )
    print(
        "{:<52} {:>9} {:>18} {:>13}  verdicts".format(
            "who: case", "median s", "after delivery", "after timeout"
        )
    )
    for key in sorted(r["rows"], key=ROW_ORDER.index):
        row = r["rows"][key]
        after = row.get("after_delivery_median")
        over = row.get("after_timeout_median")
        late = "" if after is None else f"{after:.3f} (max {row['after_delivery_max']:.3f})"
        past = "" if over is None else f"{over:+.3f}"
        shown = "; ".join(sorted(set(row["verdicts"])))[:90]
        print(f"{key:<52} {row['median_seconds']:>9.3f} {late:>18} {past:>13}  {shown}")
    if "pass_arrived" in r:
        print(
            f"opsdrill, arrived: verdict at most {ARRIVED_TARGET:g} s after delivery in every "
            f"round: {verdict(r['pass_arrived'])}"
        )
    if "pass_lost" in r:
        print(
            f"opsdrill, lost: verdict 0-{LOST_TARGET:g} s past the configured timeout "
            f"({r['opsdrill_timeout_seconds']:g} s) in every round: {verdict(r['pass_lost'])}"
        )
    if r.get("arrived_ratio_median"):
        print(
            f"check_email_delivery / opsdrill, arrived, time after delivery: "
            f"{r['arrived_ratio_median']:g}x (median of rounds)"
        )
    if r["maildir_name_to_new_ms_median"] is not None:
        print(
            "delivery = the file landing in Maildir new/ (inotify); it came "
            f"{r['maildir_name_to_new_ms_median']:.1f} ms (median) after the time in its name"
        )


# -- statistics and output --------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(method: Method, samples: list[Sample]) -> dict[str, Any]:
    # A held probe found by the first search was delivered before the wait began.
    valid = [s for s in samples if not method.held or s.searches > 1]
    out: dict[str, Any] = {
        "method": method.key,
        "label": method.label,
        "role": method.role,
        "use_idle": method.use_idle,
        "interval_seconds": method.interval,
        "delivery_held": method.held,
        "probes": len(samples),
        "found_by_first_search": sum(s.searches == 1 for s in samples),
        "used": len(valid),
    }
    if not valid:
        return out

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 4),
            "p95": round(percentile(values, 0.95), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }

    rates = [s.commands / s.imap_session_seconds for s in valid if s.imap_session_seconds > 0]
    names = sorted({n for s in valid for n in s.imap_commands})
    out.update(
        detection_seconds=stats([s.detection for s in valid]),
        accepted_to_visible_seconds=stats([s.accepted_to_visible for s in valid]),
        accepted_to_delivered_seconds=stats([s.accepted_to_delivered for s in valid]),
        imap_commands_per_probe=statistics.median(s.commands for s in valid),
        imap_commands_per_probe_by_name={
            n: statistics.median(s.imap_commands.get(n, 0) for s in valid) for n in names
        },
        imap_commands_per_second=round(statistics.median(rates), 1) if rates else None,
        imap_session_seconds=round(statistics.median(s.imap_session_seconds for s in valid), 3),
        searches_median=statistics.median(s.searches for s in valid),
    )
    if method.role != "context":
        out["target_seconds"] = TARGET_SECONDS
        out["pass"] = out["detection_seconds"]["median"] <= TARGET_SECONDS
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def print_report(r: dict[str, Any], probes: int) -> None:
    by_key = {m["method"]: m for m in r["methods"]}
    print(
        f"\n== mail probe detection delay (IMAP visible - Maildir delivery), {probes} probes "
        f"per method, interleaved; {r['servers'].get('dovecot', 'dovecot')} =="
    )
    print("delivery held in Postfix and released 0.3-1.3 s after submission (see --help)")
    head = ("method", "used", "median ms", "p95 ms", "max ms", "cmds/probe", "cmds/s", "target")
    print("{:<46} {:>4} {:>9} {:>6} {:>6} {:>10} {:>6} {:>7}  result".format(*head))

    def row(m: dict[str, Any]) -> None:
        if "detection_seconds" not in m:
            print(f"{m['label']:<46} {m['used']:>4}  (no usable probe)")
            return
        d = m["detection_seconds"]
        target = f"<= {ms(TARGET_SECONDS)}" if "pass" in m else ""
        result = verdict(m["pass"]) if "pass" in m else ""
        rate = m["imap_commands_per_second"]
        print(
            f"{m['label']:<46} {m['used']:>4} {ms(d['median']):>9} {ms(d['p95']):>6} "
            f"{ms(d['max']):>6} {m['imap_commands_per_probe']:>10g} "
            f"{rate if rate is not None else '-':>6} {target:>7}  {result}"
        )

    for m in r["methods"]:
        if m["role"] == "measured":
            row(m)
    idle, poll = by_key.get("idle", {}), by_key.get("poll-1s", {})
    if "detection_seconds" in idle and "detection_seconds" in poll:
        diff = idle["detection_seconds"]["median"] - poll["detection_seconds"]["median"]
        print(
            f"difference of medians, IDLE - polling 1 s: {round(diff * 1000):+d} ms; "
            f"IDLE adds {ms(idle['detection_seconds']['median'])} ms at the median over "
            f"delivery (target <= {ms(TARGET_SECONDS)} ms): {verdict(idle['pass'])}"
        )
    if "detection_seconds" in idle:
        slowest = idle["detection_seconds"]["max"]
        print(
            f"the default's slowest detection: {ms(slowest)} ms (target: every one <= "
            f"{ms(MAX_TARGET_SECONDS)} ms): {verdict(slowest <= MAX_TARGET_SECONDS)}"
        )
    alternatives = [m for m in r["methods"] if m["role"] == "alternative"]
    if alternatives:
        print("alternatives (library options, NOT its defaults):")
        for m in alternatives:
            row(m)
    for m in r["methods"]:
        if m["role"] == "context" and "accepted_to_visible_seconds" in m:
            lat, dlv = m["accepted_to_visible_seconds"], m["accepted_to_delivered_seconds"]
            print(
                f"context, {m['label']}: SMTP accepted -> visible median {ms(lat['median'])} "
                f"ms, p95 {ms(lat['p95'])} ms (accepted -> delivered median "
                f"{ms(dlv['median'])} ms; found by the first search in "
                f"{m['found_by_first_search']}/{m['probes']})"
            )
    skipped = {m["method"]: m["found_by_first_search"] for m in r["methods"] if m["delivery_held"]}
    if any(skipped.values()):
        print(f"held probes found by the first search, left out: {skipped}")
    checks = r["timestamp_checks"]
    print(
        f"delivery time = ctime of the file in Maildir/new; the LMTP log line's second agreed "
        f"for {checks['log_consistent']}/{checks['log_lines']} probes; tmp file -> new/ "
        f"took {checks['write_ms_median']:.1f} ms (median)"
    )


# -- the run ----------------------------------------------------------------------------
def bench(stack: LocalStack, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    inv_path = stack.up()
    up_seconds = time.perf_counter() - started
    print(f"stack up in {up_seconds:.0f}s ({stack.base})", flush=True)
    t = targets(load(inv_path), stack)
    methods = [m for m in METHODS if args.alternatives or m.role != "alternative"]
    if args.peer_only:
        methods = []
    counter = CommandCounter()
    counter.install()
    rng = random.Random(args.seed)
    samples: dict[str, list[Sample]] = {m.key: [] for m in methods}
    # One untimed probe first: the first delivery and login pay for cold caches.
    measure(t, next(m for m in METHODS if m.role == "context"), 0, None, counter)
    for n in range(1, args.probes + 1 if methods else 1):
        hold = round(rng.uniform(0.3, 1.3), 3)
        shift = n % len(methods)
        for method in methods[shift:] + methods[:shift]:
            sample = measure(t, method, n, hold if method.held else None, counter)
            samples[method.key].append(sample)
        line = ", ".join(f"{k} {ms(v[-1].detection)}" for k, v in samples.items())
        print(f"round {n}/{args.probes} (hold {hold:.2f} s): detection ms {line}", flush=True)
    peer = compare_with_peer(t, args, rng) if args.peer_rounds else None
    everything = [s for v in samples.values() for s in v]
    logged = [s for s in everything if s.log_consistent is not None]
    write_ms = statistics.median(s.write_seconds for s in everything) * 1e3 if everything else 0
    servers = {}
    for key in ("dovecot", "postfix"):
        try:
            servers[key] = getattr(stack, key)().version()
        except (RuntimeError, OSError) as exc:
            servers[key] = f"unknown ({exc})"
    return {
        "stack_up_seconds": round(up_seconds, 1),
        "servers": servers,
        "dovecot_notify_delay_seconds": DOVECOT_NOTIFY_DELAY,
        "methods": [summary(m, samples[m.key]) for m in methods],
        "timestamp_checks": {
            "log_lines": len(logged),
            "log_consistent": sum(bool(s.log_consistent) for s in logged),
            "write_ms_median": round(write_ms, 2),
        },
        "samples": [asdict(s) for s in everything],
        "peer_comparison": peer,
    }


def main(argv: list[str] | None = None) -> int:
    as_installed.with_bytecode_caches()
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--probes", type=int, default=20, help="probes per method (default 20)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random delivery holds")
    p.add_argument(
        "--no-alternatives",
        dest="alternatives",
        action="store_false",
        help="only IDLE, 1 s polling and the context row",
    )
    p.add_argument(
        "--peer-rounds",
        type=int,
        default=3,
        help="rounds of the comparison with check_email_delivery (0: none; default 3)",
    )
    p.add_argument("--peer-only", action="store_true", help="only the comparison with the peer")
    p.add_argument(
        "--lost-timeout",
        type=float,
        default=None,
        help="opsdrill's wait timeout in the comparison (default: the probe's timeout_seconds)",
    )
    p.add_argument(
        "--check-email-delivery",
        type=Path,
        default=CHECK_EMAIL_DELIVERY,
        help=f"the peer (default {CHECK_EMAIL_DELIVERY}; SKIP when absent)",
    )
    args = p.parse_args(argv)
    if args.probes < 2:
        p.error("--probes must be at least 2")
    if args.peer_rounds < 0 or (args.peer_only and not args.peer_rounds):
        p.error("--peer-rounds must be at least 0 (at least 1 with --peer-only)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the stack
    base = Path(tempfile.mkdtemp(prefix="opsdrill-bench-mail-"))
    stack = LocalStack(base)
    error = ""
    result: dict[str, Any] = {}
    try:
        result = bench(stack, args)
    except (RuntimeError, TimeoutError, OSError, OpsdrillError) as exc:  # no figures
        error = f"{type(exc).__name__}: {exc}"
    finally:
        stack.down()
        shutil.rmtree(base, ignore_errors=True)
    if error:
        print(f"\n== mail probe detection delay: FAILED: {error}", flush=True)
    else:
        if result["methods"]:
            print_report(result, args.probes)
        if result["peer_comparison"]:
            print_peer(result["peer_comparison"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "probes_per_method": args.probes,
        "seed": args.seed,
        "order": "interleaved: every round runs each method once, order rotated per round",
        "hold_seconds": [0.3, 1.3],
        "delivery_time_source": "ctime of the message file in Maildir/new (rename at commit)",
        "target": f"IDLE median detection delay <= {TARGET_SECONDS * 1000:.0f} ms",
    }
    RESULTS.write_text(
        json.dumps({"meta": meta, "result": result, "error": error}, indent=2) + "\n"
    )
    print(f"\nresults written to {RESULTS.relative_to(REPO)}")
    return 1 if error else 0  # a missed target is a result; a failure is not


if __name__ == "__main__":
    sys.exit(main())
