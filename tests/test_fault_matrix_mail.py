"""Every mail check can fail: break one thing on the worker's real mail stack (Postfix,
OpenDKIM, Dovecot, Knot, spamd, the demo application, Redis), run the real checks
(subprocess, Allure results) and assert the named check FAILS with a message naming the
fault, or is BROKEN when a server cannot be reached, and never hangs.

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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fixtures.mail import mail_targets
from opsdrill.inventory import read_env_file
from opsdrill.mail import (
    PROBE_HEADER,
    ImapMailbox,
    TokenMatch,
    delete_messages,
    session,
    wait_for_message,
)
from opsdrill.mail.imap import select, uid_search
from opsdrill.stack import demo_dns, mail
from opsdrill.stack.header_checks import prepending_headers
from opsdrill.stack.knot import KnotServer
from tests.conftest import CheckRun, Env, Stack, derive

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


@pytest.fixture
def knot(stack: Stack) -> Iterator[KnotServer]:
    """The worker's DNS server; every zone is reloaded from its file afterwards."""
    server = stack.stack.knot()
    try:
        yield server
    finally:
        server.restore_all()


# -- reading results per check AND target ----------------------------------------------------


def anchor_of(check_id: str) -> str:
    return ANCHORS[check_id.split(".")[1]]


def labels(res: dict[str, Any]) -> dict[str, str]:
    return {lab["name"]: lab["value"] for lab in res["labels"] if lab["name"] != "tag"}


def result(run: CheckRun, check_id: str, target: str) -> dict[str, Any]:
    for res in run.results:
        lab = labels(res)
        if lab.get("check_id") == check_id and lab.get("target") == target:
            return res
    got = sorted(f"{labels(r).get('check_id')}[{labels(r).get('target')}]" for r in run.results)
    raise AssertionError(f"no result for {check_id}[{target}]; got {got}\n{run.output[-3000:]}")


def message(res: dict[str, Any]) -> str:
    return str(res.get("statusDetails", {}).get("message", ""))


def attachment_names(res: dict[str, Any]) -> set[str]:
    return {a["name"] for a in res.get("attachments", [])}


def attachment(run: CheckRun, res: dict[str, Any], name: str) -> str:
    (source,) = [a["source"] for a in res.get("attachments", []) if a["name"] == name]
    return (run.results_dir / source).read_text()


def parameters(res: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["value"] for p in res.get("parameters", [])}


def assert_fails(run: CheckRun, check_id: str, target: str, *fragments: str) -> str:
    res = result(run, check_id, target)
    msg = message(res)
    assert res["status"] == "failed", f"{check_id}[{target}] is {res['status']}: {msg}"
    assert msg.startswith(f"fixtures.checks.CheckFailed: {target}: "), msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {check_id}[{target}] message: {msg}"
    anchor = anchor_of(check_id)
    assert f"(check {check_id}; runbook: docs/runbooks/email-deliverability.md{anchor})" in msg
    return msg


def assert_passes(run: CheckRun, check_id: str, target: str) -> None:
    res = result(run, check_id, target)
    assert res["status"] == "passed", f"{check_id}[{target}]: {res['status']}: {message(res)}"


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
    return mail_targets(env.inv).probes[0].mailbox()


def still_there(env: Env, folder: str, uid: int) -> bool:
    with session(mailbox(env)) as box:
        select(box, folder, readonly=True)
        return uid in uid_search(box, f"UID {uid}")


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


def test_postfix_down_is_broken_at_once_and_a_wrong_password_fails_naming_user_and_535(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-smtp-password-5c1e0d"  # registered as a secret: must appear nowhere
    monkeypatch.setenv("MAILTEST_WRONG_SMTP_PASSWORD", wrong)
    port = closed_port()
    env.rewrite(lambda d: d["probes"].update(badpass=copy.deepcopy(d["probes"]["transactional"])))
    rewrite_probe(env, "badpass", **{"smtp.password_env": "MAILTEST_WRONG_SMTP_PASSWORD"})
    rewrite_probe(env, **{"smtp.port": port})
    started = time.monotonic()
    run = mail_checks(env, "transactional or badpass", "check_mail_probe.py")
    assert time.monotonic() - started < 60, "a probe against a closed port must not hang"
    for check_id in PROBE_CHECKS:  # every check of the probe: broken, with the same reason
        res = result(run, check_id, TX)
        assert res["status"] == "broken", f"{check_id}: {res['status']}: {message(res)}"
        assert (
            f"SMTP 127.0.0.1:{port}: connection refused (while connecting, tls=starttls)"
            in message(res)
        )
    assert duration_ms(result(run, "mail.probe.delivery", TX)) < 5000
    user = mail.SENDER.address
    assert_fails(
        run,
        "mail.probe.delivery",
        "probe:badpass",
        "the probe could not be sent: send: SMTP 127.0.0.1:",
        f"rejected AUTH for user {user}: 535",
    )
    assert_fails(
        run,
        "mail.probe.dkim",
        "probe:badpass",
        "no received message to verify: send: SMTP 127.0.0.1:",
        "(see mail.probe.delivery)",
    )
    assert run.returncode == 1  # a failure outranks the broken checks
    assert_no_secrets(run, env.stack, wrong)


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
    res = result(run, "mail.probe.delivery", TX)
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
    assert_passes(run, "mail.probe.auth_results", TX)
    assert_fails(
        run,
        "mail.probe.latency",
        TX,
        "expected the message visible at most 0.001 s after SMTP accepted it, found ",
        "in INBOX, detected by ",
    )
    latency = result(run, "mail.probe.latency", TX)
    assert float(parameters(latency)["latency_s"]) > 0.001


def test_replaced_dkim_key_in_dns_fails_the_signature(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "sel1._domainkey", "TXT", f"v=DKIM1; k=rsa; p={rsa_public_b64()}")
    run = mail_checks(env, "transactional", "check_mail_probe.py")
    msg = assert_fails(run, "mail.probe.dkim", TX, f"found d={MAIN} s=sel1: fail (")
    assert "aligned" in msg
    verdicts = json.loads(attachment(run, result(run, "mail.probe.dkim", TX), "DKIM verdicts"))
    assert verdicts["signatures"][0]["result"] == "fail"
    assert f"sel1._domainkey.{MAIN}" in verdicts["keys"]
    assert_passes(run, "mail.probe.delivery", TX)


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
    res = result(run, "mail.probe.auth_results", TX)
    assert parameters(res)["trusted_headers"] == "1"
    report = json.loads(attachment(run, res, "Authentication-Results: trusted and ignored"))
    assert [h["authserv_id"] for h in report["trusted"]] == [mail.AUTHSERV_ID]
    (ignored,) = report["ignored"]
    assert ignored["authserv_id"] == "evil.example"
    assert "is not trusted" in ignored["why_ignored"]
    assert_passes(run, "mail.probe.delivery", TX)


# -- where it lands, and how spammy it looks --------------------------------------------------


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
    spam = result(run, "mail.probe.spam", TX)
    assert parameters(spam)["score"] == "-1.0"
    assert "ALL_TRUSTED" in attachment(run, spam, "SpamAssassin rules that fired")
    assert_passes(run, "mail.probe.latency", TX)  # found in Junk, in time
    assert_passes(run, "mail.probe.dkim", TX)


# -- the application, its environment, its queue ---------------------------------------------


def test_missing_activation_link_fails_link_and_a_backlog_fails_the_queue(env: Env) -> None:
    app, queue = env.stack.stack.demo_app(), env.stack.stack.email_queue()
    with app.without_activation_link(), queue.backlog(count=200, age_seconds=3600):
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
        "queue bull:email: 200 jobs waiting (threshold 100): is the worker running?",
        "s old (threshold 600 s)",
    )
    res = result(run, "mail.queue.backlog", QUEUE)
    assert parameters(res)["waiting"] == "200"
    assert float(parameters(res)["oldest_age_s"]) >= 3600


def test_redirect_set_fails_showing_the_address_even_after_the_bundle_masked_it(
    stack: Stack, tmp_path: Path
) -> None:
    """The secrets-bundle checks register every .env value for redaction, the redirect
    address included; in the same process, the redirect check still shows the address."""
    from opsdrill.envbundle import backup_bundle

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
    bundle = result(run, "secrets.bundle.encryption_key", "secrets:app")
    assert bundle["status"] == "passed", message(bundle)  # it read (and registered) the .env
    res = result(run, "mail.config.redirect", APPENV)
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
