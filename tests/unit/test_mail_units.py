"""Unit tests of opsdrill.mail: parsing and verification against fakes of the protocol
boundaries (SMTP, spamd, HTTP, Redis, DNS). The real daemons are exercised by the stack's
probe checks and their fault matrix."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from opsdrill.errors import ConfigError, CredentialsRejected, TargetUnreachable
from opsdrill.mail import (
    PROBE_HEADER,
    AppMessageMatch,
    AuthRejected,
    FoundMessage,
    ImapMailbox,
    ProbeFailed,
    ProbeResult,
    SmtpEndpoint,
    Thresholds,
    TlsVerifyFailed,
    aligned,
    authentication_results,
    backlog_from_client,
    build_probe_message,
    bullmq_backlog,
    extract_links,
    fetch_link,
    forbidden_keys_set,
    from_domain,
    header_values,
    new_token,
    over_thresholds,
    parse_header,
    parse_response,
    read_app_env,
    score_with_spamd,
    send_probe,
    snapshot_uidnext,
    trigger_app,
    verify_dkim,
)
from opsdrill.mail import suite as mail_suite
from opsdrill.mail.authresults import parse_values
from opsdrill.mail.imap import uid_fetch
from opsdrill.mail.spam import parse_rules
from opsdrill.redact import redact
from tests.helpers.dns_fake import FakeResolver
from tests.helpers.mail_fakes import (
    FakeRedis,
    SmtpBehaviour,
    fake_app,
    fake_imap,
    fake_redis_refusing,
    fake_smtp,
    fake_spamd,
    free_port,
)

TRUSTED = ("mail.example.test",)

# ---------------------------------------------------------------- Authentication-Results


def test_ar_spoof_from_untrusted_authserv_id_is_ignored_and_reported() -> None:
    report = parse_values(
        [
            # added last by our receiving server: on top
            "mail.example.test; spf=fail smtp.mailfrom=crm@example.test;"
            " dkim=fail (signature verification failed) header.d=example.test;"
            " dmarc=fail (p=reject dis=none) header.from=example.test",
            # written by the sender, claiming everything passed
            "mx.attacker.test; spf=pass smtp.mailfrom=crm@example.test;"
            " dkim=pass header.d=example.test; dmarc=pass header.from=example.test",
        ],
        TRUSTED,
    )
    assert report.by_method() == {"spf": ["fail"], "dkim": ["fail"], "dmarc": ["fail"]}
    assert [h.authserv_id for h in report.ignored] == ["mx.attacker.test"]
    assert [r.method for r in report.not_passing()] == ["spf", "dkim", "dmarc"]
    evidence = report.evidence()
    (ignored,) = evidence["ignored"]
    assert ignored["why_ignored"] == (
        "authserv-id 'mx.attacker.test' is not trusted (trusted: mail.example.test)"
    )
    assert ignored["results"][1] == {
        "method": "dkim",
        "result": "pass",
        "properties": {"header.d": "example.test"},
    }
    assert evidence["trusted"][0]["index"] == 0 and ignored["index"] == 1


def test_ar_untrusted_only_means_nothing_counts() -> None:
    report = parse_values(["evil.test; dkim=pass header.d=example.test"], TRUSTED)
    assert report.trusted == () and report.by_method() == {} and report.not_passing() == []
    assert report.ignored[0].results[0].result == "pass"


def test_ar_multiple_methods_properties_and_comments() -> None:
    header = parse_header(
        "mail.example.test;\r\n\tspf=pass (mail.example.test: domain of crm@example.test"
        " designates 127.0.0.1 as permitted sender) smtp.mailfrom=crm@example.test;\r\n"
        "\tdkim=pass (2048-bit key; unprotected) header.d=example.test"
        " header.i=@example.test header.a=rsa-sha256 header.s=sel1 header.b=Abc12345;\r\n"
        "\tdmarc=pass (p=reject dis=none) header.from=example.test;"
        " iprev=pass policy.iprev=127.0.0.1 (localhost)"
    )
    assert header.errors == ()
    spf, dkim_r, dmarc, iprev = header.results
    assert (spf.method, spf.result, spf.prop("smtp.mailfrom")) == (
        "spf",
        "pass",
        "crm@example.test",
    )
    assert spf.comments[0].startswith("mail.example.test: domain of crm@example.test")
    assert dkim_r.comments == ("2048-bit key; unprotected",)
    assert dkim_r.properties == {
        "header.d": "example.test",
        "header.i": "@example.test",
        "header.a": "rsa-sha256",
        "header.s": "sel1",
        "header.b": "Abc12345",
    }
    assert dmarc.comments == ("p=reject dis=none",)
    assert dmarc.prop("Header.From") == "example.test"
    assert iprev.prop("policy.iprev") == "127.0.0.1" and iprev.comments == ("localhost",)


def test_ar_none_and_header_without_results() -> None:
    none = parse_header("mx.example.test; none")
    assert none.results == () and none.errors == ()
    with_comment = parse_header("mx.example.test (our server) 1; none (nothing checked)")
    assert with_comment.version == "1" and with_comment.errors == ()
    bare = parse_header("mx.example.test")
    assert bare.authserv_id == "mx.example.test"
    assert bare.results == () and bare.errors == ("no results (not even 'none')",)
    trailing = parse_header("mx.example.test;")
    assert trailing.results == () and trailing.errors == ("no results (not even 'none')",)


def test_ar_lenient_where_real_servers_deviate() -> None:
    # trailing ';' (OpenDKIM, rspamd), version number, quoted reason with ';'
    header = parse_header(
        'mx.google.com 1; dkim=fail reason="bad; signature" header.d=x.test header.s=s1;'
    )
    assert header.errors == () and header.version == "1"
    assert header.results[0].reason == "bad; signature"
    assert header.results[0].properties == {"header.d": "x.test", "header.s": "s1"}
    # Microsoft: ptype-less action=none, unknown method compauth with a reason
    ms = parse_header(
        "spf.protection.outlook.com; spf=pass (sender IP is 192.0.2.1)"
        " smtp.mailfrom=example.com; dkim=pass (signature was verified)"
        " header.d=example.com;dmarc=pass action=none header.from=example.com;"
        "compauth=pass reason=100"
    )
    assert [(r.method, r.result) for r in ms.results] == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
        ("compauth", "pass"),
    ]
    assert ms.results[2].properties == {"action": "none", "header.from": "example.com"}
    assert ms.results[3].reason == "100"
    # a quoted local-part and a method version
    quoted = parse_header('mx.test; spf/1=pass smtp.mailfrom="a b"@example.test')
    assert quoted.results[0].version == "1"
    assert quoted.results[0].prop("smtp.mailfrom") == "a b@example.test"


def test_ar_garbage_is_reported_and_parsing_resynchronises() -> None:
    header = parse_header(
        "mx.example.test; spf=pass smtp.mailfrom=a.test; ??? what; dkim=pass header.d=b.test"
    )
    assert [(r.method, r.result) for r in header.results] == [("spf", "pass"), ("dkim", "pass")]
    assert len(header.errors) == 1 and "expected a method" in header.errors[0]
    broken_prop = parse_header("mx.example.test; dkim=pass header.d=b.test !!junk")
    assert broken_prop.results[0].prop("header.d") == "b.test"
    assert "could not parse '!!junk'" in broken_prop.errors[0]


def test_ar_from_raw_message_trust_is_case_insensitive_and_merges_headers() -> None:
    raw = (
        b"Authentication-Results: MAIL.Example.TEST; dmarc=pass header.from=example.test\r\n"
        b"Authentication-Results: mail.example.test;\r\n"
        b"  dkim=pass header.d=example.test header.s=sel1;\r\n"
        b"  dkim=fail header.d=other.test\r\n"
        b"ARC-Authentication-Results: i=1; mail.example.test; spf=fail\r\n"
        b"Authentication-Results: relay.elsewhere.test; spf=softfail\r\n"
        b"From: crm@example.test\r\nSubject: x\r\n\r\nbody\r\n"
    )
    report = authentication_results(raw, ["mail.example.test"])
    assert report.by_method() == {"dmarc": ["pass"], "dkim": ["pass", "fail"]}
    assert [r.prop("header.d") for r in report.results("DKIM")] == ["example.test", "other.test"]
    assert [h.index for h in report.trusted] == [0, 1]
    assert [h.authserv_id for h in report.ignored] == ["relay.elsewhere.test"]
    assert "spf" not in report.by_method()  # the ARC header is another field
    json.dumps(report.evidence())


# ---------------------------------------------------------------- messages and links


def test_probe_message_carries_token_in_header_and_subject() -> None:
    now = datetime(2026, 11, 28, 15, 0, 0, tzinfo=UTC)
    token = new_token(now)
    assert re.fullmatch(r"20261128T150000Z-[0-9a-f]{12}", token)
    assert new_token(now) != token
    msg = build_probe_message("CRM <crm@Example.TEST>", "probe@mailbox.test", token, now=now)
    assert msg.subject == f"opsdrill probe {token}"
    assert msg.message_id.endswith("@example.test>") and token in msg.message_id
    assert b"\r\n" in msg.raw and b"\n" not in msg.raw.replace(b"\r\n", b"")
    headers = header_values(msg.raw)
    assert headers[PROBE_HEADER] == [token]
    assert headers["Subject"] == [f"opsdrill probe {token}"]
    assert headers["Date"] == ["Sat, 28 Nov 2026 15:00:00 +0000"]
    assert headers["From"] == ["CRM <crm@Example.TEST>"]
    assert from_domain(msg.raw) == "example.test"
    assert token in msg.raw.decode() and msg.evidence()["token"] == token
    with pytest.raises(ConfigError):
        build_probe_message("not-an-address", "probe@mailbox.test", token)


def test_from_domain_needs_exactly_one_address() -> None:
    assert from_domain(b"From: a@x.test, b@y.test\r\n\r\n") is None
    assert from_domain(b"Subject: none\r\n\r\n") is None


def _multipart(plain: str, html: str, plain_cte: str, html_cte: str) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "crm@example.test"
    msg["Subject"] = "Activate your account"
    msg.set_content(plain, cte=plain_cte)
    msg.add_alternative(html, subtype="html", cte=html_cte)
    return msg.as_bytes()


ACTIVATE = "https://crm.example.test/portal/activate?token=abc123&next=%2Fhome"


def test_extract_links_plain_and_html() -> None:
    raw = _multipart(
        f"Welcome! Activate here: {ACTIVATE}.\nHelp: https://help.example.test/faq\n",
        f'<p>Click <a href="{ACTIVATE.replace("&", "&amp;")}">activate</a> '
        f"or paste {ACTIVATE.replace('&', '&amp;')}</p>"
        '<img src="https://cdn.example.test/logo.png">',
        "7bit",
        "7bit",
    )
    assert extract_links(raw, r"/portal/activate\?token=") == [ACTIVATE]
    assert extract_links(raw) == [
        ACTIVATE,
        "https://help.example.test/faq",
        "https://cdn.example.test/logo.png",
    ]
    assert extract_links(raw, re.compile(r"nothing-like-this")) == []


@pytest.mark.parametrize("cte", ["quoted-printable", "base64"])
def test_extract_links_decodes_transfer_encodings(cte: str) -> None:
    long_link = ACTIVATE + "&padding=" + "x" * 90  # forces a quoted-printable soft break
    raw = _multipart(
        f"Activate: {long_link}\n", f'<a href="{long_link.replace("&", "&amp;")}">go</a>', cte, cte
    )
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert long_link.encode() not in body  # really encoded on the wire
    assert extract_links(raw, "/portal/activate") == [long_link]


def test_extract_links_single_part_qp_and_bad_pattern() -> None:
    raw = (
        b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Open https://crm.example.test/portal/activate?token=3Dabc=\r\ndef&x=3D1 now.\r\n"
    )
    assert extract_links(raw, "activate") == [
        "https://crm.example.test/portal/activate?token=abcdef&x=1"
    ]
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        extract_links(raw, "(")


# ---------------------------------------------------------------- DKIM


def _keypair() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(public).decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[bytes, str]]:
    return {"sel1": _keypair(), "sel2": _keypair(), "other": _keypair()}


def _txt(p: str) -> list[str]:
    record = f"v=DKIM1; k=rsa; p={p}"
    return [record[i : i + 255] for i in range(0, len(record), 255)]  # 255-byte strings


def _zone(keys: dict[str, tuple[bytes, str]], **override: str) -> dict[str, Any]:
    zone: dict[str, Any] = {}
    for sel in ("sel1", "sel2"):
        zone[f"{sel}._domainkey.example.test"] = [{"TXT": _txt(override.get(sel, keys[sel][1]))}]
    return zone


def _signed(
    keys: dict[str, tuple[bytes, str]],
    sender: str = "crm@example.test",
    domain: str = "example.test",
    selectors: tuple[str, ...] = ("sel1",),
) -> bytes:
    raw = build_probe_message(sender, "probe@mailbox.test", new_token()).raw
    for sel in selectors:
        sig = dkim.sign(
            raw,
            sel.encode(),
            domain.encode(),
            keys[sel][0],
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        raw = sig + raw
    return bytes(raw)


def test_dkim_verifies_with_keys_from_the_resolver(keys: dict[str, tuple[bytes, str]]) -> None:
    resolver = FakeResolver(_zone(keys))
    report = verify_dkim(_signed(keys), resolver)
    (sig,) = report.signatures
    assert sig.passed and sig.error is None
    assert (sig.domain, sig.selector, sig.key_bits) == ("example.test", "sel1", 2048)
    assert sig.key_name == "sel1._domainkey.example.test"
    assert sig.aligned is True and report.aligned_pass
    assert "from" in sig.signed_headers
    assert resolver.asked == [("sel1._domainkey.example.test", "TXT")]
    assert report.keys["sel1._domainkey.example.test"].startswith("v=DKIM1; k=rsa; p=")
    json.dumps(report.evidence())


def test_dkim_tampered_body_fails(keys: dict[str, tuple[bytes, str]]) -> None:
    raw = _signed(keys).replace(b"automated delivery probe", b"automated DELIVERY probe")
    (sig,) = verify_dkim(raw, FakeResolver(_zone(keys))).signatures
    assert sig.result == "fail" and "body hash mismatch" in (sig.error or "")


def test_dkim_replaced_or_missing_key_fails(keys: dict[str, tuple[bytes, str]]) -> None:
    raw = _signed(keys)
    (sig,) = verify_dkim(raw, FakeResolver(_zone(keys, sel1=keys["other"][1]))).signatures
    assert sig.result == "fail" and sig.error == "signature did not verify"
    (sig,) = verify_dkim(raw, FakeResolver({})).signatures
    assert sig.result == "fail" and "missing public key" in (sig.error or "")
    (sig,) = verify_dkim(raw, FakeResolver(_zone(keys, sel1=""))).signatures  # revoked
    assert sig.result == "fail" and sig.error


def test_dkim_dns_outage_is_unreachable_not_a_failure(keys: dict[str, tuple[bytes, str]]) -> None:
    resolver = FakeResolver({"sel1._domainkey.example.test": ["TIMEOUT"]})
    with pytest.raises(TargetUnreachable, match="timed out"):
        verify_dkim(_signed(keys), resolver)


def test_dkim_alignment_relaxed_and_strict(keys: dict[str, tuple[bytes, str]]) -> None:
    resolver = FakeResolver(_zone(keys))
    other = verify_dkim(_signed(keys, sender="crm@other.test"), resolver)
    assert other.signatures[0].passed and other.signatures[0].aligned is False
    assert other.from_domain == "other.test" and not other.aligned_pass
    sub = _signed(keys, sender="crm@news.example.test")
    assert verify_dkim(sub, resolver).signatures[0].aligned is True
    strict = verify_dkim(sub, resolver, strict=True)
    assert strict.alignment == "strict" and strict.signatures[0].aligned is False
    assert aligned("Example.TEST.", "example.test", strict=True)


def test_dkim_reports_each_signature(keys: dict[str, tuple[bytes, str]]) -> None:
    raw = _signed(keys, selectors=("sel1", "sel2"))  # sel2 on top
    zone = _zone(keys, sel1=keys["other"][1])
    report = verify_dkim(raw, FakeResolver(zone))
    assert [(s.index, s.selector, s.result) for s in report.signatures] == [
        (0, "sel2", "pass"),
        (1, "sel1", "fail"),
    ]
    assert report.aligned_pass
    unsigned = verify_dkim(build_probe_message("a@x.test", "b@y.test", "t").raw, FakeResolver({}))
    assert unsigned.signatures == () and not unsigned.aligned_pass


# ---------------------------------------------------------------- spamd

# Captured from spamd 4.0.1 (Debian 12) answering REPORT for a GTUBE message.
GTUBE_ANSWER = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 1159\r\nSpam: True ; 1009.3 / 5.0\r\n\r\n"
    b'Spam detection software, running on the system "vm",\n'
    b"has identified this incoming email as possible spam.  The original\n"
    b"message has been attached to this so you can view it or label\n"
    b"similar future email.  If you have any questions, see\n"
    b"@@CONTACT_ADDRESS@@ for details.\n\n"
    b"Content preview:  XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
    b"   \n\n"
    b"Content analysis details:   (1009.3 points, 5.0 required)\n\n"
    b" pts rule name              description\n"
    b"---- ---------------------- --------------------------------------------------\n"
    b"-0.0 NO_RECEIVED            Informational: message has no Received headers\n"
    b" 0.6 MISSING_MID            Missing Message-Id: header\n"
    b" 2.7 MISSING_DATE           Missing Date: header\n"
    b"-0.0 NO_RELAYS              Informational: message was not relayed via SMTP\n"
    b" 0.9 MISSING_HEADERS        Missing To: header\n"
    b" 0.5 SUBJ_ALL_CAPS          Subject is all capitals\n"
    b"1000 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email\n"
    b" 2.8 DRUG_ED_CAPS           BODY: Mentions an E.D. drug\n"
    b" 1.8 DRUGS_ERECTILE         Refers to an erectile drug\n"
    b" 0.0 NO_HEADERS_MESSAGE     Message appears to be missing most RFC-822 headers\n\n"
)


def test_spamd_report_is_parsed() -> None:
    verdict = parse_response(GTUBE_ANSWER)
    assert (verdict.score, verdict.threshold, verdict.is_spam) == (1009.3, 5.0, True)
    assert len(verdict.rules) == 10
    gtube = next(r for r in verdict.rules if r.name == "GTUBE")
    assert gtube.score == 1000.0
    assert gtube.description == "BODY: Generic Test for Unsolicited Bulk Email"
    assert verdict.rules[0].score == -0.0 and verdict.rules[0].name == "NO_RECEIVED"
    assert verdict.evidence()["rules"][1] == {
        "rule": "MISSING_MID",
        "score": 0.6,
        "description": "Missing Message-Id: header",
    }


def test_spamd_wrapped_descriptions_and_errors() -> None:
    report = (
        "Content analysis details:   (0.1 points, 5.0 required)\n\n"
        " pts rule name              description\n"
        "---- ---------------------- --------------------------------------------------\n"
        " 0.1 DKIM_SIGNED            Message has a DKIM or DK signature, not necessarily\n"
        "                            valid\n"
        "-0.1 DKIM_VALID_AU          Message has a valid DKIM or DK signature from\n"
        "                            author's domain\n"
    )
    rules = parse_rules(report)
    assert [(r.name, r.description) for r in rules] == [
        ("DKIM_SIGNED", "Message has a DKIM or DK signature, not necessarily valid"),
        ("DKIM_VALID_AU", "Message has a valid DKIM or DK signature from author's domain"),
    ]
    with pytest.raises(ProbeFailed, match="answered 76 Bad header line"):
        parse_response(b"SPAMD/1.0 76 Bad header line: (Content-length mismatch)\r\n\r\n")
    with pytest.raises(ProbeFailed, match="not a SPAMD response"):
        parse_response(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_spamd_client_speaks_spamc_1_5() -> None:
    requests: list[bytes] = []
    raw = build_probe_message("crm@example.test", "probe@mailbox.test", "tok").raw
    with fake_spamd(GTUBE_ANSWER, requests) as port:
        verdict = score_with_spamd(raw, "127.0.0.1", port, timeout=5)
    assert verdict.score == 1009.3
    (request,) = requests
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"REPORT SPAMC/1.5", f"Content-length: {len(raw)}".encode()]
    assert body == raw


def test_spamd_unreachable_or_hung_is_bounded() -> None:
    port = free_port()
    with pytest.raises(TargetUnreachable, match=rf"spamd 127.0.0.1:{port}: connection refused"):
        score_with_spamd(b"x", "127.0.0.1", port, timeout=2)
    with fake_spamd(None, []) as hung:
        started = time.monotonic()
        with pytest.raises(TargetUnreachable, match=r"timed out after 0\.5 s"):
            score_with_spamd(b"Subject: x\r\n\r\nx\r\n", "127.0.0.1", hung, timeout=0.5)
        assert time.monotonic() - started < 3


# ---------------------------------------------------------------- SMTP (fake server)

USER, PASSWORD = "crm@example.test", "smtp-Secret-4711"


def test_smtp_submit_returns_acceptance_and_queue_id() -> None:
    behaviour = SmtpBehaviour(users={USER: PASSWORD})
    with fake_smtp(behaviour) as port:
        endpoint = SmtpEndpoint("127.0.0.1", port, "none", USER, PASSWORD, timeout=5)
        before = time.monotonic()
        receipt = send_probe(endpoint, "crm@example.test", "probe@mailbox.test")
    assert receipt.queue_id == "4ABC12DEF" and receipt.reply.startswith("250 2.0.0 Ok")
    assert before <= receipt.accepted_monotonic <= time.monotonic()
    assert receipt.accepted_utc.tzinfo is UTC and receipt.tls_version is None
    ((sender, rcpts, data),) = behaviour.received
    assert (sender, rcpts) == ("crm@example.test", ["probe@mailbox.test"])
    assert f"{PROBE_HEADER}: {receipt.token}".encode() in data
    assert PASSWORD not in repr(endpoint) and PASSWORD not in json.dumps(endpoint.evidence())


def test_smtp_auth_rejection_is_our_credentials_refused_naming_server_user_and_535() -> None:
    with fake_smtp(SmtpBehaviour(users={USER: "other-password"})) as port:
        endpoint = SmtpEndpoint("127.0.0.1", port, "none", USER, PASSWORD, timeout=5)
        with pytest.raises(AuthRejected) as caught:
            send_probe(endpoint, USER, "probe@mailbox.test")
    message = caught.value.message
    assert message.startswith(
        f"send: SMTP 127.0.0.1:{port} rejected AUTH for user crm@example.test: 535 5.7.8"
    )
    # opsdrill's own password refused: nothing was judged (broken, exit 2), not a failure
    error = caught.value
    assert isinstance(error, CredentialsRejected) and not isinstance(error, ProbeFailed)
    assert (error.credential, error.stage, error.exit_code) == ("smtp", "send", 2)
    assert PASSWORD not in message


def test_smtp_refusals_and_missing_starttls() -> None:
    with fake_smtp(SmtpBehaviour(refuse_rcpt=("nobody@mailbox.test",))) as port:
        endpoint = SmtpEndpoint("127.0.0.1", port, "none", timeout=5)
        with pytest.raises(
            ProbeFailed, match=r"refused RCPT TO:<nobody@mailbox.test>: 550 5\.1\.1"
        ):
            send_probe(endpoint, USER, "nobody@mailbox.test")
        starttls = SmtpEndpoint("127.0.0.1", port, "starttls", USER, PASSWORD, timeout=5)
        with pytest.raises(ProbeFailed, match="does not offer STARTTLS"):
            send_probe(starttls, USER, "probe@mailbox.test")


def test_smtp_unreachable_is_bounded_and_secret_free() -> None:
    port = free_port()
    endpoint = SmtpEndpoint("127.0.0.1", port, "starttls", USER, PASSWORD, timeout=2)
    with pytest.raises(TargetUnreachable) as caught:
        send_probe(endpoint, USER, "probe@mailbox.test")
    assert caught.value.message == (
        f"SMTP 127.0.0.1:{port}: connection refused (while connecting, tls=starttls)"
    )
    with fake_smtp(SmtpBehaviour(greet=False)) as silent:
        started = time.monotonic()
        with pytest.raises(TargetUnreachable, match=r"timed out after 0\.5 s"):
            send_probe(SmtpEndpoint("127.0.0.1", silent, "none", timeout=0.5), USER, USER)
        assert time.monotonic() - started < 3
    with pytest.raises(ConfigError, match=r"only for 127\.0\.0\.1"):
        send_probe(SmtpEndpoint("smtp.example.test", 25, "none"), USER, USER)


# ---------------------------------------------------------------- application trigger

BEARER = "app-Bearer-9c1f2e"


def test_trigger_app_success_keeps_token_out_of_evidence() -> None:
    with fake_app(BEARER) as (port, calls):
        response = trigger_app(
            f"http://127.0.0.1:{port}/invite", "POST", {"email": "c@x.test"}, BEARER, timeout=5
        )
    assert response.status == 202 and response.excerpt == '{"queued": true}'
    assert json.loads(calls[0]["body"]) == {"email": "c@x.test"}
    assert BEARER not in json.dumps(response.evidence())
    assert redact(f"token {BEARER}") == "token ***"


def test_trigger_app_non_2xx_is_a_failure_with_status() -> None:
    with fake_app(BEARER) as (port, _):
        with pytest.raises(ProbeFailed) as caught:
            trigger_app(f"http://127.0.0.1:{port}/fail", json_body={}, bearer_token=BEARER)
        # no bearer token configured: a 401 is the application's answer, not our token's
        with pytest.raises(ProbeFailed, match="answered 401 \\(expected 2xx\\)"):
            trigger_app(f"http://127.0.0.1:{port}/invite", json_body={})
    message = caught.value.message
    assert f"POST http://127.0.0.1:{port}/fail answered 500 (expected 2xx)" in message
    assert BEARER not in message and "Bearer ***" in message  # the echo is masked


def test_trigger_app_refusing_our_bearer_token_is_credentials_rejected() -> None:
    wrong = "wrong-Bearer-77a1"
    with fake_app(BEARER) as (port, _), pytest.raises(AuthRejected) as caught:
        trigger_app(f"http://127.0.0.1:{port}/invite", json_body={}, bearer_token=wrong)
    error = caught.value
    assert isinstance(error, CredentialsRejected) and not isinstance(error, ProbeFailed)
    assert (error.credential, error.stage) == ("trigger", "trigger")
    assert error.message.startswith(
        f"trigger: POST http://127.0.0.1:{port}/invite answered 401: the application refused "
        "the bearer token: bad token Bearer ***"
    )
    assert wrong not in error.message


def test_fetch_link_follows_redirects_and_unreachable() -> None:
    with fake_app(BEARER) as (port, _):
        fetched = fetch_link(f"http://127.0.0.1:{port}/activate?token=abc", timeout=5)
        gone = fetch_link(f"http://127.0.0.1:{port}/gone", timeout=5)
    assert (fetched.status, fetched.redirects, fetched.ok) == (200, 1, True)
    assert fetched.final_url == f"http://127.0.0.1:{port}/welcome"
    assert (gone.status, gone.ok, gone.redirects) == (404, False, 0)
    assert gone.final_url == f"http://127.0.0.1:{port}/gone"
    with pytest.raises(TargetUnreachable, match=r"link http://127\.0\.0\.1"):
        fetch_link(f"http://127.0.0.1:{free_port()}/x", timeout=2)
    with pytest.raises(ConfigError):
        trigger_app("ftp://example.test/x")


# ---------------------------------------------------------------- BullMQ backlog


def _job(redis: FakeRedis, job_id: str, created_ms: int) -> None:
    redis.hset(f"bull:email:{job_id}", name="send", data="{}", timestamp=created_ms, priority=0)


def test_bullmq_backlog_counts_and_ages_the_oldest_waiting_job() -> None:
    now = 1_800_000_000_000
    redis = FakeRedis()
    redis.hset("bull:email:meta", **{"opts.maxLenEvents": 10000})
    for job_id, age_s in (("1", 600), ("2", 60), ("3", 5)):  # addStandardJob: LPUSH
        _job(redis, job_id, now - age_s * 1000)
        redis.lpush("bull:email:wait", job_id)
    redis.rpush("bull:email:wait", "0:1")  # a v4/v5 marker at the tail: not a job
    backlog = backlog_from_client(redis, "email", now_ms=now)
    assert (backlog.waiting, backlog.prioritized, backlog.total_waiting) == (3, 0, 3)
    assert (backlog.oldest_job_id, backlog.oldest_age_seconds) == ("1", 600.0)
    assert backlog.queue_known and not backlog.queue_paused
    assert over_thresholds(backlog, Thresholds(max_waiting=10, max_oldest_age_seconds=900)) == []
    problems = over_thresholds(backlog, Thresholds(max_waiting=2, max_oldest_age_seconds=300))
    assert problems == [
        "queue bull:email: 3 jobs waiting (threshold 2): is the worker running?",
        "queue bull:email: oldest waiting job 1 is 600 s old (threshold 300 s)",
    ]


def test_bullmq_backlog_prioritized_paused_and_unknown_queue() -> None:
    now = 1_800_000_000_000
    redis = FakeRedis()
    _job(redis, "7", now - 5_000)
    redis.lpush("bull:email:wait", "7")
    _job(redis, "8", now - 3_600_000)
    redis.zadd("bull:email:prioritized", "8", 5 * 2**32 + 1)
    redis.hset("bull:email:meta", paused=1)
    backlog = backlog_from_client(redis, "email", now_ms=now)
    assert (backlog.total_waiting, backlog.oldest_job_id) == (2, "8")
    assert backlog.oldest_age_seconds == 3600.0 and backlog.queue_paused
    empty = backlog_from_client(redis, "emails", now_ms=now)
    assert (empty.total_waiting, empty.oldest_age_seconds, empty.queue_known) == (0, None, False)
    assert over_thresholds(empty, Thresholds()) == [
        "queue bull:emails: no keys found (wrong queue name or prefix?)"
    ]


def test_bullmq_backlog_counts_every_state_and_judges_overdue_and_recent_failures() -> None:
    """Delayed jobs are scored due_ms * 0x1000 + a counter (BullMQ's getDelayedScore);
    one due more than the grace period ago is overdue: no worker promoted it."""
    now = 1_800_000_000_000
    redis = FakeRedis()
    redis.hset("bull:email:meta", **{"opts.maxLenEvents": 10000})
    for i, due_in_s in enumerate((-3600, -600, -30, 600, 7200)):  # two overdue, one in grace
        _job(redis, str(10 + i), now - 7200_000)
        redis.zadd("bull:email:delayed", str(10 + i), (now + due_in_s * 1000) * 0x1000 + i)
    for i, ago_s in enumerate((30, 600, 7200)):  # two failed in the last hour
        redis.zadd("bull:email:failed", str(20 + i), now - ago_s * 1000)
    redis.rpush("bull:email:active", "30")
    _job(redis, "30", now - 1000)
    backlog = backlog_from_client(redis, "email", now_ms=now)
    assert backlog.counts() == {
        "waiting": 0,
        "paused": 0,
        "prioritized": 0,
        "active": 1,
        "delayed": 5,
        "overdue": 2,
        "failed": 2,
    }
    assert (backlog.oldest_overdue_job_id, backlog.oldest_overdue_seconds) == ("10", 3600.0)
    assert backlog.failed == 3 and backlog.evidence()["failed_recent"] == 2
    assert over_thresholds(backlog, Thresholds()) == [
        "queue bull:email: 2 delayed jobs overdue by more than 60 s, the oldest due 3600 s "
        "ago (threshold 0): only a worker moves a due job to wait, so no worker is running"
    ]
    strict = Thresholds(max_failed=1, max_active=0, max_delayed=4, failed_window_seconds=60)
    assert over_thresholds(backlog, strict)[:2] == [
        "queue bull:email: 1 jobs active (taken by a worker, not finished) (threshold 0): a "
        "worker that died mid-job leaves them there until another worker's stalled-job check "
        "moves them back",
        "queue bull:email: 5 delayed jobs (threshold 4): scheduled sends or retries waiting "
        "for their backoff pile up",
    ]
    # the failed window is applied when reading (ZCOUNT since now - window)
    short = backlog_from_client(redis, "email", now_ms=now, failed_window_seconds=60)
    assert short.failed_recent == 1
    lenient = backlog_from_client(redis, "email", now_ms=now, overdue_grace_seconds=7200)
    assert lenient.overdue == 0 and lenient.oldest_overdue_seconds is None


# ---------------------------------------------------------------- application env


def test_read_app_env_registers_secrets_but_not_public_keys(tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text(
        "ENCRYPTION_KEY=enc-Key-5d8e1\nEMAIL_REDIRECT_TO=ops@portnimara.test\nEMPTY=\n"
    )
    env_file.chmod(0o600)
    env = read_app_env(env_file=env_file, public=["EMAIL_REDIRECT_TO"])
    assert env["EMAIL_REDIRECT_TO"] == "ops@portnimara.test"
    assert redact("key enc-Key-5d8e1") == "key ***"
    assert redact("to ops@portnimara.test") == "to ops@portnimara.test"
    assert forbidden_keys_set(env, ["EMAIL_REDIRECT_TO", "MISSING", "EMPTY"]) == {
        "EMAIL_REDIRECT_TO": "ops@portnimara.test"
    }
    assert forbidden_keys_set(env, ["EMPTY"], empty_is_set=True) == {"EMPTY": ""}


def test_read_app_env_from_a_command_and_errors(tmp_path: Path) -> None:
    env = read_app_env(command=["printf", "A=1\\nEMAIL_REDIRECT_TO=\\n"], public=["A"])
    assert forbidden_keys_set(env, ["EMAIL_REDIRECT_TO"]) == {}
    with pytest.raises(TargetUnreachable, match="exit code 1"):
        read_app_env(command=["false"])
    with pytest.raises(TargetUnreachable, match=r"did not finish within 0\.5s"):
        read_app_env(command=["sleep", "5"], timeout=0.5)
    with pytest.raises(ConfigError, match="cannot read"):
        read_app_env(env_file=tmp_path / "missing.env")
    with pytest.raises(ConfigError, match="exactly one"):
        read_app_env()


# ---------------------------------------------------------------- IMAP parsing, matchers


def test_uid_fetch_parses_literals_and_trailing_items() -> None:
    data = [
        (b'1 (UID 5 INTERNALDATE " 1-Dec-2026 15:00:01 +0100" BODY[] {11}', b"Subject: a\r\n"),
        b")",
        (b'2 (INTERNALDATE "28-Nov-2026 23:59:59 -0500" BODY[] {11}', b"Subject: b\r\n"),
        b" UID 9)",
        b'3 (UID 12 INTERNALDATE "28-Nov-2026 10:00:00 +0000")',
    ]
    box = SimpleNamespace(client=SimpleNamespace(uid=lambda *args: ("OK", data)))
    records = uid_fetch(box, [5, 9, 12], "(UID INTERNALDATE BODY.PEEK[])")  # type: ignore[arg-type]
    assert [(r.uid, r.literal) for r in records] == [
        (5, b"Subject: a\r\n"),
        (9, b"Subject: b\r\n"),
        (12, None),
    ]
    assert records[0].internaldate == datetime(2026, 12, 1, 14, 0, 1, tzinfo=UTC)
    assert records[1].internaldate == datetime(2026, 11, 29, 4, 59, 59, tzinfo=UTC)


def test_app_message_match_criteria_and_validation() -> None:
    since = datetime(2026, 11, 28, 0, 30, tzinfo=UTC)
    token = "opsdrill-20261128003000-0123456789ab"
    match = AppMessageMatch("client@mailbox.test", r"^Activate", since, token)
    assert match.criteria("INBOX") == (
        f'SINCE 27-Nov-2026 TEXT "{token}" OR TO "client@mailbox.test" HEADER Delivered-To '
        '"client@mailbox.test"'
    )
    assert token in match.describe()
    with pytest.raises(ConfigError, match="timezone-aware"):
        AppMessageMatch("a@b.test", "x", datetime(2026, 1, 1), token)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        AppMessageMatch("a@b.test", "(", since, token)
    with pytest.raises(ConfigError, match="per-run token"):
        AppMessageMatch("a@b.test", "x", since, "")


def test_probe_result_evidence_has_latency_and_no_password() -> None:
    raw = build_probe_message("crm@example.test", "probe@mailbox.test", "tok-1").raw
    mailbox = ImapMailbox("127.0.0.1", 993, "tls", "probe@mailbox.test", "imap-Secret-31337")
    now = datetime.now(UTC)
    found = FoundMessage(
        folder="Junk",
        uid=42,
        uidvalidity=7,
        raw=raw,
        internaldate=now,
        visible_utc=now + timedelta(seconds=1),
        visible_monotonic=101.25,
        method="idle",
        searched_folders=("INBOX", "Junk"),
        missing_folders=(),
        rounds=2,
        matches=1,
    )
    result = ProbeResult(
        kind="direct",
        mailbox=mailbox,
        found=found,
        accepted_utc=now,
        accepted_monotonic=100.0,
        token="tok-1",
    )
    assert result.latency_seconds == 1.25 and not result.in_inbox
    assert result.eml_name == "probe-tok-1.eml"
    evidence = json.dumps(result.evidence())
    assert "imap-Secret-31337" not in evidence and "imap-Secret-31337" not in repr(mailbox)
    assert '"folder": "Junk"' in evidence and '"method": "idle"' in evidence
    result.errors["dkim"] = TargetUnreachable("DNS sel1._domainkey.example.test TXT: timed out")
    with pytest.raises(TargetUnreachable):
        result.raise_for_errors()


# ---------------------------------------------------------------- honest outcomes
# A server refusing opsdrill's *own* credentials (the probe's SMTP and IMAP passwords, the
# trigger's bearer token, the queue's Redis password) is broken, never failed: the
# library raises AuthRejected (a CredentialsRejected), the fixtures name the key to fix.

IMAP_USER, IMAP_PASSWORD = "probe@mailbox.test", "imap-Secret-8d2c"


def test_auth_rejected_is_credentials_rejected_not_a_probe_failure() -> None:
    assert issubclass(AuthRejected, CredentialsRejected)
    assert issubclass(AuthRejected, TargetUnreachable)
    assert not issubclass(AuthRejected, ProbeFailed) and not issubclass(
        AuthRejected, AssertionError
    )
    error = AuthRejected("receive", "IMAP x rejected LOGIN for user u: NO", credential="imap")
    assert error.message == "receive: IMAP x rejected LOGIN for user u: NO"
    assert error.exit_code == 2


def test_imap_login_rejected_is_credentials_rejected_naming_server_and_user() -> None:
    with fake_imap({IMAP_USER: "the-right-one"}) as port:
        mailbox = ImapMailbox("127.0.0.1", port, "none", IMAP_USER, IMAP_PASSWORD, timeout=5)
        with pytest.raises(AuthRejected) as caught:
            snapshot_uidnext(mailbox, ("INBOX",))
    error = caught.value
    assert isinstance(error, CredentialsRejected) and not isinstance(error, ProbeFailed)
    assert (error.credential, error.stage) == ("imap", "receive")
    assert error.message.startswith(
        f"receive: IMAP 127.0.0.1:{port} rejected LOGIN for user {IMAP_USER}: NO "
    )
    assert "AUTHENTICATIONFAILED" in error.message and IMAP_PASSWORD not in error.message


@pytest.mark.parametrize(
    "answer", ["WRONGPASS invalid username-password pair", "NOAUTH Authentication required."]
)
def test_redis_refusing_the_password_is_credentials_rejected(answer: str) -> None:
    with fake_redis_refusing(answer) as port, pytest.raises(AuthRejected) as caught:
        bullmq_backlog("127.0.0.1", port, "redis-Secret-51", timeout=2)
    error = caught.value
    assert isinstance(error, CredentialsRejected) and error.credential == "redis"
    assert error.message.startswith(f"queue: Redis 127.0.0.1:{port}/0 rejected the credentials: ")
    assert error.message.endswith(answer.split(" ", 1)[1])  # what Redis said
    assert "redis-Secret-51" not in error.message


INVENTORY = """
name = "unit"
environment = "test"

[probes.tx]
from_address = "crm@example.test"
to_address = "probe@mailbox.test"
trusted_authserv_ids = ["mail.mailbox.test"]
smtp = { host = "127.0.0.1", tls = "none", user = "crm@example.test", password_env = "U_SMTP" }
imap = { host = "127.0.0.1", tls = "none", user = "probe@mailbox.test", password_env = "U_IMAP" }

[probes.invite]
trigger.url = "http://127.0.0.1:9/invite"
trigger.bearer_token_env = "U_TOKEN"
trigger.json = { email = "probe@mailbox.test", name = "Probe {token}" }
expect = { to = "probe@mailbox.test", subject_pattern = "invited" }
imap = { host = "127.0.0.1", tls = "none", user = "probe@mailbox.test", password_env = "U_IMAP" }

[queues.email]
redis = { host = "127.0.0.1", password_env = "U_REDIS" }
queue = "email"

[queues.open]
redis = { host = "127.0.0.1" }
queue = "email"
"""
SECRETS = {"U_SMTP": "smtp-pw-1", "U_IMAP": "imap-pw-2", "U_TOKEN": "token-3", "U_REDIS": "redis-4"}


def _inventory(tmp_path: Path, text: str = INVENTORY) -> Any:
    from opsdrill.config.inventory import load

    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return load(path, environ=SECRETS)


def test_the_mail_suite_maps_the_inventory_to_library_calls(tmp_path: Path) -> None:
    """As opsdrill.dns.suite does for DNS, without pytest: endpoints with their secrets
    resolved (so registered for redaction), what to wait for, the queue's limits."""
    inv = _inventory(tmp_path)
    smtp = mail_suite.smtp_endpoint(inv, "tx")
    assert (smtp.host, smtp.port, smtp.tls, smtp.password) == (
        "127.0.0.1",
        587,
        "none",
        "smtp-pw-1",
    )
    mailbox = mail_suite.imap_mailbox(inv, "invite")
    assert (mailbox.user, mailbox.password) == ("probe@mailbox.test", "imap-pw-2")
    trigger = mail_suite.app_trigger(inv, "invite")
    assert (trigger.url, trigger.bearer_token) == ("http://127.0.0.1:9/invite", "token-3")
    assert "token-3" not in redact(f"{trigger.bearer_token}")
    receive = mail_suite.receive_options(inv.probe("tx"))
    assert receive.folders[0] == "INBOX" and receive.timeout == inv.probe("tx").timeout_seconds
    endpoints = mail_suite.probe_endpoints(inv.probe("tx"), "tx")
    assert (
        endpoints["smtp"]["user"] == "crm@example.test" and "password_env" not in endpoints["smtp"]
    )
    limits = mail_suite.queue_thresholds(inv.queue("email"))
    assert limits.max_waiting == inv.queue("email").max_waiting
    assert mail_suite.queue_where(inv.queue("email")) == "Redis 127.0.0.1:6379/0"
    with pytest.raises(RuntimeError, match=r"probes\.tx\.trigger is missing although"):
        mail_suite.app_trigger(inv, "tx")  # a direct probe has no trigger: a bug, broken


@pytest.mark.parametrize(
    ("probe", "credential", "key", "var"),
    [
        ("tx", "smtp", "probes.tx.smtp.password_env", "U_SMTP"),
        ("tx", "imap", "probes.tx.imap.password_env", "U_IMAP"),
        ("invite", "trigger", "probes.invite.trigger.bearer_token_env", "U_TOKEN"),
        ("invite", "imap", "probes.invite.imap.password_env", "U_IMAP"),
    ],
)
def test_probe_facade_turns_a_refused_credential_into_broken_naming_key_and_variable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    probe: str,
    credential: Any,
    key: str,
    var: str,
) -> None:
    import opsdrill_pytest.mail as facade
    from opsdrill_pytest.checks import Check, CheckFailed

    refusal = AuthRejected("send", "SMTP 127.0.0.1:587 said 535 5.7.8 no", credential=credential)

    def refuse(*args: Any, **kwargs: Any) -> ProbeResult:
        raise refusal

    monkeypatch.setattr(mail_suite, "run_direct_probe", refuse)
    monkeypatch.setattr(mail_suite, "run_triggered_probe", refuse)
    inv = _inventory(tmp_path)
    (target,) = [t for t in facade.mail_targets(inv).probes if t.name == probe]
    check = Check("mail.probe.latency", "normal", "docs/x.md#probe", "mail", "probe")
    for attempt in range(2):  # every check of the probe gets the same error
        with pytest.raises(CredentialsRejected) as caught:
            if attempt:
                target.received(check, request)  # never a CheckFailed (failed)
            else:
                target.result(request)
        error = caught.value
        assert not isinstance(error, (AuthRejected, ProbeFailed, CheckFailed, AssertionError))
        assert error.message == (
            f"probe:{probe}: send: SMTP 127.0.0.1:587 said 535 5.7.8 no: opsdrill's own "
            f"credentials were refused, so nothing could be checked (fix: {key} = {var}, set "
            "in the environment)"
        )


def test_queue_facade_turns_a_refused_password_into_broken_naming_key_and_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import opsdrill_pytest.mail as facade

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AuthRejected("queue", "Redis 127.0.0.1:6379/0 rejected", credential="redis")

    monkeypatch.setattr(mail_suite, "bullmq_backlog", refuse)
    queues = {q.name: q for q in facade.mail_targets(_inventory(tmp_path)).queues}
    with pytest.raises(CredentialsRejected) as caught:
        queues["email"].backlog()
    assert not isinstance(caught.value, AuthRejected)
    assert caught.value.message.endswith(
        "(fix: queues.email.redis.password_env = U_REDIS, set in the environment)"
    )
    assert caught.value.message.startswith("queue:email: queue: Redis 127.0.0.1:6379/0 rejected")
    with pytest.raises(CredentialsRejected) as unset:  # Redis wants a password, none named
        queues["open"].backlog()
    assert "(fix: queues.open.redis.password_env is not set in the inventory" in unset.value.message


def test_required_narrows_without_assert() -> None:
    from opsdrill_pytest.mail import required

    assert required("x", "probes.tx.smtp") == "x"
    with pytest.raises(RuntimeError, match=r"probes\.tx\.smtp is missing") as caught:
        required(None, "probes.tx.smtp")
    assert not isinstance(caught.value, AssertionError)


def test_mail_checks_and_facades_use_no_assert() -> None:
    """An AssertionError in a check is reported *failed*: no check or facade may raise one
    for an opsdrill-internal problem."""
    import ast

    root = Path(__file__).resolve().parents[2]
    files = [
        root / "opsdrill_pytest" / "mail.py",
        *sorted((root / "opsdrill_checks").glob("check_mail_*.py")),
    ]
    found = [
        f"{path.name}:{node.lineno}"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []


def test_require_auth_results_needs_trusted_authserv_ids(tmp_path: Path) -> None:
    required = INVENTORY.replace(
        "[probes.invite]", "require_auth_results = true\n\n[probes.invite]", 1
    )
    inv = _inventory(tmp_path, required)
    assert inv.probe("tx").require_auth_results and not inv.probe("invite").require_auth_results
    text = INVENTORY.replace(
        'trusted_authserv_ids = ["mail.mailbox.test"]', "trusted_authserv_ids = []"
    ).replace("[probes.invite]", "require_auth_results = true\n\n[probes.invite]", 1)
    with pytest.raises(ConfigError) as caught:
        _inventory(tmp_path, text)
    assert (
        "probes.tx.require_auth_results: true needs at least one entry in "
        "trusted_authserv_ids (or trust_topmost_without_id = true), and there is none"
    ) in caught.value.message
    # Microsoft 365: no authserv-id to list; trust by position is a source of trust too
    m365 = text.replace("trusted_authserv_ids = []", "trust_topmost_without_id = true")
    assert _inventory(tmp_path, m365).probe("tx").trust_topmost_without_id


def test_ar_reported_is_what_there_is_to_judge() -> None:
    nothing = parse_values(["mail.example.test; iprev=pass policy.iprev=127.0.0.1"], TRUSTED)
    assert len(nothing.trusted) == 1 and nothing.reported() == [] and nothing.not_passing() == []
    some = parse_values(["mail.example.test; dkim=pass header.d=example.test"], TRUSTED)
    assert [r.method for r in some.reported()] == ["dkim"]
    untrusted = parse_values(["evil.test; dkim=pass header.d=example.test"], TRUSTED)
    assert untrusted.reported() == []


# ---------------------------------------------------------------- the big providers' headers
# Real header shapes, as each provider documents and writes them: folded where it folds,
# with its comments, and with the spaces it leaves out (";dmarc=", "pass(p=REJECT)").

M365 = (
    # Exchange Online Protection writes no authserv-id; it adds its header on top of
    # everything the sender's side wrote, below its own internal hops.
    b"Received: from BN8PR04MB6321.namprd04.prod.outlook.com (2603:10b6:408:d4::23) by\r\n"
    b" SA1PR04MB8457.namprd04.prod.outlook.com with HTTPS; Tue, 1 Dec 2026 09:14:03\r\n"
    b" +0000\r\n"
    b"Authentication-Results: spf=fail (sender IP is 198.51.100.7)\r\n"
    b" smtp.mailfrom=example.com; dkim=none (message not signed)\r\n"
    b" header.d=none;dmarc=fail action=oreject\r\n"
    b" header.from=example.com;compauth=fail reason=000\r\n"
    b"Received-SPF: Fail (protection.outlook.com: domain of example.com does not\r\n"
    b" designate 198.51.100.7 as permitted sender) receiver=protection.outlook.com;\r\n"
    b" client-ip=198.51.100.7; helo=relay.example.net;\r\n"
    b"Received: from relay.example.net (198.51.100.7) by\r\n"
    b" BN1PEPF00004680.mail.protection.outlook.com (10.167.243.85) with Microsoft SMTP\r\n"
    b" Server (version=TLS1_3, cipher=TLS_AES_256_GCM_SHA384) id 15.20.8207.0 via\r\n"
    b" Frontend Transport; Tue, 1 Dec 2026 09:14:02 +0000\r\n"
    # the sender's side, below: a forgery in Microsoft's shape, claiming everything passed
    b"Authentication-Results: spf=pass (sender IP is 203.0.113.5)\r\n"
    b" smtp.mailfrom=example.com; dkim=pass (signature was verified)\r\n"
    b" header.d=example.com;dmarc=pass action=none header.from=example.com;compauth=pass\r\n"
    b" reason=100\r\n"
    b"From: CRM <crm@example.com>\r\nTo: probe@contoso.onmicrosoft.com\r\nSubject: x\r\n"
    b"\r\nbody\r\n"
)
GOOGLE = (
    b"ARC-Authentication-Results: i=1; mx.google.com;\r\n"
    b"       dkim=pass header.i=@example.com header.s=sel header.b=Hk3/5Q+z;\r\n"
    b"       spf=pass smtp.mailfrom=crm@example.com\r\n"
    b"Authentication-Results: mx.google.com;\r\n"
    b"       dkim=pass header.i=@example.com header.s=sel header.b=Hk3/5Q+z;\r\n"
    b"       spf=pass (google.com: domain of crm@example.com designates 203.0.113.5 as\r\n"
    b" permitted sender) smtp.mailfrom=crm@example.com;\r\n"
    b"       dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=example.com\r\n"
    b"Received: from mail.example.com (mail.example.com. [203.0.113.5])\r\n"
    b"        by mx.google.com with ESMTPS id a1si123;\r\n"
    b"        Tue, 01 Dec 2026 01:14:03 -0800 (PST)\r\n"
    b"From: crm@example.com\r\nSubject: x\r\n\r\nbody\r\n"
)
YAHOO = (
    b"Authentication-Results: atlas212.free.mail.ne1.yahoo.com;\r\n"
    b" dkim=pass header.i=@example.com header.s=sel;\r\n"
    b" spf=pass smtp.mailfrom=example.com;\r\n"
    b" dmarc=pass(p=REJECT) header.from=example.com;\r\n"
    b"Received: from 203.0.113.5 (EHLO mail.example.com)\r\n"
    b" by 10.217.151.73 with SMTP; Tue, 01 Dec 2026 09:14:03 +0000\r\n"
    # below: written by the sender's side with a made-up host under yahoo.com
    b"Authentication-Results: atlas1.free.mail.bf1.yahoo.com; dkim=pass\r\n"
    b" header.i=@example.com; spf=pass; dmarc=pass header.from=example.com\r\n"
    b"From: crm@example.com\r\nSubject: x\r\n\r\nbody\r\n"
)


def test_ar_microsoft_365_has_no_authserv_id_and_is_trusted_by_position_only() -> None:
    report = authentication_results(M365, [], topmost_without_id=True)
    (top,) = report.trusted
    assert top.index == 0 and top.authserv_id == "" and top.errors == ()
    assert report.by_method() == {
        "spf": ["fail"],
        "dkim": ["none"],
        "dmarc": ["fail"],
        "compauth": ["fail"],
    }
    spf, dkim_r, dmarc, compauth = top.results
    assert spf.comments == ("sender IP is 198.51.100.7",)
    assert spf.prop("smtp.mailfrom") == "example.com" and dkim_r.prop("header.d") == "none"
    assert dmarc.properties == {"action": "oreject", "header.from": "example.com"}
    assert compauth.reason == "000"
    assert [r.method for r in report.not_passing()] == ["spf", "dkim", "dmarc"]
    (forged,) = report.ignored  # the same shape lower down: not the receiver's
    assert forged.index == 1 and [r.result for r in forged.results] == ["pass"] * 4
    assert "not the topmost header" in forged.why
    evidence = report.evidence()
    assert evidence["trusted"][0]["authserv_id"] is None
    assert "without an authserv-id" in evidence["trusted"][0]["why_trusted"]
    # without the option nothing names the writer: both ignored, saying what to set
    untrusted = authentication_results(M365, ["mx.google.com"])
    assert untrusted.trusted == () and len(untrusted.ignored) == 2
    assert "trust_topmost_without_id = true" in untrusted.ignored[0].why
    # the old parser took "spf=fail" for the authserv-id: never again
    assert parse_header("spf=fail (sender IP is 198.51.100.7) smtp.mailfrom=x.test").results


def test_ar_google_is_trusted_by_its_fixed_authserv_id() -> None:
    report = authentication_results(GOOGLE, ["mx.google.com"])
    (header,) = report.trusted  # the ARC-Authentication-Results is another field
    assert header.authserv_id == "mx.google.com" and header.errors == ()
    assert report.by_method() == {"dkim": ["pass"], "spf": ["pass"], "dmarc": ["pass"]}
    dkim_r, spf, dmarc = header.results
    assert dkim_r.properties == {
        "header.i": "@example.com",
        "header.s": "sel",
        "header.b": "Hk3/5Q+z",
    }
    assert spf.comments[0].startswith("google.com: domain of crm@example.com designates")
    assert spf.prop("smtp.mailfrom") == "crm@example.com"
    assert dmarc.comments == ("p=REJECT sp=REJECT dis=NONE",)
    assert report.not_passing() == []


def test_ar_yahoo_names_its_host_a_wildcard_trusts_only_the_topmost() -> None:
    report = authentication_results(YAHOO, ["*.yahoo.com"])
    (header,) = report.trusted
    assert header.authserv_id == "atlas212.free.mail.ne1.yahoo.com" and header.errors == ()
    assert [(r.method, r.result) for r in header.results] == [
        ("dkim", "pass"),
        ("spf", "pass"),
        ("dmarc", "pass"),
    ]
    assert header.results[2].comments == ("p=REJECT",)  # "pass(p=REJECT)": no space
    (lower,) = report.ignored
    assert lower.authserv_id == "atlas1.free.mail.bf1.yahoo.com"
    assert "matches *.yahoo.com but is not the topmost header" in lower.why
    exact = authentication_results(YAHOO, ["atlas1.free.mail.bf1.yahoo.com"])
    assert [h.index for h in exact.trusted] == [1]  # an exact id is trusted where it is
    assert authentication_results(YAHOO, ["*.ahoo.com", "yahoo.com"]).trusted == ()


def test_trusted_authserv_id_wildcards_are_leading_only(tmp_path: Path) -> None:
    text = INVENTORY.replace('["mail.mailbox.test"]', '["mail.*.test"]')
    with pytest.raises(ConfigError, match=r"only allowed as a leading '\*\.'"):
        _inventory(tmp_path, text)
    ok = _inventory(tmp_path, INVENTORY.replace('["mail.mailbox.test"]', '["*.Yahoo.com"]'))
    assert ok.probe("tx").trusted_authserv_ids == ["*.yahoo.com"]


# ---------------------------------------------------------------- a triggered run's token


def test_run_token_shows_in_headers_and_decoded_bodies() -> None:
    from email.utils import formataddr

    from opsdrill.mail import message_text, new_run_token, recipient_regex, shows_token
    from opsdrill.mail.message import RUN_TOKEN

    token = new_run_token(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    assert RUN_TOKEN.fullmatch(token) and token.startswith("opsdrill-20261201090000-")
    msg = EmailMessage()
    msg["To"] = "probe@mailbox.test"
    msg["Subject"] = "You're invited"
    msg.set_content(f"Hello Probe {token},\n", cte="base64")
    raw = msg.as_bytes()
    assert token.encode() not in raw  # only the decoded body shows it
    assert shows_token(raw, token) and shows_token(raw, token.upper())
    assert not shows_token(raw, new_run_token())
    named = EmailMessage()
    named["To"] = formataddr((f"Prøbe {token}", "probe@mailbox.test"))  # RFC 2047-encoded
    named.set_content("Hello")
    assert token in message_text(named.as_bytes())
    plus = recipient_regex("probe+{token}@mailbox.test")
    assert plus.match(f"probe+{token}@mailbox.test") and plus.match(f"PROBE+{token}@MAILBOX.test")
    assert not plus.match("probe+someone@mailbox.test") and not plus.match("probe@mailbox.test")
    assert recipient_regex("probe@mailbox.test").match("Probe@Mailbox.test")


def test_trigger_carries_the_run_token_and_a_trigger_without_one_is_refused(
    tmp_path: Path,
) -> None:
    from opsdrill.mail import AppTrigger, run_triggered_probe

    trigger = AppTrigger(
        "https://crm.example.test/api/invite?ref={token}",
        json_body={"email": "probe+{token}@x.test", "tags": ["a", "{token}"], "n": 1},
    )
    run = trigger.for_run("opsdrill-1")
    assert trigger.carries_token and run.url.endswith("?ref=opsdrill-1")
    assert run.json_body == {
        "email": "probe+opsdrill-1@x.test",
        "tags": ["a", "opsdrill-1"],
        "n": 1,
    }
    bare = AppTrigger("http://127.0.0.1:9/invite", json_body={"email": "probe@x.test"})
    assert not bare.carries_token
    mailbox = ImapMailbox("127.0.0.1", free_port(), "none", "u", "p", timeout=1)
    with pytest.raises(ConfigError, match=r"no \{token\} in its URL or JSON body"):
        run_triggered_probe(bare, mailbox, recipient="probe@x.test", subject_pattern="x")
    text = INVENTORY.replace(
        'trigger.json = { email = "probe@mailbox.test", name = "Probe {token}" }', ""
    )
    with pytest.raises(ConfigError) as caught:
        _inventory(tmp_path, text)
    message = caught.value.message
    assert "probes.invite: trigger: no {token} in url or json" in message
    assert "would claim another run's message" in message and "probe+{token}@" in message


# ---------------------------------------------------------------- IMAP UID sets in batches


def test_uid_sets_are_compact_and_batches_bounded() -> None:
    from opsdrill.mail import uid_batches, uid_set

    assert uid_set([9, 1, 2, 3, 7, 10, 11, 12, 3]) == "1:3,7,9:12"
    assert uid_set([]) == "" and uid_set([5]) == "5"
    spread = list(range(1, 45_001, 3))  # 15,000 UIDs, no two adjacent: no run to compress
    assert len(",".join(map(str, spread))) > 64 * 1024  # what the old sweep sent at once
    batches = list(uid_batches(spread))
    assert [u for b in batches for u in b] == spread
    assert max(len(uid_set(b)) for b in batches) <= 2000
    assert max(len(b) for b in batches) <= 500
    assert [uid_set(b) for b in uid_batches(range(1, 1201))] == [
        "1:500",
        "501:1000",
        "1001:1200",
    ]


# ---------------------------------------------------------------- TLS: verify, and what to fix


def test_untrusted_certificates_are_tls_verify_failures_naming_the_connection(
    tmp_path: Path,
) -> None:
    from opsdrill_stack.mail import make_tls
    from tests.helpers.mail_fakes import fake_tls

    tls = make_tls(tmp_path / "tls")
    with fake_tls(str(tls.cert), str(tls.key)) as port:
        with pytest.raises(TlsVerifyFailed) as smtp_error:
            send_probe(SmtpEndpoint("127.0.0.1", port, "tls", timeout=5), USER, USER)
        with pytest.raises(TlsVerifyFailed) as redis_error:
            bullmq_backlog("127.0.0.1", port, "redis-Secret-51", timeout=5, tls=True)
        with pytest.raises(TlsVerifyFailed) as trigger_error:
            trigger_app(f"https://127.0.0.1:{port}/invite", json_body={}, timeout=5)
    assert smtp_error.value.endpoint == "smtp"
    assert f"SMTP 127.0.0.1:{port}: TLS certificate verification failed: " in (
        smtp_error.value.message
    )
    assert redis_error.value.endpoint == "redis" and "redis-Secret-51" not in str(redis_error.value)
    assert f"Redis 127.0.0.1:{port}/0: TLS certificate verification failed" in (
        redis_error.value.message
    )
    assert trigger_error.value.endpoint == "trigger"
    assert "TLS certificate verification failed" in trigger_error.value.message
    assert isinstance(smtp_error.value, TargetUnreachable)  # broken, not failed


def test_facades_name_the_ca_file_to_set_for_an_untrusted_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    import opsdrill_pytest.mail as facade

    def untrusted(*args: Any, **kwargs: Any) -> Any:
        raise TlsVerifyFailed("IMAP 127.0.0.1:993: TLS certificate ...", endpoint="imap")

    def untrusted_redis(*args: Any, **kwargs: Any) -> Any:
        raise TlsVerifyFailed("Redis 127.0.0.1:6379/0: TLS certificate ...", endpoint="redis")

    monkeypatch.setattr(mail_suite, "run_direct_probe", untrusted)
    monkeypatch.setattr(mail_suite, "bullmq_backlog", untrusted_redis)
    targets = facade.mail_targets(_inventory(tmp_path))
    (tx,) = [t for t in targets.probes if t.name == "tx"]
    with pytest.raises(TargetUnreachable) as caught:
        tx.result(request)
    assert caught.value.message.startswith("IMAP 127.0.0.1:993: TLS certificate ...: the")
    assert "(fix: set probes.tx.imap.ca_file to the PEM file of the CA that issued it" in (
        caught.value.message
    )
    assert "do not set verify = false" in caught.value.message
    (queue, _) = targets.queues
    with pytest.raises(TargetUnreachable, match=r"fix: set queues\.email\.redis\.ca_file"):
        queue.backlog()


def test_insecure_tls_lists_every_connection_without_certificate_checks(tmp_path: Path) -> None:
    from opsdrill.config.probes import insecure_tls

    text = (
        INVENTORY.replace(
            'host = "127.0.0.1", tls = "none", user = "crm',
            'host = "smtp.example.net", verify = false, user = "crm',
        )
        .replace(
            'tls = "none", user = "probe@mailbox.test", password_env = "U_IMAP" }\n\n[probes.i',
            'verify = false, user = "probe@mailbox.test", password_env = "U_IMAP" }\n\n[probes.i',
        )
        .replace(
            'redis = { host = "127.0.0.1", password_env',
            'redis = { host = "redis.example.net", tls = true, verify = false, password_env',
        )
    )
    inv = _inventory(tmp_path, text)
    assert insecure_tls(inv.model.probes, inv.model.queues) == [
        ("probes.tx.smtp.verify", "smtp.example.net", False),
        ("probes.tx.imap.verify", "127.0.0.1", True),
        ("queues.email.redis.verify", "redis.example.net", False),
    ]


# ---------------------------------------------------------------- operator papercuts (17)


def test_dkim_failure_reasons_read_as_text_not_python_bytes(
    keys: dict[str, tuple[bytes, str]],
) -> None:
    raw = _signed(keys)
    tampered = raw.replace(b"automated delivery probe", b"automated DELIVERY probe")
    duplicated = raw.replace(b"d=example.test", b"d=example.test; x=1; x=2")
    cases = {
        "missing": (raw, {}),
        "tampered": (tampered, _zone(keys)),
        "bad key": (raw, _zone(keys, sel1="AAAA")),
        "duplicate tag": (duplicated, _zone(keys)),
    }
    errors = {
        name: verify_dkim(message, FakeResolver(zone)).signatures[0].error or ""
        for name, (message, zone) in cases.items()
    }
    for name, error in errors.items():
        assert "b'" not in error and 'b"' not in error, (name, error)
    assert errors["missing"] == "missing public key: sel1._domainkey.example.test."
    assert re.fullmatch(r"body hash mismatch \(got \S+=, expected \S+=\)", errors["tampered"])
    assert errors["bad key"].startswith("could not parse RSA public key (AAAA): ")
    assert errors["duplicate tag"] == "malformed DKIM-Signature header: tag x appears twice"


def _header_app(api_key: str) -> Any:
    """An application that needs ``X-Api-Key: api_key`` (202), else 401 echoing it; it
    records every request's headers."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(dict(self.headers.items()))
            sent = self.headers.get("X-Api-Key", "")
            status, body = (202, b"queued") if sent == api_key else (401, f"bad {sent}".encode())
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_trigger_sends_its_headers_and_a_refused_secret_header_is_our_credential() -> None:
    server, seen = _header_app("api-Key-7731")
    url = f"http://127.0.0.1:{server.server_address[1]}/invite"
    try:
        ok = trigger_app(
            url,
            json_body={"name": "x"},
            headers={"Accept": "application/json"},
            secret_headers={"X-Api-Key": "api-Key-7731"},
        )
        assert ok.status == 202
        assert seen[-1]["Accept"] == "application/json" and seen[-1]["X-Api-Key"] == "api-Key-7731"
        assert "api-Key-7731" not in json.dumps(ok.evidence())
        with pytest.raises(AuthRejected) as refused:  # our key: broken, not a verdict
            trigger_app(url, json_body={}, secret_headers={"X-Api-Key": "wrong-Key-8842"})
    finally:
        server.shutdown()
        server.server_close()
    assert refused.value.credential == "trigger"
    assert "answered 401: the application refused X-Api-Key" in refused.value.message
    assert "wrong-Key-8842" not in redact(refused.value.message)


HEADERS_INVENTORY = INVENTORY.replace(
    'trigger.bearer_token_env = "U_TOKEN"\n',
    'trigger.bearer_token_env = "U_TOKEN"\n'
    'trigger.headers = { Accept = "application/json", X-Api-Key = { env = "U_API_KEY" } }\n',
).replace(
    'expect = { to = "probe@mailbox.test", subject_pattern = "invited" }',
    'expect = { to = "probe@mailbox.test", subject_pattern = "invited", window_seconds = 300 }',
)


def test_trigger_headers_and_window_from_the_inventory_reach_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    import opsdrill_pytest.mail as facade
    from opsdrill.config.inventory import load

    path = tmp_path / "inventory.toml"
    path.write_text(HEADERS_INVENTORY)
    with pytest.raises(ConfigError) as missing:
        load(path, environ=SECRETS)
    assert "probes.invite.trigger.headers.X-Api-Key.env: environment variable U_API_KEY" in (
        missing.value.message
    )
    inv = load(path, environ={**SECRETS, "U_API_KEY": "api-Key-5150"})
    calls: list[tuple[Any, dict[str, Any]]] = []

    def record(trigger: Any, mailbox: Any, **kw: Any) -> Any:
        calls.append((trigger, kw))
        raise AuthRejected("trigger", "answered 401: refused X-Api-Key", credential="trigger")

    monkeypatch.setattr(mail_suite, "run_triggered_probe", record)
    (target,) = [t for t in facade.mail_targets(inv).probes if t.name == "invite"]
    with pytest.raises(CredentialsRejected) as caught:
        target.result(request)
    ((trigger, kw),) = calls
    assert trigger.headers == {"Accept": "application/json"}
    assert trigger.secret_headers == {"X-Api-Key": "api-Key-5150"}
    assert "api-Key-5150" not in repr(trigger) + json.dumps(target.endpoints())
    assert target.endpoints()["trigger"]["headers"] == ["Accept", "X-Api-Key"]
    assert kw["window"] == 300
    assert "probes.invite.trigger.bearer_token_env = U_TOKEN" in caught.value.message


def test_literal_secret_headers_are_refused(tmp_path: Path) -> None:
    text = INVENTORY.replace(
        'trigger.bearer_token_env = "U_TOKEN"\n',
        'trigger.bearer_token_env = "U_TOKEN"\ntrigger.headers = { Cookie = "sid=Secret-99" }\n',
    )
    with pytest.raises(ConfigError) as caught:
        _inventory(tmp_path, text)
    assert "Cookie holds a secret: never write it here (fix: put it in an environment variable" in (
        caught.value.message
    )
    assert "Secret-99" not in caught.value.message


def test_window_seconds_bounds_how_old_a_matching_message_may_be() -> None:
    from opsdrill.mail.imap import Fetched

    since = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    token = "opsdrill-20261128120000-0123456789ab"
    raw = f"To: client@mailbox.test\r\nSubject: Activate {token}\r\n\r\nhi\r\n".encode()

    def received(seconds_before: float) -> Any:
        return Fetched(1, since - timedelta(seconds=seconds_before), raw)

    default = AppMessageMatch("client@mailbox.test", "^Activate", since, token)
    wide = AppMessageMatch("client@mailbox.test", "^Activate", since, token, window_seconds=300)
    assert default._fits(received(60), default.earliest)
    assert not default._fits(received(200), default.earliest)  # default window: 120 s
    assert wide._fits(received(200), wide.earliest)
    assert not wide._fits(received(301), wide.earliest)
    assert "2026-11-28 11:55:00 UTC (300 s before the trigger)" in wide.describe()
    with pytest.raises(ConfigError, match="window_seconds must be positive"):
        AppMessageMatch("a@b.test", "x", since, token, window_seconds=0)


def test_an_untrusted_trigger_certificate_names_the_triggers_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    import opsdrill_pytest.mail as facade
    from opsdrill_stack.mail import make_tls
    from tests.helpers.mail_fakes import fake_tls

    tls = make_tls(tmp_path / "tls")

    def send_only(trigger: Any, mailbox: Any, **kw: Any) -> Any:
        trigger_app(trigger.url, json_body={}, timeout=5, ca_file=trigger.ca_file)

    monkeypatch.setattr(mail_suite, "run_triggered_probe", send_only)
    with fake_tls(str(tls.cert), str(tls.key)) as port:
        text = INVENTORY.replace("http://127.0.0.1:9/invite", f"https://127.0.0.1:{port}/invite")
        (target,) = [t for t in facade.mail_targets(_inventory(tmp_path, text)).probes
                     if t.name == "invite"]  # fmt: skip
        with pytest.raises(TargetUnreachable) as caught:
            target.result(request)
    assert "TLS certificate verification failed" in caught.value.message
    assert "(fix: set probes.invite.trigger.ca_file to the PEM file of the CA" in (
        caught.value.message
    )
