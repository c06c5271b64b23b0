"""The local stack's mail world, proven with real protocol clients.

Postfix submission (STARTTLS + AUTH), OpenDKIM signing checked with dkimpy against the
keys Knot serves, Dovecot over IMAPS (INBOX and Junk), spamd scoring with local rules,
the stand-in application's portal invite, Redis holding the BullMQ email queue, and each
test switch (junk filing, deferred delivery, signing off, redirect, missing link, backlog)
switched on and back. Most tests share the worker's stack (``stack`` fixture) and restore
every switch they touch; the lifecycle test runs its own stack through the CLI.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import re
import smtplib
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest

from opsdrill.config.envfile import read_env_file
from opsdrill.config.inventory import load
from opsdrill_stack import demo_dns, mail
from opsdrill_stack.demo_app import INVITE_SUBJECT
from opsdrill_stack.local import LocalStack
from opsdrill_stack.procs import pid_alive
from tests.conftest import Stack, opsdrill

HEADER = "X-Opsdrill-Probe"
ARRIVAL_TIMEOUT = 10.0
# Rules that need the network: none may fire on a local-only spamd.
NETWORK_RULE = re.compile(r"^(RCVD_IN_|URIBL_|RAZOR|PYZOR|DCC_|SPF_|DKIM_VALID|DMARC_)")


# -- clients ------------------------------------------------------------------------
def _probe(stack: Stack) -> dict[str, Any]:
    return dict(stack.data["probes"]["transactional"])


def _tls(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(
        cafile=str(stack.stack.base / _probe(stack)["smtp"]["ca_file"])
    )


def submit(
    stack: Stack,
    *,
    sender: str = mail.SENDER.address,
    to: str = mail.PROBE.address,
    headers: dict[str, str] | None = None,
    body: str = "A delivery probe from the opsdrill tests.\n",
) -> str:
    """Submit a message with a unique token (header and subject) and return the token."""
    smtp = _probe(stack)["smtp"]
    token = uuid.uuid4().hex
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"opsdrill probe {token}"
    msg["Message-ID"] = f"<{token}@{sender.rpartition('@')[2]}>"
    msg["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    msg[HEADER] = token
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", smtp["port"], timeout=10) as client:
        client.starttls(context=_tls(stack))
        client.login(smtp["user"], stack.secrets[smtp["password_env"]])
        client.send_message(msg)
    return token


class Mailbox:
    """The probe mailbox over IMAPS."""

    def __init__(self, stack: Stack, user: mail.MailUser = mail.PROBE) -> None:
        imap = _probe(stack)["imap"]
        self.conn = imaplib.IMAP4_SSL("127.0.0.1", imap["port"], ssl_context=_tls(stack))
        self.conn.login(user.address, stack.secrets[user.password_env])

    def find(self, folder: str, header: str, value: str) -> list[bytes]:
        self.conn.select(folder)
        typ, data = self.conn.uid("SEARCH", "HEADER", header, f'"{value}"')  # type: ignore[arg-type]
        assert typ == "OK"
        return list(data[0].split())

    def wait(
        self, value: str, folder: str = "INBOX", header: str = HEADER, timeout: float = 10.0
    ) -> bytes | None:
        """The raw message once it is in ``folder``, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            uids = self.find(folder, header, value)
            if uids:
                typ, data = self.conn.uid("FETCH", uids[-1], "(BODY.PEEK[])")
                assert typ == "OK" and isinstance(data[0], tuple)
                return bytes(data[0][1])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def delete(self, value: str, header: str = HEADER) -> None:
        for folder in ("INBOX", mail.JUNK_FOLDER):
            uids = self.find(folder, header, value)
            if uids:
                self.conn.uid("STORE", b",".join(uids).decode(), "+FLAGS", r"(\Deleted)")
                self.conn.expunge()

    def close(self) -> None:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            self.conn.logout()


@pytest.fixture
def mailbox(stack: Stack) -> Iterator[Mailbox]:
    box = Mailbox(stack)
    try:
        yield box
    finally:
        box.close()


def dkim_verify(stack: Stack, raw: bytes) -> bool:
    """dkimpy, with the key looked up on the stack's Knot (not the system resolver)."""
    resolver = stack.stack.knot().resolver()

    def txt(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    return bool(dkim.verify(raw, dnsfunc=txt))


def dkim_tags(raw: bytes) -> dict[str, str]:
    msg = message_from_bytes(raw, policy=policy.compat32)
    signature = msg["DKIM-Signature"]
    assert signature, "no DKIM-Signature"
    flat = re.sub(r"\s+", "", str(signature))
    return dict(part.split("=", 1) for part in flat.split(";") if "=" in part)


def http(url: str, data: dict[str, Any] | None = None, token: str | None = None) -> int:
    req = urllib.request.Request(
        url,
        data=None if data is None else json.dumps(data).encode(),
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def text_of(raw: bytes) -> str:
    msg = message_from_bytes(raw, policy=policy.default)
    body = msg.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
    assert body is not None
    return str(body.get_content())


# -- submission -----------------------------------------------------------------------
def test_submission_needs_starttls_then_auth_and_relays_nothing(stack: Stack) -> None:
    smtp = _probe(stack)["smtp"]
    with smtplib.SMTP("127.0.0.1", smtp["port"], timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, _ = client.mail(mail.SENDER.address)
        assert code == 530  # "Must issue a STARTTLS command first"
    with smtplib.SMTP("127.0.0.1", smtp["port"], timeout=10) as client:
        client.starttls(context=_tls(stack))
        client.ehlo()
        assert client.has_extn("auth")
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(smtp["user"], "not-the-password")
        assert info.value.smtp_code == 535
    # Not an open relay: without AUTH nothing is accepted, local or remote.
    with smtplib.SMTP("127.0.0.1", smtp["port"], timeout=10) as client:
        client.starttls(context=_tls(stack))
        client.ehlo()
        assert client.mail("someone@elsewhere.example")[0] == 250
        for rcpt in ("victim@elsewhere.example", mail.PROBE.address):
            assert client.rcpt(rcpt)[0] == 554


def test_message_arrives_over_imaps_signed_by_sel1(stack: Stack, mailbox: Mailbox) -> None:
    started = time.monotonic()
    token = submit(stack)
    raw = mailbox.wait(token, timeout=ARRIVAL_TIMEOUT)
    latency = time.monotonic() - started
    try:
        assert raw is not None, f"not in INBOX after {ARRIVAL_TIMEOUT}s"
        assert latency < 5, f"took {latency:.2f}s"
        tags = dkim_tags(raw)
        assert (tags["d"], tags["s"]) == ("example.test", "sel1")
        assert dkim_verify(stack, raw)
        assert mailbox.find(mail.JUNK_FOLDER, HEADER, token) == []
    finally:
        mailbox.delete(token)


@pytest.mark.parametrize(
    ("sender", "domain", "selector"),
    [
        ("no-reply@portal.example.net", "portal.example.net", "portal1"),
        (f"crm@{mail.UNALIGNED_DOMAIN}", "example.test", "sel1"),  # valid, not aligned
    ],
)
def test_each_signing_domain_uses_its_key(
    stack: Stack, mailbox: Mailbox, sender: str, domain: str, selector: str
) -> None:
    token = submit(stack, sender=sender)
    try:
        raw = mailbox.wait(token, timeout=ARRIVAL_TIMEOUT)
        assert raw is not None
        tags = dkim_tags(raw)
        assert (tags["d"], tags["s"]) == (domain, selector)
        assert dkim_verify(stack, raw)
    finally:
        mailbox.delete(token)


def test_replaced_dns_key_breaks_the_signature(stack: Stack, mailbox: Mailbox) -> None:
    token = submit(stack)
    knot = stack.stack.knot()
    try:
        raw = mailbox.wait(token, timeout=ARRIVAL_TIMEOUT)
        assert raw is not None and dkim_verify(stack, raw)
        # another real key: the provider's
        answer = knot.resolver().resolve(demo_dns.RELAY_ONE.selector_target, "TXT")
        record = b"".join(b"".join(r.strings) for r in answer).decode()
        knot.set_records("example.test", "sel1._domainkey", "TXT", record)
        assert not dkim_verify(stack, raw)
    finally:
        knot.restore_all()
        mailbox.delete(token)


# -- switches -------------------------------------------------------------------------
def test_signing_switch(stack: Stack, mailbox: Mailbox) -> None:
    opendkim = stack.stack.opendkim()
    with opendkim.signing_disabled():
        unsigned = submit(stack)
        raw = mailbox.wait(unsigned, timeout=ARRIVAL_TIMEOUT)
        assert raw is not None and b"DKIM-Signature" not in raw
    assert opendkim.status() == "running"
    signed = submit(stack)
    try:
        raw = mailbox.wait(signed, timeout=ARRIVAL_TIMEOUT)
        assert raw is not None and dkim_verify(stack, raw)
    finally:
        mailbox.delete(unsigned)
        mailbox.delete(signed)


def test_junk_switch_and_spam_flag(stack: Stack, mailbox: Mailbox) -> None:
    dovecot = stack.stack.dovecot()
    with dovecot.filing_into_junk(header=HEADER):
        junked = submit(stack)
        assert mailbox.wait(junked, folder=mail.JUNK_FOLDER, timeout=ARRIVAL_TIMEOUT)
        assert mailbox.find("INBOX", HEADER, junked) == []
    flagged = submit(stack, headers={"X-Spam-Flag": "YES"})  # the global sieve rule
    normal = submit(stack)
    try:
        assert mailbox.wait(flagged, folder=mail.JUNK_FOLDER, timeout=ARRIVAL_TIMEOUT)
        assert mailbox.wait(normal, timeout=ARRIVAL_TIMEOUT), "switch not restored"
    finally:
        for token in (junked, flagged, normal):
            mailbox.delete(token)


def test_defer_switch_keeps_mail_queued_until_restored(stack: Stack, mailbox: Mailbox) -> None:
    postfix = stack.stack.postfix()
    postfix.defer_delivery()
    try:
        token = submit(stack)
        assert mailbox.wait(token, timeout=2.5) is None
        queue = postfix.queue()
        assert "No such file or directory" in queue and mail.PROBE.address in queue
    finally:
        postfix.restore_delivery()
    try:
        assert mailbox.wait(token, timeout=ARRIVAL_TIMEOUT), "not delivered after restore"
        assert "Mail queue is empty" in postfix.queue()
    finally:
        mailbox.delete(token)


# -- spamd ------------------------------------------------------------------------------
def test_spamd_scores_with_local_rules_only(stack: Stack, mailbox: Mailbox) -> None:
    port = _probe(stack)["spamd"]["port"]
    token = submit(stack)
    try:
        raw = mailbox.wait(token, timeout=ARRIVAL_TIMEOUT)
        assert raw is not None
    finally:
        mailbox.delete(token)
    spamc = ["spamc", "-d", "127.0.0.1", "-p", str(port), "-R"]
    out = subprocess.run(spamc, input=raw, capture_output=True, timeout=60)
    score, threshold = (float(x) for x in out.stdout.split(b"\n", 1)[0].split(b"/"))
    assert threshold == 5.0 and score < threshold, out.stdout.decode()
    rules = re.findall(r"^\s*-?[\d.]+\s+([A-Z0-9_]+)\s", out.stdout.decode(), re.MULTILINE)
    assert not [r for r in rules if NETWORK_RULE.match(r)], rules
    report = stack.stack.spamd().report(raw)
    assert report.score == score and not report.is_spam
    gtube = raw.replace(
        b"A delivery probe", b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
    )
    spam = stack.stack.spamd().report(gtube)
    assert spam.is_spam and spam.score >= 100 and "GTUBE" in [r.name for r in spam.rules]


# -- the application --------------------------------------------------------------------
def test_portal_invite_sends_the_activation_link(stack: Stack, mailbox: Mailbox) -> None:
    probe = stack.data["probes"]["portal-invite"]
    trigger, expect = probe["trigger"], probe["expect"]
    token = stack.secrets[trigger["bearer_token_env"]]
    run = f"opsdrill-{uuid.uuid4().hex[:12]}"
    body = {**trigger["json"], "name": trigger["json"]["name"].replace("{token}", run)}
    assert http(trigger["url"], body, token="wrong-token") == 401
    assert http(trigger["url"], body, token=token) == 201
    raw = mailbox.wait(INVITE_SUBJECT, header="Subject", timeout=ARRIVAL_TIMEOUT)
    try:
        assert raw is not None
        msg = message_from_bytes(raw, policy=policy.default)
        assert re.search(expect["subject_pattern"], str(msg["Subject"]))
        # the run's token, carried as the invitee's name, shows in To and in the greeting
        assert msg["To"].addresses[0].addr_spec == expect["to"]
        assert msg["To"].addresses[0].display_name == f"Probe {run}"
        assert f"Hello Probe {run}," in text_of(raw)
        assert dkim_tags(raw)["d"] == "example.test"
        links = re.findall(expect["link_pattern"], text_of(raw))
        assert len(links) == 1, text_of(raw)
        assert http(links[0]) == 200
        assert http(links[0].rsplit("=", 1)[0] + "=not-issued") == 404
        assert dkim_verify(stack, raw)
        assert stack.stack.spamd().report(raw).score < probe["spamd"]["max_score"]
    finally:
        mailbox.delete(INVITE_SUBJECT, header="Subject")


def test_app_switches_missing_link_and_redirect(stack: Stack, mailbox: Mailbox) -> None:
    probe = stack.data["probes"]["portal-invite"]
    trigger, expect = probe["trigger"], probe["expect"]
    token = stack.secrets[trigger["bearer_token_env"]]
    app = stack.stack.demo_app()
    env_file = stack.stack.base / stack.data["app_environment"]["crm"]["env_file"]
    assert "EMAIL_REDIRECT_TO" not in read_env_file(env_file)
    with app.without_activation_link():
        assert http(trigger["url"], trigger["json"], token=token) == 201
        raw = mailbox.wait(INVITE_SUBJECT, header="Subject", timeout=ARRIVAL_TIMEOUT)
        assert raw is not None and not re.search(expect["link_pattern"], text_of(raw))
        mailbox.delete(INVITE_SUBJECT, header="Subject")
    ops = Mailbox(stack, mail.OPS)
    try:
        with app.redirecting(mail.OPS.address):
            assert read_env_file(env_file)["EMAIL_REDIRECT_TO"] == mail.OPS.address
            assert (env_file.stat().st_mode & 0o777) == 0o600
            assert http(trigger["url"], trigger["json"], token=token) == 201
            raw = ops.wait(f"[{expect['to']}]", header="Subject", timeout=ARRIVAL_TIMEOUT)
            assert raw is not None
            assert mailbox.find("INBOX", "Subject", INVITE_SUBJECT) == []
            ops.delete(f"[{expect['to']}]", header="Subject")
    finally:
        ops.close()
    assert "EMAIL_REDIRECT_TO" not in read_env_file(env_file)
    assert set(read_env_file(env_file)) >= {"ENCRYPTION_KEY", "DATABASE_URL", "SMTP_PASSWORD"}


def test_held_invitations_go_out_when_released(stack: Stack, mailbox: Mailbox) -> None:
    trigger = stack.data["probes"]["portal-invite"]["trigger"]
    token = stack.secrets[trigger["bearer_token_env"]]
    app = stack.stack.demo_app()
    before = app.invites_received()
    with app.holding_invites():
        assert http(trigger["url"], trigger["json"], token=token) == 201
        time.sleep(0.5)
        assert mailbox.find("INBOX", "Subject", INVITE_SUBJECT) == []  # held
        assert app.invites_received() == before + 1
    raw = mailbox.wait(INVITE_SUBJECT, header="Subject", timeout=ARRIVAL_TIMEOUT)
    mailbox.delete(INVITE_SUBJECT, header="Subject")
    assert raw is not None


def test_planted_maildir_messages_are_indexed_with_their_delivery_time(
    stack: Stack, mailbox: Mailbox
) -> None:
    dovecot = stack.stack.dovecot()
    tag = uuid.uuid4().hex
    raw = f"From: a@example.test\r\n{HEADER}: {tag}\r\nSubject: planted\r\n\r\nx\r\n"
    delivered = time.time() - 7200
    paths = dovecot.plant_messages(mail.PROBE.address, [raw.encode()] * 3, delivered=delivered)
    try:
        assert len(mailbox.find("INBOX", HEADER, tag)) == 3
        uid = mailbox.find("INBOX", HEADER, tag)[0].decode()
        typ, data = mailbox.conn.uid("FETCH", uid, "(INTERNALDATE)")
        stamp = imaplib.Internaldate2tuple(data[0])  # type: ignore[arg-type]
        assert typ == "OK" and stamp is not None and abs(time.mktime(stamp) - delivered) < 2
    finally:
        assert dovecot.remove_planted(paths) == 3
    assert mailbox.find("INBOX", HEADER, tag) == []


# -- Redis ------------------------------------------------------------------------------
def test_redis_holds_the_bullmq_queue_and_helpers_change_it(stack: Stack) -> None:
    section = stack.data["queues"]["email"]
    queue = stack.stack.email_queue()
    key = f"{section['prefix']}:{section['queue']}"
    assert queue.client.llen(f"{key}:wait") == 0  # healthy as shipped
    assert queue.client.zcard(f"{key}:completed") == 2
    with queue.backlog(count=3, age_seconds=900) as ids:
        assert queue.client.lrange(f"{key}:wait", 0, -1) == list(reversed(ids))
        job = queue.client.hgetall(f"{key}:{ids[0]}")
        assert {"name", "data", "opts", "timestamp", "delay", "priority"} <= set(job)
        assert json.loads(job["data"])["to"] == mail.PROBE.address
        age = time.time() - int(job["timestamp"]) / 1000
        assert 899 < age < 960
        oldest = queue.oldest_waiting_age()
        assert oldest is not None and oldest >= 900
    assert queue.waiting() == [] and queue.oldest_waiting_age() is None
    import redis

    wrong = redis.Redis(
        host="127.0.0.1", port=section["redis"]["port"], password="wrong", retry=None
    )
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()


def test_bullmq_from_npm_drives_a_real_queue_on_the_stacks_redis(stack: Stack) -> None:
    """The package from package-lock.json, its Lua scripts and its Worker: every state the
    backlog check reads is reached the way an application reaches it."""
    from opsdrill_stack.redis_queue import BullMQ

    port = stack.stack.redis().port
    password = stack.secrets["OPSDRILL_REDIS_PASSWORD"]
    queue = BullMQ(port, password, queue=f"t-{uuid.uuid4().hex[:8]}")
    with queue.scratch():
        queue.fail(3)
        queue.add(2, delay_ms=60_000)
        queue.add(4, priority=2)
        queue.add(1)
        counts = queue.pause()["counts"]
        assert counts == {
            "wait": 0,
            "paused": 1,
            "prioritized": 4,
            "active": 0,
            "delayed": 2,
            "failed": 3,
            "completed": 0,
        }
        client = stack.stack.redis().client(password)
        assert client.hexists(f"bull:{queue.queue}:meta", "paused")
    assert not any(True for _ in client.scan_iter(f"bull:{queue.queue}:*"))  # obliterated


# -- inventory and lifecycle ------------------------------------------------------------
def test_generated_inventory_describes_the_running_servers(stack: Stack) -> None:
    inv = load(stack.inventory_path)
    direct, triggered = inv.probe("transactional"), inv.probe("portal-invite")
    assert (direct.kind, triggered.kind) == ("direct", "triggered")
    assert direct.smtp is not None and direct.smtp.port == stack.stack.postfix().port
    assert direct.imap.port == stack.stack.dovecot().port
    assert direct.trusted_authserv_ids == [mail.AUTHSERV_ID]
    assert inv.resolve_path(direct.imap.ca_file or "").is_file()
    env = inv.app_environment("crm")
    assert env.env_file is not None and inv.resolve_path(env.env_file).is_file()
    assert inv.queue("email").redis.port == stack.stack.redis().port
    for var in ("OPSDRILL_SMTP_PASSWORD", "OPSDRILL_IMAP_PASSWORD", "OPSDRILL_APP_TOKEN"):
        assert inv.secret(var) and inv.secret(var) not in stack.inventory_path.read_text()
    assert (stack.stack.base / "secrets.env").stat().st_mode & 0o077 == 0
    for secret_file in ("dovecot/users", "redis/redis.conf", "tls/key.pem"):
        assert (stack.stack.base / secret_file).stat().st_mode & 0o007 == 0


@pytest.mark.slow
def test_stack_down_from_the_cli_leaves_no_process() -> None:
    # Not under pytest's tmp_path: the postgres user must traverse into it.
    base = Path(tempfile.gettempdir()) / f"opsdrill-mailstack-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    up = opsdrill("stack", "up", "--dir", str(base))
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        took = time.monotonic() - started
        status = opsdrill("stack", "status", "--dir", str(base))
        for name in ("spamd", "dovecot", "opendkim", "postfix", "redis", "demo_app"):
            assert f"{name}: running" in status.stdout
        pids = {
            name: info["pid"] for name, info in LocalStack(base).load_state()["components"].items()
        }
        children = _descendants(set(pids.values()))
    finally:
        down = opsdrill("stack", "down", "--dir", str(base))
    assert down.returncode == 0, down.stderr
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert [pid for pid in children if pid_alive(pid)] == []
    assert _processes_mentioning(str(base)) == []
    assert not base.exists()
    assert took < 60


def _descendants(roots: set[int]) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found
