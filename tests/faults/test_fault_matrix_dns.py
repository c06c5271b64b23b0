"""Every DNS check can fail: break one record on the worker's real Knot server, run the
real checks (subprocess, Allure results) and assert the named check FAILS naming the
fault; a resolver that never answers makes the checks broken, never passed.

Each xdist worker has its own stack (tests/conftest.py) and so its own Knot; the tests of
a worker run one after another and the ``knot`` fixture reloads every zone from its file
after each test, so an edit never outlives its test.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from opsdrill_stack import demo_dns
from opsdrill_stack.knot import KnotServer
from tests.conftest import CheckRun, Env, Stack, derive
from tests.helpers.registry import proves
from tests.helpers.results import labels, message

MAIN = demo_dns.MAIN.name  # example.test
PORTAL = demo_dns.PORTAL.name  # portal.example.net
MAIN_SPF = demo_dns.MAIN.spf_record  # v=spf1 mx include:_spf.relay-one.test -all
SUB = f"news.{MAIN}"  # a per-port sending subdomain, added by the tests that need it
DNS_CHECKS = [
    "dns.spf.record",
    "dns.spf.policy",
    "dns.spf.providers",
    "dns.spf.lookups",
    "dns.spf.senders",
    "dns.spf.hygiene",
    "dns.dkim.selector",
    "dns.dmarc.record",
    "dns.dmarc.policy",
    "dns.dmarc.reports",
    "dns.mx",
    "dns.discovery",
]
MIGRATION_CHECKS = ["migration.dkim", "migration.spf", "migration.dmarc"]
ANCHORS = {
    "spf": "#spf",
    "dkim": "#dkim",
    "dmarc": "#dmarc",
    "mx": "#mx",
    "discovery": "#discovery",
    "migration": "#migration",
}


# -- reading results per check AND target (a check runs once per domain or selector) --------


def assert_fails(run: CheckRun, check_id: str, target: str, *fragments: str) -> str:
    res = run.by_check(check_id, target)
    msg = message(res)
    assert res["status"] == "failed", f"{check_id}[{target}] is {res['status']}: {msg}"
    assert msg.startswith(f"opsdrill_pytest.checks.CheckFailed: {target}: "), msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {check_id}[{target}] message: {msg}"
    assert f"(check {check_id}; runbook: docs/runbooks/email-deliverability.md#" in msg
    attachments = {a["name"] for a in res.get("attachments", [])}
    if check_id != "dns.discovery":  # evidence: the raw answers and the report's JSON
        assert any(name.endswith("raw DNS answers") for name in attachments), attachments
        assert any(name.endswith("evidence") for name in attachments), attachments
    return msg


def assert_passes(run: CheckRun, check_id: str, target: str) -> None:
    res = run.by_check(check_id, target)
    assert res["status"] == "passed", f"{check_id}[{target}]: {res['status']}: {message(res)}"


def dns_checks(env: Env, *files: str, keyword: str = MAIN) -> CheckRun:
    """The DNS checks of ``files`` (all DNS checks by default) for targets matching
    ``keyword`` (default: example.test's domain and selectors)."""
    return env.run_checks(*files, extra=("-m", "dns", "-k", keyword))


def open_migration(env: Env, until: datetime | None = None) -> None:
    """example.test moves from relay-one to relay-two; the window ends at ``until``."""
    until = until or datetime.now(UTC).replace(microsecond=0) + timedelta(days=14)
    env.rewrite(
        lambda d: d["sending_domains"][MAIN].update(
            migration={"from": "relay-one", "to": "relay-two", "until": until}
        )
    )


def rsa_public_b64(bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def evidence(run: CheckRun, res: dict[str, Any], label: str) -> dict[str, Any]:
    (source,) = [a["source"] for a in res["attachments"] if a["name"] == f"{label}: evidence"]
    data: dict[str, Any] = json.loads((run.results_dir / source).read_text())
    return data


def add_sending_subdomain(env: Env, knot: KnotServer) -> None:
    """news.example.test sends like example.test and publishes SPF, but no _dmarc of its
    own: RFC 7489 6.6.3 gives it example.test's record, whose sp= applies."""
    env.rewrite(
        lambda d: d["sending_domains"].update({SUB: copy.deepcopy(d["sending_domains"][MAIN])})
    )
    knot.set_records(MAIN, "news", "TXT", demo_dns.PORTAL.spf_record)


def published_txt(knot: KnotServer, name: str) -> str:
    answer = knot.resolver().resolve(name, "TXT")
    (record,) = [b"".join(r.strings).decode() for r in answer]
    return record


# -- the healthy baseline ------------------------------------------------------------------


def test_unmodified_stack_passes_every_dns_check_with_labels(env: Env, knot: KnotServer) -> None:
    run = env.run_checks(extra=("-m", "dns"))
    seen: set[str] = set()
    for res in run.results:
        lab = labels(res)
        check_id = lab["check_id"]
        seen.add(check_id)
        family = check_id.split(".")[1] if check_id.startswith("dns.") else "migration"
        assert any(link["url"].endswith(ANCHORS[family]) for link in res["links"]), res["links"]
        assert ("tag", check_id) in {(x["name"], x["value"]) for x in res["labels"]}
        assert lab["severity"] in {"blocker", "critical", "normal", "minor"}
        assert lab["epic"] == ("mail" if check_id.startswith("migration.") else "dns")
        if check_id in MIGRATION_CHECKS:  # no domain of the stack is migrating
            assert res["status"] == "skipped", res
            assert "not configured: no sending domain is migrating" in message(res)
        else:
            assert res["status"] == "passed", f"{check_id}[{lab['target']}]: {message(res)}"
    assert set(DNS_CHECKS + MIGRATION_CHECKS) <= seen
    # one skip per migration check, not one per domain that is not migrating
    migration = [r for r in run.results if labels(r)["check_id"] in MIGRATION_CHECKS]
    assert len(migration) == len(MIGRATION_CHECKS), [r["name"] for r in migration]
    # the migration checks' one "not configured" skip each examined no target
    targets = {t for r in run.results if (t := labels(r).get("target"))}
    assert targets == {
        f"dns:{MAIN}",
        f"dns:{PORTAL}",
        f"dkim:{MAIN}/sel1",
        f"dkim:{MAIN}/r1",
        f"dkim:{PORTAL}/portal1",
        f"dkim:{PORTAL}/r1",
        "discovery:crm",
    }
    # the provider selector is a CNAME into relay-one.test, which Knot does not follow
    dkim_titles = {r["name"] for r in run.results if labels(r).get("target") == f"dkim:{MAIN}/r1"}
    assert dkim_titles == {
        f"{MAIN} publishes a usable DKIM key at selector r1 (provider relay-one, "
        "CNAME into dkim.relay-one.test)"
    }
    assert run.returncode == 0, run.output[-2000:]


# -- SPF -------------------------------------------------------------------------------------


@proves(failed=["dns.spf.record", "dns.spf.policy"])
def test_two_spf_records_fail_record(env: Env, knot: KnotServer) -> None:
    second = "v=spf1 include:_spf.relay-two.test -all"
    knot.set_records(MAIN, "@", "TXT", [MAIN_SPF, second])
    run = dns_checks(env, "check_dns_spf.py")
    assert_fails(
        run,
        "dns.spf.record",
        f"dns:{MAIN}",
        f"DNS {MAIN} TXT spf: expected exactly one 'v=spf1' record",
        "found 2:",
        MAIN_SPF,
        second,
    )
    # nothing can be evaluated from two records: the policy check says so, too
    assert_fails(run, "dns.spf.policy", f"dns:{MAIN}", "found 2 SPF records", "dns.spf.record")


@proves(failed=["dns.spf.policy"])
def test_softfail_fails_outside_a_migration_window_and_passes_inside(
    env: Env, knot: KnotServer
) -> None:
    knot.set_records(MAIN, "@", "TXT", MAIN_SPF.replace("-all", "~all"))
    run = dns_checks(env, "check_dns_spf.py")
    assert_fails(
        run,
        "dns.spf.policy",
        f"dns:{MAIN}",
        "expected '-all', found '~all'",
        "allowed only during a migration window",
        "no migration in the inventory",
    )
    assert_passes(run, "dns.spf.record", f"dns:{MAIN}")

    open_migration(env, until=datetime.now(UTC).replace(microsecond=0) - timedelta(days=1))
    closed = dns_checks(env, "check_dns_spf.py")
    assert_fails(closed, "dns.spf.policy", f"dns:{MAIN}", "found '~all'", "window closed at")

    open_migration(env)
    inside = dns_checks(env, "check_dns_spf.py")
    assert_passes(inside, "dns.spf.policy", f"dns:{MAIN}")
    title = inside.by_check("dns.spf.policy", f"dns:{MAIN}")["name"]
    assert title == f"{MAIN}'s SPF record ends in '-all' ('~all' allowed: migration window open)"


@proves(failed=["dns.spf.providers"])
def test_missing_provider_include_fails_providers(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "@", "TXT", "v=spf1 mx -all")
    run = dns_checks(env, "check_dns_spf.py")
    assert_fails(
        run,
        "dns.spf.providers",
        f"dns:{MAIN}",
        "expected mechanism 'include:_spf.relay-one.test'",
        "found no such mechanism in 'v=spf1 mx -all'",
        "needed by provider relay-one",
    )
    assert_passes(run, "dns.spf.record", f"dns:{MAIN}")
    assert_passes(run, "dns.spf.senders", f"dns:{MAIN}")  # mx still covers 127.0.0.1


@proves(failed=["dns.spf.lookups"])
def test_eleven_lookups_through_nested_includes_fail_lookups(env: Env, knot: KnotServer) -> None:
    # mx + include:relay-one + include:_spf-1 = 3 here, and _spf-1 .. _spf-8 each include
    # the next: 8 more, 11 in all; _spf-9 lists an address only.
    for n in range(1, 9):
        knot.set_records(MAIN, f"_spf-{n}", "TXT", f"v=spf1 include:_spf-{n + 1}.{MAIN} -all")
    knot.set_records(MAIN, "_spf-9", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    knot.set_records(MAIN, "@", "TXT", MAIN_SPF.replace(" -all", f" include:_spf-1.{MAIN} -all"))
    run = dns_checks(env, "check_dns_spf.py")
    assert_fails(
        run,
        "dns.spf.lookups",
        f"dns:{MAIN}",
        "expected at most 10 DNS-querying terms",
        f"found 11 ({MAIN}: 3, _spf-1.{MAIN}: 1,",
        f"_spf-8.{MAIN}: 1)",
    )
    tree = run.by_check("dns.spf.lookups", f"dns:{MAIN}")
    assert "spf include tree (lookups counted)" in {a["name"] for a in tree["attachments"]}
    assert_passes(run, "dns.spf.record", f"dns:{MAIN}")


@proves(failed=["dns.spf.lookups"])
def test_three_void_lookups_fail_lookups(env: Env, knot: KnotServer) -> None:
    voids = " ".join(f"a:void{n}.{MAIN}" for n in (1, 2, 3))
    knot.set_records(MAIN, "@", "TXT", MAIN_SPF.replace(" -all", f" {voids} -all"))
    run = dns_checks(env, "check_dns_spf.py")
    assert_fails(
        run,
        "dns.spf.lookups",
        f"dns:{MAIN}",
        "expected at most 2 void lookups",
        "found 3:",
        f"void1.{MAIN} A/AAAA (NXDOMAIN)",
        f"void3.{MAIN} A/AAAA (NXDOMAIN)",
    )


@proves(failed=["dns.spf.policy"])
def test_include_ending_in_plus_all_fails_policy(env: Env, knot: KnotServer) -> None:
    # The provider's record now passes everyone: example.test's own '-all' is never reached.
    knot.set_records("relay-one.test", "_spf", "TXT", "v=spf1 ip4:127.0.0.0/8 +all")
    run = dns_checks(env, "check_dns_spf.py")
    msg = assert_fails(
        run,
        "dns.spf.policy",
        f"dns:{MAIN}",
        "DNS _spf.relay-one.test TXT spf: expected a record that passes only the senders it "
        f"lists, reached from {MAIN} through 'include:_spf.relay-one.test'",
        "'v=spf1 ip4:127.0.0.0/8 +all', which passes check_host(203.0.113.254)",
        f"the whole internet may send as {MAIN}",
    )
    assert "found '-all'" not in msg
    for check_id in ("dns.spf.record", "dns.spf.providers", "dns.spf.senders"):
        assert_passes(run, check_id, f"dns:{MAIN}")
    data = evidence(run, run.by_check("dns.spf.policy", f"dns:{MAIN}"), "spf")
    assert data["final_all"] == "-all"
    assert data["probes"]["203.0.113.254"]["result"] == "pass"
    assert [p["record_at"] for p in data["permissive"]] == ["_spf.relay-one.test"]


@proves(failed=["dns.spf.hygiene"])
def test_ptr_and_a_dead_redirect_are_the_lesser_finding(env: Env, knot: KnotServer) -> None:
    # 127.0.0.1 still passes through mx before ptr is reached: the record works, minus ptr.
    knot.set_records(MAIN, "@", "TXT", MAIN_SPF.replace(" -all", " ptr -all"))
    run = dns_checks(env, "check_dns_spf.py")
    assert_fails(
        run,
        "dns.spf.hygiene",
        f"dns:{MAIN}",
        f"DNS {MAIN} TXT spf: expected no 'ptr' mechanism (deprecated",
        "some receivers skip it",
        "not a permerror: the record still evaluates",
    )
    assert labels(run.by_check("dns.spf.hygiene", f"dns:{MAIN}"))["severity"] == "minor"
    for check_id in ("dns.spf.record", "dns.spf.policy", "dns.spf.senders", "dns.spf.lookups"):
        assert_passes(run, check_id, f"dns:{MAIN}")

    knot.set_records(MAIN, "@", "TXT", f"{MAIN_SPF} redirect=_spf.relay-two.test")
    dead = dns_checks(env, "check_dns_spf.py")
    assert_fails(
        dead,
        "dns.spf.hygiene",
        f"dns:{MAIN}",
        "'redirect=_spf.relay-two.test' is ignored (RFC 7208 6.1)",
        "not a permerror",
    )
    assert_passes(dead, "dns.spf.record", f"dns:{MAIN}")
    assert_passes(dead, "dns.spf.senders", f"dns:{MAIN}")


# -- DKIM ------------------------------------------------------------------------------------


@proves(failed=["dns.dkim.selector"])
def test_revoked_dkim_key_fails_selector(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "sel1._domainkey", "TXT", "v=DKIM1; k=rsa; p=")
    run = dns_checks(env, "check_dns_dkim.py", keyword=f"dkim:{MAIN}/sel1")
    assert_fails(
        run,
        "dns.dkim.selector",
        f"dkim:{MAIN}/sel1",
        f"DNS sel1._domainkey.{MAIN} TXT dkim",
        "found an empty p= (the key is revoked)",
    )


@proves(failed=["dns.dkim.selector"])
def test_1024_bit_dkim_key_fails_selector(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "sel1._domainkey", "TXT", f"v=DKIM1; k=rsa; p={rsa_public_b64(1024)}")
    run = dns_checks(env, "check_dns_dkim.py", keyword=f"dkim:{MAIN}/sel1")
    assert_fails(
        run,
        "dns.dkim.selector",
        f"dkim:{MAIN}/sel1",
        "expected an RSA key of at least 2048 bits",
        "found a weak key of 1024 bits",
    )


@proves(failed=["dns.dkim.selector"])
def test_dkim_testing_flag_fails_selector(env: Env, knot: KnotServer) -> None:
    record = published_txt(knot, f"sel1._domainkey.{MAIN}")
    assert record.startswith("v=DKIM1; k=rsa; p=")
    knot.set_records(MAIN, "sel1._domainkey", "TXT", record.replace("k=rsa;", "k=rsa; t=y;"))
    run = dns_checks(env, "check_dns_dkim.py", keyword=f"dkim:{MAIN}/sel1")
    assert_fails(run, "dns.dkim.selector", f"dkim:{MAIN}/sel1", "expected no t=y", "found t=y")


# -- DMARC -----------------------------------------------------------------------------------


@proves(failed=["dns.dmarc.record", "dns.dmarc.policy"])
def test_missing_dmarc_fails_record(env: Env, knot: KnotServer) -> None:
    knot.remove_records(MAIN, "_dmarc", "TXT")
    run = dns_checks(env, "check_dns_dmarc.py")
    assert_fails(
        run,
        "dns.dmarc.record",
        f"dns:{MAIN}",
        f"DNS _dmarc.{MAIN} TXT dmarc: expected one record starting with 'v=DMARC1'",
        "found NXDOMAIN",
    )
    assert_fails(run, "dns.dmarc.policy", f"dns:{MAIN}", "no single DMARC record")


@proves(failed=["dns.dmarc.record"])
def test_two_dmarc_records_fail_record(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "_dmarc", "TXT", [demo_dns.DMARC_RECORD, "v=DMARC1; p=none"])
    run = dns_checks(env, "check_dns_dmarc.py")
    assert_fails(
        run,
        "dns.dmarc.record",
        f"dns:{MAIN}",
        "expected exactly one v=DMARC1 record",
        "found 2:",
        "'v=DMARC1; p=none'",
    )


@proves(failed=["dns.dmarc.policy"])
def test_dmarc_policy_none_below_the_minimum_fails_policy(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "_dmarc", "TXT", demo_dns.DMARC_RECORD.replace("p=reject;", "p=none;"))
    run = dns_checks(env, "check_dns_dmarc.py")
    assert_fails(
        run,
        "dns.dmarc.policy",
        f"dns:{MAIN}",
        f"DNS _dmarc.{MAIN} TXT dmarc: expected p=reject or stronger, found p=none",
    )
    assert_passes(run, "dns.dmarc.record", f"dns:{MAIN}")


@proves(failed=["dns.dmarc.reports"])
def test_external_rua_without_authorisation_fails_reports(env: Env, knot: KnotServer) -> None:
    reports = demo_dns.REPORTS_DOMAIN
    knot.remove_records(reports, f"{MAIN}._report._dmarc", "TXT")
    run = dns_checks(env, "check_dns_dmarc.py")
    assert_fails(
        run,
        "dns.dmarc.reports",
        f"dns:{MAIN}",
        f"DNS {MAIN}._report._dmarc.{reports} TXT dmarc",
        f"authorising {reports} to receive {MAIN}'s reports",
        "found NXDOMAIN",
    )
    # the other domain's authorisation is still published
    other = dns_checks(env, "check_dns_dmarc.py", keyword=PORTAL)
    assert_passes(other, "dns.dmarc.reports", f"dns:{PORTAL}")


@proves(failed=["dns.dmarc.policy"])
def test_subdomain_inheriting_sp_none_fails_policy_naming_the_inherited_record(
    env: Env, knot: KnotServer
) -> None:
    add_sending_subdomain(env, knot)
    knot.set_records(MAIN, "_dmarc", "TXT", demo_dns.DMARC_RECORD.replace("sp=reject;", "sp=none;"))
    run = dns_checks(env, "check_dns_dmarc.py", keyword=SUB)
    assert_fails(
        run,
        "dns.dmarc.policy",
        f"dns:{SUB}",
        f"DNS _dmarc.{MAIN} TXT dmarc inherited by {SUB} (no record of its own at "
        f"_dmarc.{SUB}: NXDOMAIN): expected sp=reject or stronger",
        "found sp=none",
    )
    # the inherited record is one valid record, and its reports are authorised
    assert_passes(run, "dns.dmarc.record", f"dns:{SUB}")
    assert_passes(run, "dns.dmarc.reports", f"dns:{SUB}")


def test_subdomain_inheriting_sp_reject_passes_and_says_inherited(
    env: Env, knot: KnotServer
) -> None:
    add_sending_subdomain(env, knot)
    run = dns_checks(env, "check_dns_dmarc.py", keyword=SUB)
    for check_id in ("dns.dmarc.record", "dns.dmarc.policy", "dns.dmarc.reports"):
        assert_passes(run, check_id, f"dns:{SUB}")
        res = run.by_check(check_id, f"dns:{SUB}")
        assert f"(inherited from _dmarc.{MAIN}: {SUB} has no record of its own" in res["name"]
        data = evidence(run, res, "dmarc")
        assert (data["inherited_from"], data["policy_record"]) == (MAIN, f"_dmarc.{MAIN}")
        assert data["applied_policy"] == "reject" and data["record"] == demo_dns.DMARC_RECORD
    title = run.by_check("dns.dmarc.policy", f"dns:{SUB}")["name"]
    assert title.startswith(f"{SUB}'s DMARC record sets sp=reject or stronger")


# -- MX --------------------------------------------------------------------------------------


@proves(failed=["dns.mx"])
def test_mx_at_the_application_host_fails(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "@", "MX", f"10 {demo_dns.APP_HOST}.")
    run = dns_checks(env, "check_dns_mx.py")
    assert_fails(
        run,
        "dns.mx",
        f"dns:{MAIN}",
        f"DNS {MAIN} MX mx: expected no MX target among the forbidden hosts",
        f"found '{demo_dns.APP_HOST}'",
    )


@proves(failed=["dns.mx"])
def test_mx_target_that_is_a_cname_fails(env: Env, knot: KnotServer) -> None:
    knot.set_records(MAIN, "mail-alias", "CNAME", f"{demo_dns.MAIL_HOST}.")
    knot.set_records(MAIN, "@", "MX", f"10 mail-alias.{MAIN}.")
    run = dns_checks(env, "check_dns_mx.py")
    assert_fails(
        run,
        "dns.mx",
        f"dns:{MAIN}",
        "expected MX targets that are host names, not CNAMEs",
        f"found 'mail-alias.{MAIN}' is a CNAME to '{demo_dns.MAIL_HOST}'",
    )


# -- discovery -------------------------------------------------------------------------------


@proves(failed=["dns.discovery"])
def test_discovered_domain_without_expectations_fails_discovery(
    stack: Stack, tmp_path: Path
) -> None:
    env = derive(stack, tmp_path, own_database=True)  # the row goes into this test's copy
    dbname = env.data["databases"]["crm"]["dsn"].rsplit("/", 1)[1]
    with stack.live_conn(dbname) as conn:
        conn.execute(
            "INSERT INTO crm.email_settings (id, portal, from_address) "
            "VALUES (9001, 'shadow-port', 'news@Shadow.Example.COM')"
        )
    try:
        run = env.run_checks("check_dns_discovery.py")
    finally:
        with stack.live_conn(dbname) as conn:
            conn.execute("DELETE FROM crm.email_settings WHERE id = 9001")
    assert_fails(
        run,
        "dns.discovery",
        "discovery:crm",
        "domain shadow.example.com sends mail but the inventory says nothing about which "
        "provider sends for it",
        "found by sending_domain_discovery.query in crm (127.0.0.1:",
        f"/{dbname})",
    )
    msg = message(run.by_check("dns.discovery", "discovery:crm"))
    assert MAIN not in msg.split("found:", 1)[1] and PORTAL not in msg.split("found:", 1)[1]


@proves(broken=["dns.discovery"])
def test_discovery_database_refusing_our_login_is_broken_naming_the_variable(
    env: Env, tmp_path: Path
) -> None:
    var = env.data["databases"]["crm"]["password_env"]
    env.with_secret(tmp_path, var, "rotated-elsewhere-4b1d")
    run = env.run_checks("check_dns_discovery.py")
    res = run.by_check("dns.discovery", "discovery:crm")
    assert res["status"] == "broken", message(res)
    assert f"databases.crm.password_env = {var}, set in env_file" in message(res)
    assert run.returncode == 2, run.output[-2000:]
    assert "rotated-elsewhere-4b1d" not in run.output


# -- an unreachable resolver -----------------------------------------------------------------


@proves(broken=DNS_CHECKS[:-1])
def test_resolver_timeout_is_broken_not_failed(env: Env) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives the queries, never answers
        port = silent.getsockname()[1]
        env.rewrite(
            lambda d: d["dns"].update(nameservers=["127.0.0.1"], port=port, timeout_seconds=0.3)
        )
        run = env.run_checks(extra=("-m", "dns"))
    statuses: dict[str, set[str]] = {}
    for res in run.results:
        lab = labels(res)
        statuses.setdefault(lab["check_id"], set()).add(res["status"])
        if lab["check_id"] in ("dns.discovery", *MIGRATION_CHECKS):
            continue  # SQL, not DNS; migration checks skip: nothing is migrating
        assert res["status"] == "broken", f"{lab['check_id']}[{lab['target']}]: {res['status']}"
        assert f"timed out asking 127.0.0.1:{port}" in message(res), message(res)
    assert {c: s for c, s in statuses.items() if c in DNS_CHECKS[:-1]} == {
        c: {"broken"} for c in DNS_CHECKS[:-1]
    }
    assert run.returncode != 0


# -- migration readiness ---------------------------------------------------------------------


def test_migration_ready_when_new_provider_is_published(env: Env, knot: KnotServer) -> None:
    relay_two = demo_dns.RELAY_TWO
    open_migration(env)
    knot.set_records(
        MAIN, "@", "TXT", MAIN_SPF.replace(" -all", f" {relay_two.spf_mechanism} -all")
    )
    knot.set_records(MAIN, "r2._domainkey", "CNAME", f"{relay_two.selector_target}.")
    run = dns_checks(env)
    for check_id in MIGRATION_CHECKS:
        assert_passes(run, check_id, f"dns:{MAIN}")
    assert_passes(run, "dns.dkim.selector", f"dkim:{MAIN}/r2")
    assert_passes(run, "dns.spf.providers", f"dns:{MAIN}")
    title = run.by_check("migration.dkim", f"dns:{MAIN}")["name"]
    assert title == (
        f"{MAIN} is ready to move relay-one -> relay-two: both providers' DKIM selectors resolve"
    )


@proves(failed=["migration.dkim"])
def test_migration_not_ready_names_the_missing_selector(env: Env, knot: KnotServer) -> None:
    relay_two = demo_dns.RELAY_TWO
    open_migration(env)
    knot.set_records(
        MAIN, "@", "TXT", MAIN_SPF.replace(" -all", f" {relay_two.spf_mechanism} -all")
    )
    run = dns_checks(env)
    assert_fails(
        run,
        "migration.dkim",
        f"dns:{MAIN}",
        f"DNS r2._domainkey.{MAIN} TXT dkim",
        "expected a CNAME into 'dkim.relay-two.test'",
        f"provider relay-two's selector r2._domainkey.{MAIN}",
    )
    assert_passes(run, "migration.spf", f"dns:{MAIN}")
    assert_fails(run, "dns.dkim.selector", f"dkim:{MAIN}/r2", "found NXDOMAIN")


@proves(failed=["migration.spf"])
def test_migration_not_ready_without_the_new_provider_in_spf(env: Env, knot: KnotServer) -> None:
    open_migration(env)
    run = dns_checks(env, "check_mail_migration.py")
    assert_fails(
        run,
        "migration.spf",
        f"dns:{MAIN}",
        "expected mechanism 'include:_spf.relay-two.test'",
        "missing include:_spf.relay-two.test for provider relay-two",
    )


@proves(failed=["dns.spf.senders"])
def test_sending_ip_outside_every_authorised_range_fails_senders(
    env: Env, knot: KnotServer
) -> None:
    # The provider moved its range and the domain no longer lists mx: 127.0.0.1 is out.
    knot.set_records("relay-one.test", "_spf", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    knot.set_records(MAIN, "@", "TXT", "v=spf1 include:_spf.relay-one.test -all")
    run = dns_checks(env, "check_dns_spf.py")
    msg = assert_fails(run, "dns.spf.senders", f"dns:{MAIN}", "127.0.0.1")
    assert "fail" in msg
    assert_passes(run, "dns.spf.record", f"dns:{MAIN}")
    assert_passes(run, "dns.spf.providers", f"dns:{MAIN}")


@proves(failed=["migration.dmarc"])
def test_migration_without_dmarc_reports_fails_migration_dmarc(env: Env, knot: KnotServer) -> None:
    open_migration(env)
    env.rewrite(lambda d: d["sending_domains"][MAIN]["dmarc"].update(require_rua=False))
    knot.set_records(MAIN, "_dmarc", "TXT", "v=DMARC1; p=reject; sp=reject; adkim=r; aspf=r")
    run = dns_checks(env, "check_mail_migration.py", "check_dns_dmarc.py")
    assert_fails(run, "migration.dmarc", f"dns:{MAIN}", "rua", "relay-one -> relay-two")
    assert_passes(run, "dns.dmarc.reports", f"dns:{MAIN}")  # not required outside a migration
