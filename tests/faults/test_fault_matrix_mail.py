"""Every mail check can fail: break one thing on the worker's real mail stack (Postfix,
OpenDKIM, Dovecot, Knot, spamd, the demo application, Redis), run the real checks
(subprocess, Allure results) and assert the named check FAILS with a message naming the
fault, is BROKEN when opsdrill could not judge (a server that cannot be reached, or that
refuses opsdrill's *own* credentials: the message then names the inventory key and the
variable to fix), is SKIPPED with a reason when there is nothing to judge, and never hangs.
Each fault test declares what it proves (``tests.helpers.registry.proves``), and asserts the
process exit code: 1 when a check failed, 2 when checks were broken and none failed.

Each xdist worker has its own stack (tests/conftest.py); its tests run one after another
and every switch is put back in a ``finally`` (context managers, the ``knot`` fixture).
Faults that break different checks share one run. Every run's Allure results are scanned
for the stack's secrets.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from opsdrill.config.envfile import read_env_file
from opsdrill.mail import (
    PROBE_HEADER,
    ImapMailbox,
    TokenMatch,
    delete_messages,
    new_run_token,
    session,
    wait_for_message,
)
from opsdrill.mail.imap import select, uid_search
from opsdrill.mail.suite import imap_mailbox
from opsdrill_stack import demo_dns, mail
from opsdrill_stack.header_checks import prepending_headers
from opsdrill_stack.knot import KnotServer
from opsdrill_stack.redis_queue import BullMQ
from tests.conftest import CheckRun, Env, Stack, derive, opsdrill
from tests.helpers.registry import proves
from tests.helpers.results import labels, message

MAIN = demo_dns.MAIN.name  # example.test: From domain of the probes, signed with sel1
TX = "probe:transactional"  # the direct probe
INVITE = "probe:portal-invite"  # the application-triggered probe
APPENV = "appenv:crm"
QUEUE = "queue:email"
PROBE_CHECKS = [
    "mail.probe.delivery",
    "mail.probe.latency",
    "mail.probe.dkim",
    "mail.probe.auth_results",
    "mail.probe.spam",
]
ANALYSIS_CHECKS = PROBE_CHECKS[1:]  # every probe's received copy, direct or triggered
# every (check, target) of the stack's inventory
EXPECTED = {
    *((check, TX) for check in PROBE_CHECKS),
    *((check, INVITE) for check in ANALYSIS_CHECKS),
    ("mail.app.delivery", INVITE),
    ("mail.app.link", INVITE),
    ("mail.config.redirect", APPENV),
    ("mail.queue.backlog", QUEUE),
}
ANCHORS = {"probe": "#probe", "app": "#app-probe", "config": "#redirect", "queue": "#queue"}
REDIRECT_TO = "qa@example.test"
# What a receiving server of ours writes (trusted) and what a spoofer upstream writes.
TRUSTED_FAIL = (
    f'{mail.AUTHSERV_ID}; dkim=fail reason="signature verification failed" '
    f"header.d={MAIN}; spf=pass smtp.mailfrom={MAIN}; dmarc=fail header.from={MAIN}"
)
SPOOFED_PASS = f"evil.example; dkim=pass header.d={MAIN}; spf=pass; dmarc=pass"


# -- reading results per check AND target ----------------------------------------------------


def anchor_of(check_id: str) -> str:
    return ANCHORS[check_id.split(".")[1]]


def attachment_names(res: dict[str, Any]) -> set[str]:
    return {a["name"] for a in res.get("attachments", [])}


def attachment(run: CheckRun, res: dict[str, Any], name: str) -> str:
    (source,) = [a["source"] for a in res.get("attachments", []) if a["name"] == name]
    return (run.results_dir / source).read_text()


def parameters(res: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["value"] for p in res.get("parameters", [])}


def assert_fails(run: CheckRun, check_id: str, target: str, *fragments: str) -> str:
    res = run.by_check(check_id, target)
    msg = message(res)
    assert res["status"] == "failed", f"{check_id}[{target}] is {res['status']}: {msg}"
    assert msg.startswith(f"opsdrill_pytest.checks.CheckFailed: {target}: "), msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {check_id}[{target}] message: {msg}"
    anchor = anchor_of(check_id)
    assert f"(check {check_id}; runbook: docs/runbooks/email-deliverability.md{anchor})" in msg
    return msg


def assert_passes(run: CheckRun, check_id: str, target: str) -> None:
    res = run.by_check(check_id, target)
    assert res["status"] == "passed", f"{check_id}[{target}]: {res['status']}: {message(res)}"


def assert_broken(run: CheckRun, check_id: str, target: str, *fragments: str) -> str:
    """Broken (opsdrill could not judge), never failed, with every fragment in the message."""
    res = run.by_check(check_id, target)
    msg = message(res)
    assert res["status"] == "broken", f"{check_id}[{target}] is {res['status']}: {msg}"
    assert "CheckFailed" not in msg and "AssertionError" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {check_id}[{target}] message: {msg}"
    return msg


def assert_skipped(run: CheckRun, check_id: str, target: str, *fragments: str) -> str:
    """Skipped with a reason in plain words holding every fragment."""
    res = run.by_check(check_id, target)
    msg = message(res)
    assert res["status"] == "skipped", f"{check_id}[{target}] is {res['status']}: {msg}"
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {check_id}[{target}] reason: {msg}"
    return msg


def set_in_environment(key: str, var: str) -> str:
    """What ``Inventory.secret_setting`` says for a variable the test process exports."""
    return f"(fix: {key} = {var}, set in the environment)"


def assert_no_secrets(run: CheckRun, stack: Stack, *extra: str) -> None:
    """No secret of the stack (secrets.env, the app's .env secrets) or ``extra`` is in the
    run's output or any Allure result or attachment."""
    app_env = read_env_file(stack.stack.base / stack.data["secrets"]["app"]["env_file"])
    app_secrets = [
        v
        for k, v in app_env.items()
        if k in {"ENCRYPTION_KEY", "DATABASE_URL", "SMTP_PASSWORD", "PORTAL_API_TOKEN"}
    ]
    secrets = [*stack.secrets.values(), *app_secrets, *extra]
    assert len(secrets) >= 14
    texts = {"output": run.output}
    for path in run.results_dir.iterdir():
        texts[path.name] = path.read_text(errors="replace")
    leaks = [
        f"{s[:12]}... in {where}" for where, text in texts.items() for s in secrets if s in text
    ]
    assert leaks == []


def mail_checks(env: Env, keyword: str, *files: str) -> CheckRun:
    """The mail checks (all of them, or those of ``files``) whose id matches ``keyword``."""
    return env.run_checks(*files, extra=("-m", "mail", "-k", keyword))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rsa_public_b64(bits: int = 2048) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def duration_ms(res: dict[str, Any]) -> int:
    return int(res["stop"]) - int(res["start"])


def eml_names(res: dict[str, Any]) -> set[str]:
    return {n for n in attachment_names(res) if n.endswith(".eml")}


def mailbox(env: Env) -> ImapMailbox:
    """The probes' mailbox (probe@mailbox.test), as the checks open it."""
    return imap_mailbox(env.inv, next(iter(env.inv.model.probes)))


def still_there(env: Env, folder: str, uid: int) -> bool:
    with session(mailbox(env)) as box:
        select(box, folder, readonly=True)
        return uid in uid_search(box, f"UID {uid}")


def copy_probe(env: Env, name: str, source: str = "transactional") -> str:
    """A second probe ``name``, the same as ``source``; returns its target id."""
    env.rewrite(lambda d: d["probes"].update({name: copy.deepcopy(d["probes"][source])}))
    return f"probe:{name}"


def rewrite_probe(env: Env, name: str = "transactional", **changes: Any) -> None:
    """Update ``[probes.NAME]`` (nested tables by dotted key: ``smtp.port``)."""

    def mutate(data: dict[str, Any]) -> None:
        probe = data["probes"][name]
        for key, value in changes.items():
            section, _, leaf = key.rpartition(".")
            (probe[section] if section else probe)[leaf] = value

    env.rewrite(mutate)


# -- the healthy baseline ------------------------------------------------------------------


def test_healthy_stack_passes_every_mail_check_sharing_one_run_per_probe(env: Env) -> None:
    # as `make verify` runs them: two workers, a probe's checks grouped on one
    run = env.run_checks(extra=("-m", "mail", "-n", "2", "--dist", "loadgroup"))
    seen = {(labels(r)["check_id"], labels(r)["target"]): r for r in run.results}
    assert set(seen) == set(EXPECTED), sorted(seen)
    for (check_id, target), res in seen.items():
        lab = labels(res)
        if check_id == "mail.probe.auth_results":
            continue  # nothing to judge on a single-hop stack: skipped, see below
        assert res["status"] == "passed", f"{check_id}[{target}]: {message(res)}"
        assert lab["epic"] == "mail" and lab["severity"] in {"blocker", "critical", "normal"}
        anchor = anchor_of(check_id)
        assert [link["url"] for link in res["links"]] == [
            f"docs/runbooks/email-deliverability.md{anchor}"
        ]
        if check_id.startswith(("mail.probe.", "mail.app.")):
            names = attachment_names(res)
            assert "probe evidence" in names and "headers of interest" in names, names
            assert any(n.endswith(".eml") for n in names), names
    # The stack's Postfix accepts and delivers itself: no receiving server writes an
    # Authentication-Results header, so there is nothing to judge, and it says so.
    for target in (TX, INVITE):
        assert_skipped(
            run,
            "mail.probe.auth_results",
            target,
            f"{target}: nothing to judge: no Authentication-Results header from "
            f"{mail.AUTHSERV_ID}; the message carried no Authentication-Results header. A "
            "single-hop server",
            f"check the spelling of probes.{target.split(':')[1]}.trusted_authserv_ids",
            "require_auth_results = true to make this a failure",
        )
    title = seen[("mail.probe.delivery", TX)]["name"]
    assert title == (
        "probe transactional: message from crm@example.test reaches probe@mailbox.test's "
        "INBOX within 30 s"
    )
    # one probe run per probe: every check of a probe attached the same message
    for target in (TX, INVITE):
        emls = {n for (_, t), r in seen.items() if t == target for n in eml_names(r)}
        assert len(emls) == 1, (target, emls)
    latency = seen[("mail.probe.latency", TX)]
    assert 0 <= float(parameters(latency)["latency_s"]) <= 10
    assert '"latency_seconds"' in attachment(run, latency, "latency")
    spam = seen[("mail.probe.spam", TX)]
    assert "ALL_TRUSTED" in attachment(run, spam, "SpamAssassin rules that fired")
    dkim = attachment(run, seen[("mail.probe.dkim", TX)], "DKIM verdicts")
    assert '"aligned_pass": true' in dkim
    trigger = attachment(run, seen[("mail.app.delivery", INVITE)], "trigger response")
    assert '"status": 201' in trigger
    # the messages were deleted when the session ended
    for target in (TX, INVITE):
        evidence = json.loads(attachment(run, seen[("mail.probe.dkim", target)], "probe evidence"))
        received = evidence["received"]
        assert not still_there(env, received["folder"], received["uid"]), (target, received)
    assert_no_secrets(run, env.stack)
    assert run.returncode == 0, run.output[-2000:]


# -- sending -----------------------------------------------------------------------------------


@proves(broken=PROBE_CHECKS)
def test_postfix_down_is_broken_at_once_and_a_wrong_password_is_broken_naming_user_535_and_var(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong password of the probe's own submission account is opsdrill's credential
    refused: every check of the probe is broken (not failed), naming the user, the 535
    and the variable to fix, exactly like the server being down."""
    wrong = "wrong-smtp-password-5c1e0d"  # registered as a secret: must appear nowhere
    monkeypatch.setenv("MAILTEST_WRONG_SMTP_PASSWORD", wrong)
    port = closed_port()
    copy_probe(env, "badpass")
    rewrite_probe(env, "badpass", **{"smtp.password_env": "MAILTEST_WRONG_SMTP_PASSWORD"})
    rewrite_probe(env, **{"smtp.port": port})
    started = time.monotonic()
    run = mail_checks(env, "transactional or badpass", "check_mail_probe.py")
    assert time.monotonic() - started < 60, "a probe against a closed port must not hang"
    for check_id in PROBE_CHECKS:  # every check of the probe: broken, with the same reason
        res = run.by_check(check_id, TX)
        assert res["status"] == "broken", f"{check_id}: {res['status']}: {message(res)}"
        assert (
            f"SMTP 127.0.0.1:{port}: connection refused (while connecting, tls=starttls)"
            in message(res)
        )
    assert duration_ms(run.by_check("mail.probe.delivery", TX)) < 5000
    user = mail.SENDER.address
    smtp_port = env.data["probes"]["badpass"]["smtp"]["port"]
    fix = set_in_environment("probes.badpass.smtp.password_env", "MAILTEST_WRONG_SMTP_PASSWORD")
    for check_id in PROBE_CHECKS:  # the same reason on every check of the probe
        assert_broken(
            run,
            check_id,
            "probe:badpass",
            f"CredentialsRejected: probe:badpass: send: SMTP 127.0.0.1:{smtp_port} rejected "
            f"AUTH for user {user}: 535 ",
            f"opsdrill's own credentials were refused, so nothing could be checked {fix}",
        )
    assert run.returncode == 2  # broken, nothing failed
    assert_no_secrets(run, env.stack, wrong)


@proves(broken=[*PROBE_CHECKS, "mail.app.delivery", "mail.app.link"])
def test_wrong_imap_password_of_the_probe_mailbox_breaks_every_check_of_both_probes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-imap-password-7e4a19"
    var = "MAILTEST_WRONG_IMAP_PASSWORD"
    monkeypatch.setenv(var, wrong)
    for name in ("transactional", "portal-invite"):
        rewrite_probe(env, name, **{"imap.password_env": var})
    run = mail_checks(env, "transactional or portal", "check_mail_probe.py", "check_mail_app.py")
    port = env.data["probes"]["transactional"]["imap"]["port"]
    for target, check_ids in (
        (TX, PROBE_CHECKS),
        (INVITE, [*ANALYSIS_CHECKS, "mail.app.delivery", "mail.app.link"]),
    ):
        name = target.split(":")[1]
        for check_id in check_ids:
            assert_broken(
                run,
                check_id,
                target,
                f"CredentialsRejected: {target}: receive: IMAP 127.0.0.1:{port} rejected "
                f"LOGIN for user {mail.PROBE.address}: NO ",
                set_in_environment(f"probes.{name}.imap.password_env", var),
            )
            assert run.terminal(check_id, target) == "BROKEN"
    assert "failed" not in run.summary and run.summary["broken"] >= 9, run.summary
    assert run.returncode == 2, run.output[-2000:]  # broken only: exit 2, not 1
    assert_no_secrets(run, env.stack, wrong)


@proves(
    broken=[
        *ANALYSIS_CHECKS,
        "mail.app.delivery",
        "mail.app.link",
        "mail.queue.backlog",
        "mail.config.redirect",
    ]
)
def test_wrong_bearer_token_wrong_redis_password_and_an_unreadable_app_env_are_broken(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Things opsdrill could not judge, in one run: the trigger answers 401 to our bearer
    token, Redis refuses our password, a second queue's Redis is down (its right password
    must not leak through a traceback), the command that prints the application's
    environment fails (the container is gone)."""
    token, redis_password = "wrong-bearer-token-2b8f51", "wrong-redis-password-c90d33"
    monkeypatch.setenv("MAILTEST_WRONG_TOKEN", token)
    monkeypatch.setenv("MAILTEST_WRONG_REDIS_PASSWORD", redis_password)
    rewrite_probe(env, "portal-invite", **{"trigger.bearer_token_env": "MAILTEST_WRONG_TOKEN"})
    gone = "Error response from daemon: No such container: crm-web"
    down = closed_port()
    env.rewrite(
        lambda d: (
            d["queues"].update(down=copy.deepcopy(d["queues"]["email"])),
            d["queues"]["down"]["redis"].update(port=down),
            d["queues"]["email"]["redis"].update(password_env="MAILTEST_WRONG_REDIS_PASSWORD"),
            d["app_environment"].update(
                crm={"command": ["sh", "-c", f"echo '{gone}' >&2; exit 1"]}
            ),
        )
    )
    run = mail_checks(
        env,
        "portal or queue or appenv",
        "check_mail_app.py",
        "check_mail_config.py",
        "check_mail_probe.py",
    )
    url = env.data["probes"]["portal-invite"]["trigger"]["url"]
    for check_id in (*ANALYSIS_CHECKS, "mail.app.delivery", "mail.app.link"):
        assert_broken(
            run,
            check_id,
            INVITE,
            f"{INVITE}: trigger: POST {url} answered 401: the application refused the bearer "
            "token: ",
            set_in_environment(
                "probes.portal-invite.trigger.bearer_token_env", "MAILTEST_WRONG_TOKEN"
            ),
        )
    redis_port = env.data["queues"]["email"]["redis"]["port"]
    assert_broken(
        run,
        "mail.queue.backlog",
        QUEUE,
        f"CredentialsRejected: {QUEUE}: queue: Redis 127.0.0.1:{redis_port}/0 rejected the "
        "credentials: ",
        set_in_environment("queues.email.redis.password_env", "MAILTEST_WRONG_REDIS_PASSWORD"),
    )
    assert_broken(
        run, "mail.queue.backlog", "queue:down", f"Redis 127.0.0.1:{down}/0: ConnectionError"
    )
    assert_broken(
        run,
        "mail.config.redirect",
        APPENV,
        f"TargetUnreachable: {APPENV}: application env command sh: failed with exit code 1",
        "(fix: is the application running where app_environment.crm.command looks for it?)",
    )
    assert run.returncode == 2, run.output[-2000:]
    assert_no_secrets(run, env.stack, token, redis_password)


@proves(failed=["mail.probe.delivery", "mail.probe.latency"])
def test_message_never_delivered_fails_listing_what_was_searched_where(env: Env) -> None:
    rewrite_probe(env, timeout_seconds=5.0, max_latency_seconds=5.0)
    postfix = env.stack.stack.postfix()
    with postfix.delivery_deferred():
        started = time.monotonic()
        run = mail_checks(env, "transactional", "check_mail_probe.py")
        elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed
    port = env.data["probes"]["transactional"]["imap"]["port"]
    msg = assert_fails(
        run,
        "mail.probe.delivery",
        TX,
        "expected the message in INBOX within 5 s; SMTP accepted it at ",
        "(queue id ",
        "not found in INBOX, Junk of probe@mailbox.test at ",
        f"127.0.0.1:{port} after 5.0 s",
    )
    res = run.by_check("mail.probe.delivery", TX)
    searched = json.loads(attachment(run, res, "not found: what was searched where"))
    assert searched["searched_folders"] == ["INBOX", "Junk"]
    assert searched["sent"]["send"]["queue_id"] in msg
    assert_fails(run, "mail.probe.latency", TX, "no received message to verify: receive: ")
    # the transport was the fault: restored, the deferred message arrives (and is removed)
    token = searched["sent"]["send"]["token"]
    found = wait_for_message(mailbox(env), TokenMatch(token), folders=("INBOX",), timeout=20)
    delete_messages(mailbox(env), found.folder, [found.uid])
    assert_no_secrets(run, env.stack)


# -- DKIM and Authentication-Results -------------------------------------------------------------


@proves(failed=["mail.probe.dkim", "mail.probe.latency"])
def test_dkim_signing_disabled_fails_dkim_and_a_tiny_latency_budget_fails_latency(
    env: Env,
) -> None:
    rewrite_probe(env, max_latency_seconds=0.001)  # a real round trip takes milliseconds
    with env.stack.stack.opendkim().signing_disabled():
        run = mail_checks(env, "transactional", "check_mail_probe.py")
    assert_fails(
        run,
        "mail.probe.dkim",
        TX,
        f"expected a valid DKIM signature with d= aligned (relaxed) to the From domain {MAIN}",
        "found no DKIM-Signature header",
    )
    assert_passes(run, "mail.probe.delivery", TX)
    assert_skipped(run, "mail.probe.auth_results", TX, "nothing to judge")  # single hop
    assert_fails(
        run,
        "mail.probe.latency",
        TX,
        "expected the message visible at most 0.001 s after SMTP accepted it, found ",
        "in INBOX, detected by ",
    )
    latency = run.by_check("mail.probe.latency", TX)
    assert float(parameters(latency)["latency_s"]) > 0.001


@proves(failed=["mail.probe.dkim"])
def test_replaced_dkim_key_in_dns_fails_the_signature(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "sel1._domainkey", "TXT", f"v=DKIM1; k=rsa; p={rsa_public_b64()}")
    run = mail_checks(env, "transactional", "check_mail_probe.py")
    msg = assert_fails(run, "mail.probe.dkim", TX, f"found d={MAIN} s=sel1: fail (")
    assert "aligned" in msg
    verdicts = json.loads(attachment(run, run.by_check("mail.probe.dkim", TX), "DKIM verdicts"))
    assert verdicts["signatures"][0]["result"] == "fail"
    assert f"sel1._domainkey.{MAIN}" in verdicts["keys"]
    assert_passes(run, "mail.probe.delivery", TX)


@proves(failed=["mail.probe.dkim", "mail.probe.auth_results"])
def test_unaligned_from_fails_dkim_and_a_trusted_fail_beats_a_spoofed_pass(env: Env) -> None:
    """Two independent faults in one run: the From domain is not the signing domain (the
    signer signs @unaligned.test as d=example.test), and the message carries a trusted
    Authentication-Results saying dkim=fail below a spoofed one claiming pass."""
    unaligned = f"crm@{mail.UNALIGNED_DOMAIN}"  # the submission user may send as it
    rewrite_probe(env, from_address=unaligned)
    rules = [
        (r"^Subject: opsdrill probe ", f"Authentication-Results: {SPOOFED_PASS}"),
        (rf"^{PROBE_HEADER}: ", f"Authentication-Results: {TRUSTED_FAIL}"),
    ]
    with prepending_headers(env.stack.stack.postfix(), rules):
        run = mail_checks(env, "transactional", "check_mail_probe.py")
    assert_fails(
        run,
        "mail.probe.dkim",
        TX,
        f"to the From domain {mail.UNALIGNED_DOMAIN}",
        f"found d={MAIN} s=sel1: pass, but d={MAIN} does not align with the From domain "
        f"{mail.UNALIGNED_DOMAIN}",
    )
    assert_fails(
        run,
        "mail.probe.auth_results",
        TX,
        "reports them, found dkim=fail (signature verification failed), dmarc=fail",
        "ignored 1 header(s) from untrusted authserv-ids: evil.example claiming dkim=pass, "
        "spf=pass, dmarc=pass",
    )
    res = run.by_check("mail.probe.auth_results", TX)
    assert parameters(res)["trusted_headers"] == "1"
    report = json.loads(attachment(run, res, "Authentication-Results: trusted and ignored"))
    assert [h["authserv_id"] for h in report["trusted"]] == [mail.AUTHSERV_ID]
    (ignored,) = report["ignored"]
    assert ignored["authserv_id"] == "evil.example"
    assert "is not trusted" in ignored["why_ignored"]
    assert_passes(run, "mail.probe.delivery", TX)


@proves(failed=["mail.probe.auth_results"])
def test_auth_results_skips_when_no_trusted_header_exists_and_fails_where_one_is_required(
    env: Env,
) -> None:
    """The receiving side writes a passing Authentication-Results header. Three probes read
    the same kind of message: one trusts the right authserv-id (passes), one has a typo in
    trusted_authserv_ids (nothing to judge: skipped, saying what was looked for and what
    was seen), one has the same typo and require_auth_results = true (fails)."""
    typo = "mail.mailbox.tset"
    for name, required in (("typo", False), ("strict", True)):
        copy_probe(env, name)
        rewrite_probe(env, name, trusted_authserv_ids=[typo], require_auth_results=required)
    passing = (
        f"{mail.AUTHSERV_ID}; spf=pass smtp.mailfrom=crm@{MAIN}; dkim=pass header.d={MAIN}; "
        f"dmarc=pass header.from={MAIN}"
    )
    rules = [(rf"^{PROBE_HEADER}: ", f"Authentication-Results: {passing}")]
    with prepending_headers(env.stack.stack.postfix(), rules):
        run = mail_checks(env, "transactional or typo or strict", "check_mail_probe.py")
    assert_passes(run, "mail.probe.auth_results", TX)
    assert parameters(run.by_check("mail.probe.auth_results", TX))["trusted_headers"] == "1"
    seen = f"the message carried 1 header(s) from {mail.AUTHSERV_ID}, all ignored as untrusted"
    assert_skipped(
        run,
        "mail.probe.auth_results",
        "probe:typo",
        f"probe:typo: nothing to judge: no Authentication-Results header from {typo}; {seen}",
        "check the spelling of probes.typo.trusted_authserv_ids against the authserv-id",
        "probes.typo.require_auth_results = true to make this a failure",
    )
    assert_fails(
        run,
        "mail.probe.auth_results",
        "probe:strict",
        f"expected an Authentication-Results header from {typo} reporting spf, dkim or dmarc "
        f"(require_auth_results = true), found no Authentication-Results header from {typo}; "
        f"{seen}",
        "is probes.strict.trusted_authserv_ids spelt as it writes its authserv-id?",
    )
    for target in (TX, "probe:typo", "probe:strict"):
        assert_passes(run, "mail.probe.delivery", target)
    assert run.terminal("mail.probe.auth_results", "probe:typo") == "SKIPPED"
    assert run.terminal("mail.probe.auth_results", "probe:strict") == "FAILED"
    assert run.summary["failed"] == 1, run.summary
    assert run.returncode == 1


# -- where it lands, and how spammy it looks --------------------------------------------------


@proves(failed=["mail.probe.delivery", "mail.probe.spam"])
def test_junk_filing_fails_delivery_and_a_score_over_the_threshold_fails_spam(env: Env) -> None:
    rewrite_probe(env, **{"spamd.max_score": -5.0})  # the healthy message scores -1.0
    dovecot = env.stack.stack.dovecot()
    with dovecot.filing_into_junk(mail.PROBE.address, header=PROBE_HEADER):
        run = mail_checks(env, "transactional", "check_mail_probe.py")
    assert_fails(
        run,
        "mail.probe.delivery",
        TX,
        "expected the message in INBOX, found it in Junk, a junk folder of probe@mailbox.test",
    )
    assert_fails(
        run,
        "mail.probe.spam",
        TX,
        "expected a SpamAssassin score below -5 (spamd 127.0.0.1:",
        "found -1; rules that fired: ALL_TRUSTED -1.0",
    )
    spam = run.by_check("mail.probe.spam", TX)
    assert parameters(spam)["score"] == "-1.0"
    assert "ALL_TRUSTED" in attachment(run, spam, "SpamAssassin rules that fired")
    assert_passes(run, "mail.probe.latency", TX)  # found in Junk, in time
    assert_passes(run, "mail.probe.dkim", TX)


# -- the application, its environment, its queue ---------------------------------------------


def bullmq(env: Env) -> BullMQ:
    """A fresh queue of the worker's Redis, driven by the real BullMQ package, and the
    inventory's [queues.email] pointed at it (the stack's own queue stays healthy)."""
    name = f"email-{uuid.uuid4().hex[:8]}"
    env.rewrite(lambda d: d["queues"]["email"].update(queue=name))
    port = env.stack.stack.redis().port
    return BullMQ(port, env.stack.secrets["OPSDRILL_REDIS_PASSWORD"], queue=name)


@proves(failed=["mail.app.link", "mail.queue.backlog"])
def test_missing_activation_link_fails_link_and_a_backlog_fails_the_queue(env: Env) -> None:
    app = env.stack.stack.demo_app()
    with app.without_activation_link(), bullmq(env).scratch() as queue:
        queue.add(200, age_seconds=3600)  # Queue.addBulk, created an hour ago
        run = mail_checks(env, "portal or queue", "check_mail_app.py", "check_mail_config.py")
    assert_fails(
        run,
        "mail.app.link",
        INVITE,
        "expected a link matching 'https?://\\S+/activate\\?token=[A-Za-z0-9_-]+' in the "
        "message, found no such link (links in the message: none)",
    )
    assert_passes(run, "mail.app.delivery", INVITE)
    assert_fails(
        run,
        "mail.queue.backlog",
        QUEUE,
        f"queue bull:{queue.queue}: 200 jobs waiting (threshold 100): is the worker running?",
        "s old (threshold 600 s)",
    )
    res = run.by_check("mail.queue.backlog", QUEUE)
    assert parameters(res)["waiting"] == "200"
    assert float(parameters(res)["oldest_age_s"]) >= 3600


@proves(failed=["mail.queue.backlog"])
def test_overdue_delayed_failed_and_paused_jobs_of_a_real_bullmq_queue_fail_the_backlog(
    env: Env,
) -> None:
    """The issue's queue, built with BullMQ itself: 200 jobs a worker failed, then no
    worker, 500 delayed jobs due in an hour and 300 due an hour ago (only a worker
    promotes a due job: they wait forever). Nothing is in the wait list, so counting
    waiting jobs alone passed it. Then a paused queue holding jobs. Every count is in the
    evidence and equals BullMQ's own getJobCounts."""
    with bullmq(env).scratch() as queue:
        queue.fail(200)  # a real Worker, one attempt each: 535 from the "provider"
        queue.add(500, delay_ms=3_600_000)
        counts = queue.add(300, delay_ms=1000, age_seconds=3600)["counts"]
        assert counts["delayed"] == 800 and counts["failed"] == 200 and counts["wait"] == 0
        run = mail_checks(env, "queue", "check_mail_config.py")
        where = f"queue bull:{queue.queue}"
        assert_fails(
            run,
            "mail.queue.backlog",
            QUEUE,
            f"{where}: 300 delayed jobs overdue by more than 60 s, the oldest due 3",
            "(threshold 0): only a worker moves a due job to wait, so no worker is running",
            f"{where}: 200 jobs failed in the last 3600 s (threshold 10): the worker runs but "
            "sending fails",
        )
        res = run.by_check("mail.queue.backlog", QUEUE)
        shown = parameters(res)
        assert {k: shown[k] for k in ("waiting", "delayed", "overdue", "failed")} == {
            "waiting": "0",
            "delayed": "800",
            "overdue": "300",
            "failed": "200",
        }
        evidence = json.loads(attachment(run, res, "backlog"))
        for state, key in (("wait", "wait"), ("delayed", "delayed"), ("failed", "failed_total")):
            assert evidence[key] == counts[state], (state, evidence)
        assert evidence["thresholds"]["max_overdue"] == 0
        queue.obliterate()
        queue.add(5, priority=2)
        queue.add(3)
        counts = queue.pause()["counts"]
        paused = mail_checks(env, "queue", "check_mail_config.py")
    assert counts["paused"] == 3 and counts["prioritized"] == 5
    assert_fails(
        paused,
        "mail.queue.backlog",
        QUEUE,
        f"{where}: 3 jobs held in the paused list (threshold 0): the queue is paused and "
        "sends nothing",
        "(the queue is paused)",
    )
    shown = parameters(paused.by_check("mail.queue.backlog", QUEUE))
    assert (shown["paused"], shown["prioritized"], shown["waiting"]) == ("3", "5", "0")


@proves(failed=["mail.app.delivery", "mail.app.link", "mail.probe.latency"])
def test_application_answering_500_or_sending_nothing_fails_app_delivery(env: Env) -> None:
    """The application itself is wrong: its invite endpoint answers 500, or answers 201
    and never sends (a worker that loses the job). Both fail mail.app.delivery, and the
    checks that judge the received copy fail pointing at it."""
    rewrite_probe(env, "portal-invite", timeout_seconds=5.0, max_latency_seconds=5.0)
    app = env.stack.stack.demo_app()
    url = env.data["probes"]["portal-invite"]["trigger"]["url"]
    with app.failing_invites(500):
        erroring = mail_checks(env, "portal", "check_mail_app.py", "check_mail_probe.py")
    assert_fails(
        erroring,
        "mail.app.delivery",
        INVITE,
        f"expected a 2xx answer from the trigger, found trigger: POST {url} answered 500 "
        "(expected 2xx): ",
        "the invitation was not sent",
    )
    for check_id in ("mail.app.link", "mail.probe.latency"):
        assert_fails(
            erroring,
            check_id,
            INVITE,
            f"no received message to verify: trigger: POST {url} answered 500",
            "(see mail.app.delivery)",
        )
    assert erroring.returncode == 1
    with app.dropping_invites():
        started = time.monotonic()
        silent = mail_checks(env, "portal", "check_mail_app.py")
    assert time.monotonic() - started < 60
    assert_fails(
        silent,
        "mail.app.delivery",
        INVITE,
        "expected the application's message in INBOX within 5 s; the trigger answered 201, then ",
        f"not found in INBOX, Junk of {mail.PROBE.address} at ",
    )
    assert silent.returncode == 1
    assert_no_secrets(erroring, env.stack)


@proves(failed=["mail.config.redirect"])
def test_redirect_set_fails_showing_the_address_even_after_the_bundle_masked_it(
    stack: Stack, tmp_path: Path
) -> None:
    """The secrets-bundle checks register every .env value for redaction, the redirect
    address included; in the same process, the redirect check still shows the address."""
    from opsdrill.secrets.bundle import backup_bundle

    with stack.stack.demo_app().redirecting(REDIRECT_TO):
        env = derive(stack, tmp_path)  # its own copy of the .env, redirect included
    assert (
        f"EMAIL_REDIRECT_TO={REDIRECT_TO}"
        in Path(env.data["secrets"]["app"]["env_file"]).read_text()
    )
    backup_bundle(env.inv, "app")
    run = env.run_checks(
        "check_secrets_bundle.py", "check_mail_config.py", extra=("-k", "not queue")
    )
    bundle = run.by_check("secrets.bundle.encryption_key", "secrets:app")
    assert bundle["status"] == "passed", message(bundle)  # it read (and registered) the .env
    res = run.by_check("mail.config.redirect", APPENV)
    assert bundle["stop"] <= res["start"]  # ... before the redirect check ran
    msg = assert_fails(
        run,
        "mail.config.redirect",
        APPENV,
        f"expected EMAIL_REDIRECT_TO unset in production, found EMAIL_REDIRECT_TO={REDIRECT_TO} "
        f"in env file {env.data['app_environment']['crm']['env_file']}",
        "instead of to its recipient",
    )
    assert "***" not in msg
    evidence = json.loads(attachment(run, res, "application environment"))
    assert evidence["set"] == [f"EMAIL_REDIRECT_TO={REDIRECT_TO}"]
    assert "SMTP_PASSWORD" in evidence["keys_present"]
    assert_no_secrets(run, stack)


@proves(failed=["mail.config.redirect"])
def test_redirect_set_to_something_else_than_an_address_is_not_shown(env: Env) -> None:
    planted = "opsdrill-planted-3b9f-not-an-address"
    app_env = Path(env.data["app_environment"]["crm"]["env_file"])
    assert app_env != stack_app_env(env)  # this test's own copy
    app_env.write_text(app_env.read_text() + f"EMAIL_REDIRECT_TO={planted}\n")
    run = mail_checks(env, "appenv", "check_mail_config.py")
    assert_fails(
        run,
        "mail.config.redirect",
        APPENV,
        f"found EMAIL_REDIRECT_TO (set, {len(planted)} characters; not an address: not shown)",
    )
    assert_no_secrets(run, env.stack, planted)


def stack_app_env(env: Env) -> Path:
    return env.stack.stack.base / env.stack.data["app_environment"]["crm"]["env_file"]


# -- provider migration: a resolver that never answers ----------------------------------------


@proves(broken=["migration.dkim", "migration.spf", "migration.dmarc"])
def test_resolver_timeout_during_a_migration_breaks_the_migration_checks(env: Env) -> None:
    """During an open migration window the migration checks ask DNS; a resolver that never
    answers leaves them unable to judge: broken, not failed (and not skipped)."""
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=14)
    env.rewrite(
        lambda d: d["sending_domains"][MAIN].update(
            migration={"from": "relay-one", "to": "relay-two", "until": until}
        )
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives the queries, never answers
        port = silent.getsockname()[1]
        env.rewrite(
            lambda d: d["dns"].update(nameservers=["127.0.0.1"], port=port, timeout_seconds=0.3)
        )
        run = env.run_checks("check_mail_migration.py", extra=("-m", "migration", "-k", MAIN))
    for check_id in ("migration.dkim", "migration.spf", "migration.dmarc"):
        assert_broken(run, check_id, f"dns:{MAIN}", f"timed out asking 127.0.0.1:{port}")
    assert run.returncode == 2, run.output[-2000:]


# -- a triggered run's message is its own ------------------------------------------------------


def in_background(fn: Callable[[], CheckRun]) -> Callable[[], CheckRun]:
    """Start ``fn`` (a check run: a subprocess) in a thread; the returned call joins it."""
    out: list[CheckRun] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()

    def join() -> CheckRun:
        thread.join(timeout=300)
        assert out, "the check run did not finish"
        return out[0]

    return join


def wait_for_invites(env: Env, count: int, timeout: float = 90.0) -> None:
    """Until the application has logged ``count`` invite requests (runs have triggered)."""
    app = env.stack.stack.demo_app()
    deadline = time.monotonic() + timeout
    while app.invites_received() < count:
        assert time.monotonic() < deadline, f"fewer than {count} invite requests in {timeout} s"
        time.sleep(0.1)


def evidence_of(run: CheckRun, target: str = INVITE) -> dict[str, Any]:
    res = run.by_check("mail.app.delivery", target)
    return dict(json.loads(attachment(run, res, "probe evidence")))


def invite(env: Env, name: str) -> None:
    """What another run's trigger does: POST an invitation for ``name``."""
    trigger = env.data["probes"]["portal-invite"]["trigger"]
    body = json.dumps({"email": mail.PROBE.address, "name": name}).encode()
    token = env.stack.secrets[trigger["bearer_token_env"]]
    request = urllib.request.Request(
        trigger["url"],
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 201


def test_two_triggered_runs_at_once_each_claim_their_own_invitation(env: Env) -> None:
    """Two CI jobs at once: the application holds both invitations (a stopped worker)
    until both runs have noted the mailbox and triggered, then sends both. Matching by
    recipient, subject and time, both runs claimed the first to arrive; each run's token,
    carried as the invitee's name, makes each claim its own."""
    app = env.stack.stack.demo_app()
    before = app.invites_received()
    with app.holding_invites():
        runs = [in_background(lambda: mail_checks(env, "portal", "check_mail_app.py"))]
        runs.append(in_background(lambda: mail_checks(env, "portal", "check_mail_app.py")))
        wait_for_invites(env, before + 2)
    first, second = (join() for join in runs)
    for run in (first, second):
        assert_passes(run, "mail.app.delivery", INVITE)
        assert_passes(run, "mail.app.link", INVITE)
    one, other = evidence_of(first), evidence_of(second)
    assert one["received"]["uid"] != other["received"]["uid"], (one["received"], other)
    assert one["token"] != other["token"]
    for run, mine, theirs in ((first, one, other), (second, other, one)):
        res = run.by_check("mail.app.delivery", INVITE)
        (eml,) = eml_names(res)
        raw = attachment(run, res, eml)
        assert mine["token"] in raw and theirs["token"] not in raw
        assert f"Hello Probe {mine['token']}," in raw
    assert first.returncode == 0 and second.returncode == 0


@proves(failed=["mail.app.delivery"])
def test_a_trigger_that_sends_nothing_never_claims_another_runs_invitation(env: Env) -> None:
    """Another run's invitation arrives while this run waits, after its trigger (newer
    UID, in its time window, same recipient and subject): this run's application sent
    nothing, so it must fail, not pass on the other run's message."""
    rewrite_probe(env, "portal-invite", timeout_seconds=8.0, max_latency_seconds=8.0)
    app = env.stack.stack.demo_app()
    other = new_run_token()
    before = app.invites_received()
    with app.holding_invites():
        invite(env, f"Probe {other}")  # the other run's, held by the application
        with app.dropping_invites():  # this run's: answered 201, never sent
            join = in_background(lambda: mail_checks(env, "portal", "check_mail_app.py"))
            wait_for_invites(env, before + 2)
            app.release_invites()  # the other run's invitation arrives now
            run = join()
    msg = assert_fails(
        run,
        "mail.app.delivery",
        INVITE,
        "expected the application's message in INBOX within 8 s; the trigger answered 201, "
        "then receive: a message to probe@mailbox.test showing this run's token opsdrill-",
        f"not found in INBOX, Junk of {mail.PROBE.address} at ",
    )
    assert other not in msg
    # the other run's invitation arrived, and was left alone for its own run
    found = wait_for_message(
        mailbox(env), TokenMatch(other, header="To"), folders=("INBOX",), timeout=10
    )
    delete_messages(mailbox(env), found.folder, [found.uid])
    assert run.returncode == 1


def invitation_bytes(to: str, subject: str, body: str) -> bytes:
    return (
        f"From: Example CRM <{mail.SENDER.address}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Tue, 01 Dec 2026 09:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@example.test>"
        f"\r\n\r\n{body}\r\n"
    ).encode()


def test_orphaned_invitations_of_earlier_runs_are_swept_and_real_mail_is_kept(
    env: Env,
) -> None:
    """A run that crashed, or whose message came after it gave up, leaves its invitation
    behind. The next run deletes those older than sweep_after_minutes that show a run
    token's shape, and keeps everything else: a young one (a run in progress) and an old
    invitation without a token (real mail)."""
    dovecot = env.stack.stack.dovecot()
    subject = "You're invited to the Example CRM portal"
    orphan, young = new_run_token(), new_run_token()
    real = uuid.uuid4().hex
    hours_ago = time.time() - 7200
    planted = dovecot.plant_messages(
        mail.PROBE.address,
        [invitation_bytes(f'"Probe {orphan}" <{mail.PROBE.address}>', subject, "Hello")],
        delivered=hours_ago,
    )
    planted += dovecot.plant_messages(
        mail.PROBE.address,
        [invitation_bytes(mail.PROBE.address, subject, f"Hello {real}")],
        delivered=hours_ago,
    )
    planted += dovecot.plant_messages(
        mail.PROBE.address,
        [invitation_bytes(f'"Probe {young}" <{mail.PROBE.address}>', subject, "Hello")],
        delivered=time.time() - 60,
    )
    try:
        run = mail_checks(env, "portal and arrives", "check_mail_app.py")
        assert_passes(run, "mail.app.delivery", INVITE)
        assert evidence_of(run)["swept_stale_probes"] == 1
        with session(mailbox(env)) as box:
            select(box, "INBOX", readonly=True)
            assert uid_search(box, f'TEXT "{orphan}"') == []
            assert len(uid_search(box, f'TEXT "{young}"')) == 1
            assert len(uid_search(box, f'TEXT "{real}"')) == 1
    finally:
        dovecot.remove_planted(planted)


# -- Microsoft 365's Authentication-Results: no authserv-id, trusted by position --------------


@proves(failed=["mail.probe.auth_results"])
def test_microsoft_365_results_without_authserv_id_are_judged_when_topmost(env: Env) -> None:
    """The receiving side writes Microsoft's shape (no authserv-id) reporting a DKIM and
    DMARC failure; below it, the same shape claims everything passed. With
    trust_topmost_without_id the topmost counts and fails the check; the lower one is
    ignored. Without it, nothing can be trusted: skipped, saying what to set."""
    copy_probe(env, "m365")
    rewrite_probe(env, "m365", trusted_authserv_ids=[], trust_topmost_without_id=True)
    top = (
        "Authentication-Results: spf=pass (sender IP is 127.0.0.1) "
        f"smtp.mailfrom={MAIN}; dkim=fail (body hash did not verify) header.d={MAIN};"
        f"dmarc=fail action=oreject header.from={MAIN};compauth=fail reason=000"
    )
    below = (
        "Authentication-Results: spf=pass (sender IP is 127.0.0.1) "
        f"smtp.mailfrom={MAIN}; dkim=pass (signature was verified) header.d={MAIN};"
        f"dmarc=pass action=none header.from={MAIN};compauth=pass reason=100"
    )
    rules = [(r"^Subject: opsdrill probe ", top), (rf"^{PROBE_HEADER}: ", below)]
    with prepending_headers(env.stack.stack.postfix(), rules):
        run = mail_checks(env, "transactional or m365", "check_mail_probe.py")
    assert_fails(
        run,
        "mail.probe.auth_results",
        "probe:m365",
        "the topmost header without an authserv-id) reports them, found dkim=fail, dmarc=fail",
        "ignored 1 header(s) from untrusted authserv-ids: (no authserv-id) claiming spf=pass, "
        "dkim=pass, dmarc=pass, compauth=pass",
    )
    res = run.by_check("mail.probe.auth_results", "probe:m365")
    report = json.loads(attachment(run, res, "Authentication-Results: trusted and ignored"))
    (trusted,) = report["trusted"]
    assert trusted["authserv_id"] is None and trusted["index"] == 0
    assert "not the topmost header" in report["ignored"][0]["why_ignored"]
    # the stack's own id is trusted by name, and neither header carries it
    assert_skipped(
        run,
        "mail.probe.auth_results",
        TX,
        "the message carried 2 header(s) from (no authserv-id), all ignored as untrusted",
    )
    assert_passes(run, "mail.probe.delivery", "probe:m365")


# -- thousands of stale probe messages -----------------------------------------------------


def test_sweep_of_15000_stale_probe_messages_runs_in_batches(env: Env) -> None:
    """Runs that crashed before their cleanup left 15,000 probe messages. Swept with every
    stale UID in one command, the line exceeded Dovecot's limit and every later run
    failed; swept in batches, one run removes them all and the probe passes."""
    copy_probe(env, "sweeper")
    rewrite_probe(
        env,
        "sweeper",
        to_address=mail.OPS.address,
        **{
            "imap.user": mail.OPS.address,
            "imap.password_env": mail.OPS.password_env,
            "imap.timeout_seconds": 60.0,
        },
    )
    dovecot = env.stack.stack.dovecot()
    stale = [
        f"From: {mail.SENDER.address}\r\nTo: {mail.OPS.address}\r\n{PROBE_HEADER}: stale-{i}\r\n"
        f"Subject: opsdrill probe stale-{i}\r\n\r\nleft behind by a crashed run\r\n".encode()
        for i in range(15_000)
    ]
    planted = dovecot.plant_messages(mail.OPS.address, stale, delivered=time.time() - 7200)
    ops = ImapMailbox(
        "127.0.0.1",
        env.data["probes"]["sweeper"]["imap"]["port"],
        "tls",
        mail.OPS.address,
        env.stack.secrets[mail.OPS.password_env],
        ca_file=env.data["probes"]["sweeper"]["imap"]["ca_file"],
        timeout=120,
    )
    try:
        with session(ops) as box:  # Dovecot indexes the new files once, here
            select(box, "INBOX", readonly=True)
            assert len(uid_search(box, f'HEADER {PROBE_HEADER} ""')) >= 15_000
        run = mail_checks(env, "sweeper and reaches", "check_mail_probe.py")
        assert_passes(run, "mail.probe.delivery", "probe:sweeper")
        res = run.by_check("mail.probe.delivery", "probe:sweeper")
        assert json.loads(attachment(run, res, "probe evidence"))["swept_stale_probes"] == 15_000
        with session(ops) as box:
            select(box, "INBOX", readonly=True)
            assert uid_search(box, f'HEADER {PROBE_HEADER} "stale-"') == []
    finally:
        dovecot.remove_planted(planted)


# -- TLS without verification, and an untrusted certificate ---------------------------------


@proves(broken=PROBE_CHECKS)
def test_verify_false_warns_on_every_check_and_an_untrusted_certificate_names_ca_file(
    env: Env,
) -> None:
    """verify = false gave green checks and no word about it: now every check of that
    probe carries the warning (Allure attachment and parameter, the terminal's warnings
    summary). Without the CA that issued the stack's certificate, the checks are broken
    and the message names the ca_file key to set, never verify = false."""
    copy_probe(env, "noca")
    env.rewrite(lambda d: d["probes"]["noca"]["imap"].pop("ca_file"))
    rewrite_probe(env, **{"smtp.verify": False, "imap.verify": False})
    run = mail_checks(env, "transactional or noca", "check_mail_probe.py")
    for check_id in PROBE_CHECKS:
        res = run.by_check(check_id, TX)
        assert res["status"] in ("passed", "skipped"), (check_id, message(res))
        text = attachment(run, res, "TLS verification disabled")
        assert "probe:transactional: TLS certificate verification is OFF: " in text
        assert "probes.transactional.smtp.verify = false (127.0.0.1)" in text
        assert "probes.transactional.imap.verify = false (127.0.0.1)" in text
        shown = parameters(res)["tls_verify"].strip("'")  # Allure shows a repr
        assert shown == "OFF: probes.transactional.smtp.verify, probes.transactional.imap.verify"
    assert "InsecureTlsWarning: probe:transactional: TLS certificate verification is OFF" in (
        run.output
    )
    warned = run.output.split("warnings summary", 1)[1]
    for func in ("check_probe_reaches_the_inbox", "check_probe_latency_within_threshold"):
        assert f"{func}[probe:transactional]" in warned
    port = env.data["probes"]["noca"]["imap"]["port"]
    for check_id in PROBE_CHECKS:
        assert_broken(
            run,
            check_id,
            "probe:noca",
            f"IMAP 127.0.0.1:{port}: TLS certificate verification failed: ",
            "the server's certificate is not trusted (fix: set probes.noca.imap.ca_file to the "
            "PEM file of the CA that issued it",
            "do not set verify = false)",
        )
    assert run.returncode == 2


def test_inventory_check_warns_for_verify_false_towards_another_host(env: Env) -> None:
    rewrite_probe(env, **{"smtp.host": "smtp.example.net", "smtp.verify": False})
    rewrite_probe(env, **{"imap.verify": False})  # loopback: the local stack, no warning
    checked = opsdrill("inventory", "check", str(env.path))
    assert checked.returncode == 0, checked.stderr
    assert (
        "warning: probes.transactional.smtp.verify = false for smtp.example.net: TLS without "
        "certificate checks, so anyone on the path can pose as smtp.example.net and read the "
        "password"
    ) in checked.stderr
    assert "(fix: set probes.transactional.smtp.ca_file to the CA" in checked.stderr
    assert "imap.verify" not in checked.stderr


# -- EMAIL_REDIRECT_TO in the shapes the application's dotenv applies ----------------------


@proves(failed=["mail.config.redirect"])
@pytest.mark.parametrize("shape", ["bom", "export-tab"])
def test_redirect_after_a_byte_order_mark_or_as_export_tab_is_caught(
    stack: Stack, tmp_path: Path, shape: Any
) -> None:
    """The application's dotenv applies EMAIL_REDIRECT_TO written on the first line after
    a UTF-8 byte-order mark, and as ``export<TAB>EMAIL_REDIRECT_TO=``: the stand-in
    application really redirects its invitation, and the check reads the file the same
    way and fails."""
    app = stack.stack.demo_app()
    with app.redirecting(mail.OPS.address, shape):
        written = app.env_file.read_bytes()
        env = derive(stack, tmp_path)  # its own copy of the .env, redirect included
        subject = f"[{mail.PROBE.address}]"
        invite(env, "Probe redirected")
        ops = ImapMailbox(
            "127.0.0.1",
            env.data["probes"]["transactional"]["imap"]["port"],
            "tls",
            mail.OPS.address,
            stack.secrets[mail.OPS.password_env],
            ca_file=env.data["probes"]["transactional"]["imap"]["ca_file"],
        )
        found = wait_for_message(
            ops, TokenMatch(subject, header="Subject"), folders=("INBOX",), timeout=15
        )
        delete_messages(ops, found.folder, [found.uid])
    if shape == "bom":
        assert written.startswith(b"\xef\xbb\xbfEMAIL_REDIRECT_TO=")
    else:
        assert b"\nexport\tEMAIL_REDIRECT_TO=" in written
    run = mail_checks(env, "appenv", "check_mail_config.py")
    assert_fails(
        run,
        "mail.config.redirect",
        APPENV,
        f"expected EMAIL_REDIRECT_TO unset in production, found "
        f"EMAIL_REDIRECT_TO={mail.OPS.address} in env file",
    )
    assert_no_secrets(run, stack)
