"""Every backup check can fail: break the target the way the check guards against, run the
real checks (subprocess, Allure results) and assert the check FAILS naming the fault."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.conftest import Env, Stack, derive
from tests.helpers.history import plant_history
from tests.helpers.registry import proves

ALL_BACKUP_CHECKS = [
    "pg.backup.freshness",
    "pg.backup.completeness",
    "pg.backup.encryption",
    "pg.backup.retention",
    "pg.drill.sandbox_guard",
    "pg.drill.restore",
    "pg.drill.rto",
    "pg.drill.drift",
]


def _replace_object(env: Env, key: str, body: bytes) -> None:
    s3, store = env.s3()
    s3.put_object(store.bucket, key, io.BytesIO(body), len(body))


def _get_object(env: Env, key: str) -> bytes:
    s3, store = env.s3()
    resp = s3.get_object(store.bucket, key)
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


def test_healthy_targets_pass_every_check_with_labels(stack: Stack, tmp_path: Path) -> None:
    """Every check in checks/, against targets the real operations just produced."""
    from opsdrill.files.mirror import run_mirror
    from opsdrill.secrets.bundle import backup_bundle

    env = derive(stack, tmp_path, own_files=5)
    env.backup()
    assert run_mirror(env.inv, "files").ok
    backup_bundle(env.inv, "app")
    run = env.run_checks()
    check_ids = {
        lab["value"] for res in run.results for lab in res["labels"] if lab["name"] == "check_id"
    }
    assert set(ALL_BACKUP_CHECKS) <= check_ids and len(check_ids) >= 16
    for res in run.results:
        labels = {(lab["name"], lab["value"]) for lab in res["labels"]}
        check_id = next(v for n, v in labels if n == "check_id")
        # migration checks skip, once each: no domain is migrating here; the single-hop
        # stack writes no Authentication-Results, so nothing to judge
        skips = check_id.startswith("migration.") or check_id == "mail.probe.auth_results"
        expected = "skipped" if skips else "passed"
        assert res["status"] == expected, (check_id, res["name"], res.get("statusDetails"))
        assert ("tag", check_id) in labels
        assert {v for n, v in labels if n == "epic"} <= {"backups", "storage", "dns", "mail"}
        assert {v for n, v in labels if n == "severity"} <= {
            "blocker",
            "critical",
            "normal",
            "minor",
        }
        # a "not configured" skip examined no target: it has no target label
        not_configured = "not configured" in res.get("statusDetails", {}).get("message", "")
        assert any(n == "target" for n, _ in labels) != not_configured, res
        assert any("docs/runbooks/" in link["url"] for link in res["links"])
    assert run.returncode == 0, run.output[-2000:]


@proves(failed=["pg.backup.freshness"])
def test_stale_backup_fails_freshness(env: Env) -> None:
    env.backup(now=datetime.now(UTC) - timedelta(hours=3))
    run = env.run_checks("check_pg_freshness.py")
    run.assert_fails("pg.backup.freshness", "pg:crm", "younger than 60 min (RPO)", "min old")


@proves(failed=["pg.backup.completeness", "pg.backup.freshness"])
def test_missing_manifest_fails_completeness_and_freshness(env: Env) -> None:
    env.backup()
    ref = env.refs()[-1]
    s3, store = env.s3()
    s3.remove_object(store.bucket, ref.manifest_key)
    run = env.run_checks("check_pg_completeness.py", "check_pg_freshness.py")
    run.assert_fails("pg.backup.completeness", f"backup {ref.id} has no manifest")
    run.assert_fails("pg.backup.freshness", "no complete backup", "1 incomplete")


@proves(failed=["pg.backup.completeness", "pg.drill.restore"])
def test_truncated_object_fails_completeness_and_drill(env: Env) -> None:
    env.backup()
    ref = env.refs()[-1]
    body = _get_object(env, ref.data_key)
    _replace_object(env, ref.data_key, body[: len(body) // 2])
    run = env.run_checks("check_pg_completeness.py", "check_pg_drill.py")
    run.assert_fails("pg.backup.completeness", "truncated or replaced")
    run.assert_fails("pg.drill.restore", "drill failed at verify", "truncated")


@proves(failed=["pg.backup.completeness"])
def test_flipped_byte_fails_completeness(env: Env) -> None:
    env.backup()
    ref = env.refs()[-1]
    body = bytearray(_get_object(env, ref.data_key))
    body[len(body) // 2] ^= 0x01
    _replace_object(env, ref.data_key, bytes(body))
    run = env.run_checks("check_pg_completeness.py")
    run.assert_fails("pg.backup.completeness", "expected sha256", "object corrupted")


@proves(failed=["pg.backup.encryption"])
def test_unencrypted_object_fails_encryption(env: Env) -> None:
    env.rewrite(lambda d: d["databases"]["crm"].update(encrypt=False))
    env.backup()
    env.rewrite(lambda d: d["databases"]["crm"].update(encrypt=True))
    run = env.run_checks("check_pg_encryption.py")
    run.assert_fails("pg.backup.encryption", "expected OpenPGP, found zstd", "unencrypted")


@proves(failed=["pg.backup.encryption"])
def test_wrong_recipient_fails_encryption(env: Env, tmp_path: Path) -> None:
    expected = env.data["gpg"]["recipients"][0]
    with env.encrypting_to_another_key(tmp_path):
        env.backup()
    run = env.run_checks("check_pg_encryption.py")
    run.assert_fails("pg.backup.encryption", "expected recipients", expected, "unexpected:")


@proves(failed=["pg.drill.drift"])
def test_rows_deleted_after_backup_fail_drift(stack: Stack, tmp_path: Path) -> None:
    env = derive(stack, tmp_path, own_database=True)
    env.backup()
    dbname = env.data["databases"]["crm"]["dsn"].rsplit("/", 1)[1]
    with stack.live_conn(dbname) as conn:
        conn.execute('DELETE FROM "Sales Ops"."Order Lines" WHERE id % 2 = 0')
    run = env.run_checks("check_pg_drill.py")
    run.assert_passes("pg.drill.restore")
    run.assert_fails("pg.drill.drift", '"Sales Ops"."Order Lines"', "fewer; tolerance 10%")


@proves(failed=["pg.drill.restore"])
def test_row_missing_from_dump_fails_drill_manifest_match(stack: Stack, tmp_path: Path) -> None:
    """The dump lacks a row the manifest counted: completeness passes, the drill must not."""
    env = derive(stack, tmp_path, own_database=True)
    now = datetime.now(UTC).replace(microsecond=0)
    good = env.backup(now=now - timedelta(minutes=5))
    dbname = env.data["databases"]["crm"]["dsn"].rsplit("/", 1)[1]
    with stack.live_conn(dbname) as conn:
        conn.execute(
            'DELETE FROM "Sales Ops"."Order Lines" WHERE id = '
            '(SELECT min(id) FROM "Sales Ops"."Order Lines")'
        )
    short = env.backup(now=now - timedelta(minutes=1))
    refs = {r.id: r for r in env.refs()}
    body = _get_object(env, short.object["key"])
    _replace_object(env, good.object["key"], body)
    manifest = json.loads(_get_object(env, refs[good.id].manifest_key))
    manifest["object"].update(size=short.object["size"], sha256=short.object["sha256"])
    _replace_object(env, refs[good.id].manifest_key, json.dumps(manifest).encode())
    s3, store = env.s3()
    for key in (refs[short.id].data_key, refs[short.id].manifest_key):
        s3.remove_object(store.bucket, key)
    run = env.run_checks("check_pg_completeness.py", "check_pg_drill.py")
    run.assert_passes("pg.backup.completeness")
    table = '"Sales Ops"."Order Lines"'
    expected = good.tables[table]["rows"]
    run.assert_fails(
        "pg.drill.restore", f"{table}: manifest {expected} rows, restored {expected - 1}"
    )


@proves(failed=["pg.drill.rto"])
def test_drill_over_rto_fails(env: Env) -> None:
    env.backup()
    env.rewrite(lambda d: d["databases"]["crm"].update(rto_minutes=0.0001))
    run = env.run_checks("check_pg_drill.py")
    run.assert_fails("pg.drill.rto", "expected the drill within", "(RTO)")


@proves(failed=["pg.drill.sandbox_guard", "pg.drill.restore"])
def test_sandbox_pointing_at_live_is_refused(env: Env) -> None:
    """The live cluster as sandbox, at its own address and through another one (there its
    system identifier gives it away; tests/faults/test_drill_guard.py: also with live down)."""
    env.backup()
    live = env.data["databases"]["crm"]
    server = live["dsn"].rsplit("/", 1)[0]
    for host, why in (
        ("127.0.0.1", "(same address)"),
        ("localhost", "the same cluster (system identifier"),
    ):
        env.rewrite(
            lambda d, host=host: d["databases"]["crm"]["sandbox"].update(
                dsn=server.replace("@127.0.0.1:", f"@{host}:") + "/postgres",
                password_env=live["password_env"],
            )
        )
        run = env.run_checks("check_pg_drill.py")
        run.assert_fails(
            "pg.drill.sandbox_guard", "is the live server", why, "never write to production"
        )
        run.assert_fails("pg.drill.restore", "drill refused")


@proves(failed=["pg.backup.retention"])
def test_retention_gap_fails_retention(env: Env) -> None:
    now = datetime.now(UTC)
    env.backup(now=now)
    gap = (now - timedelta(hours=5)).replace(minute=0, second=0, microsecond=0)
    plant_history(env, now, days=9, skip_hours={gap})
    run = env.run_checks("check_pg_retention.py")
    run.assert_fails("pg.backup.retention", "missing_hour", f"{gap:%Y-%m-%dT%H}:00Z")


@proves(failed=["pg.backup.retention"])
def test_retention_over_keeping_fails_retention(env: Env) -> None:
    now = datetime.now(UTC)
    env.backup(now=now)
    plant_history(env, now, days=9, extra=[now - timedelta(days=40)])
    run = env.run_checks("check_pg_retention.py")
    run.assert_fails("pg.backup.retention", "kept_past_policy")


def test_healthy_history_passes_retention_and_prune_keeps_it(env: Env) -> None:
    now = datetime.now(UTC)
    env.backup(now=now)
    plant_history(env, now, days=40)
    from opsdrill.backups.prune import prune

    prune(env.inv, "crm", dry_run=False, now=now)
    run = env.run_checks("check_pg_retention.py")
    run.assert_passes("pg.backup.retention")


@proves(broken=["pg.backup.freshness"])
def test_unreachable_store_is_broken_not_failed(env: Env) -> None:
    from opsdrill_stack.procs import free_port

    env.rewrite(
        lambda d: d["stores"]["offsite"].update(
            endpoint=f"127.0.0.1:{free_port()}", timeout_seconds=2.0
        )
    )
    run = env.run_checks("check_pg_freshness.py")
    res = run.by_check("pg.backup.freshness")
    assert res["status"] == "broken", res
    assert "unreachable" in run.message("pg.backup.freshness")
