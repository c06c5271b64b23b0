"""The four outcomes mean one thing each, wherever an operator looks: Allure's status, the
word pytest prints, pytest's summary line, the process exit code and the metrics file.

The first half runs a small suite of synthetic checks (our real plugin, no targets) that
raise each kind of thing a check can raise; the second half breaks the local stack's real
targets and runs the real checks.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, CheckRun, Env, Stack, derive, run_pytest
from tests.helpers.registry import proves

SYNTHETIC = """
import pytest
from opsdrill_pytest.checks import Check
from opsdrill.errors import CredentialsRejected, TargetUnreachable

RUNBOOK = "docs/runbooks/backup-and-restore.md#freshness"
OK = Check("demo.ok", "normal", RUNBOOK, "demo", "demo")
FAILS = Check("demo.fails", "normal", RUNBOOK, "demo", "demo")
BARE = Check("demo.bare_assert", "normal", RUNBOOK, "demo", "demo")
DOWN = Check("demo.unreachable", "normal", RUNBOOK, "demo", "demo")
CREDS = Check("demo.credentials", "normal", RUNBOOK, "demo", "demo")
SETUP = Check("demo.fixture_assert", "normal", RUNBOOK, "demo", "demo")
SKIP = Check("demo.not_configured", "normal", RUNBOOK, "demo", "demo")
LEAK = Check("demo.secret_in_frame", "normal", RUNBOOK, "demo", "demo")


@pytest.fixture
def facade():
    answer = None
    assert answer is not None, "the facade found no target"


@OK
def check_ok():
    pass


@FAILS
def check_fails():
    FAILS.fail("demo:x", "expected 3 backups, found 2")


@BARE
def check_bare_assert():
    report = None
    assert report is not None, "drill report missing"


@DOWN
def check_unreachable():
    raise TargetUnreachable(
        "store offsite (http://127.0.0.1:9/b) unreachable: connection refused "
        "(fix: check stores.offsite.endpoint)"
    )


@CREDS
def check_credentials():
    raise CredentialsRejected(
        "IMAP 127.0.0.1:993 refused the login of probe@x (fix: check "
        "probes.tx.imap.password_env = PROBE_IMAP_PASSWORD, set in the environment)"
    )


@SETUP
def check_fixture_assert(facade):
    pass


@SKIP
def check_not_configured():
    pytest.skip("no [mirrors] in the inventory")


def login(user, password):  # a long traceback shows this frame's arguments
    raise CredentialsRejected(f"IMAP refused the login of {user} (fix: check X_PASSWORD)")


@LEAK
def check_secret_in_frame():
    from opsdrill.redact import register

    login("probe@x", register("hunter2-in-a-frame-9c1"))
"""


def synthetic(tmp_path: Path, *extra: str) -> CheckRun:
    suite = tmp_path / "suite"
    if not suite.exists():
        suite.mkdir()
        (suite / "check_demo.py").write_text(textwrap.dedent(SYNTHETIC))
    results = tmp_path / f"allure-{uuid.uuid4().hex[:6]}"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(suite),
        "--local-stack",
        "never",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(suite),
        "-o",
        "python_files=check_*.py",
        "-o",
        "python_functions=check_*",
        "-o",
        "addopts=",
        "-v",
        "-ra",
        "--alluredir",
        str(results),
        *extra,
    ]
    return run_pytest(argv, results, cwd=ROOT)


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


LAST_SUCCESS = ("opsdrill_checks_last_success_timestamp_seconds", ())


def test_each_kind_of_raise_has_one_outcome_everywhere(tmp_path: Path) -> None:
    run = synthetic(tmp_path)
    expected = {
        "demo.ok": "passed",
        "demo.fails": "failed",
        "demo.bare_assert": "broken",
        "demo.unreachable": "broken",
        "demo.credentials": "broken",
        "demo.fixture_assert": "broken",
        "demo.not_configured": "skipped",
        "demo.secret_in_frame": "broken",
    }
    for check_id, status in expected.items():
        run.assert_outcome(check_id, status, exit_code=1)  # a failure outranks the rest
    assert run.summary == {"failed": 1, "broken": 5, "passed": 1, "skipped": 1}, run.output
    # a frame's arguments reach neither the terminal nor Allure's trace
    trace = run.by_check("demo.secret_in_frame")["statusDetails"]["trace"]
    assert "password = ***" in trace, trace
    for text in [run.output, *(p.read_text() for p in run.results_dir.iterdir())]:
        assert "hunter2-in-a-frame-9c1" not in text
    # a bare assert is our bug, said so; it is never a verdict on the target
    assert "this is a bug in opsdrill, not a verdict on the target" in run.message(
        "demo.bare_assert"
    )
    assert "the facade found no target" in run.message("demo.fixture_assert")
    # the terminal names what to fix for each broken check, not only in Allure
    assert "broken: opsdrill could not judge these" in run.output
    for fix in ("stores.offsite.endpoint", "probes.tx.imap.password_env"):
        assert any(
            line.startswith("BROKEN ") and fix in line for line in run.output.splitlines()
        ), run.output[-3000:]
    assert "no [mirrors] in the inventory" in run.output
    assert "NOTSET" not in run.output


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["one process", "xdist"])
def test_broken_without_failures_is_exit_2_and_says_broken(
    tmp_path: Path, workers: tuple[str, ...]
) -> None:
    path = tmp_path / "checks.prom"
    run = synthetic(
        tmp_path,
        "-k",
        "unreachable or credentials or check_ok",
        "--metrics-file",
        str(path),
        *workers,
    )
    run.assert_outcome("demo.unreachable", "broken", exit_code=2)
    run.assert_outcome("demo.credentials", "broken", exit_code=2)
    run.assert_outcome("demo.ok", "passed")
    counts = {k: n for k, n in run.summary.items() if k != "deselected"}  # xdist omits it
    assert counts == {"broken": 2, "passed": 1}, run.output
    assert " failed" not in run.output.splitlines()[-1], "pytest's summary said failed"
    got = samples(path)
    assert got[("opsdrill_checks", (("area", "demo"), ("outcome", "broken")))] == 2
    assert LAST_SUCCESS not in got


def test_a_run_that_skipped_everything_examined_nothing_and_is_not_green(tmp_path: Path) -> None:
    path = tmp_path / "checks.prom"
    run = synthetic(tmp_path, "-k", "not_configured", "--metrics-file", str(path))
    run.assert_outcome("demo.not_configured", "skipped", exit_code=2)
    assert "every check was skipped, so nothing was verified" in run.output
    assert LAST_SUCCESS not in samples(path)

    green = synthetic(tmp_path, "-k", "ok or not_configured", "--metrics-file", str(path))
    assert green.returncode == 0, green.output[-2000:]
    assert samples(path)[LAST_SUCCESS] > 0


# -- the real checks against the local stack's targets -------------------------------------


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DRILL_CHECKS = ["pg.drill.sandbox_guard", "pg.drill.restore", "pg.drill.rto", "pg.drill.drift"]


@proves(broken=DRILL_CHECKS[1:])
def test_live_server_down_breaks_the_drill_checks_naming_the_dsn(env: Env) -> None:
    env.backup()
    live_port = env.stack.stack.state["components"]["pg_live"]["port"]
    port = _dead_port()
    env.rewrite(
        lambda d: d["databases"]["crm"].update(
            dsn=d["databases"]["crm"]["dsn"].replace(f":{live_port}/", f":{port}/")
        )
    )
    run = env.run_checks("check_pg_drill.py")
    for check_id in DRILL_CHECKS[1:]:  # they compare with live: nothing to judge without it
        run.assert_outcome(check_id, "broken", exit_code=2)
        msg = run.message(check_id)
        assert f"127.0.0.1:{port}" in msg and "fix: check databases.crm.dsn" in msg, msg
    # the guard still judges: the manifest names the live cluster, the sandbox is another
    run.assert_outcome("pg.drill.sandbox_guard", "passed")
    assert run.summary == {"broken": 3, "passed": 1}, run.output[-2000:]


@proves(broken=["pg.drill.restore", "pg.drill.drift"])
def test_a_rejected_live_password_is_broken_naming_the_variable(env: Env, tmp_path: Path) -> None:
    env.backup()
    var = env.data["databases"]["crm"]["password_env"]
    env.with_secret(tmp_path, var, "not-the-password-7f3a")
    run = env.run_checks("check_pg_drill.py")
    run.assert_outcome("pg.drill.sandbox_guard", "passed")  # judged on the manifest
    for check_id in ("pg.drill.restore", "pg.drill.drift"):
        run.assert_outcome(check_id, "broken", exit_code=2)
        msg = run.message(check_id)
        assert "refused opsdrill's login as opsdrill" in msg, msg
        assert f"databases.crm.password_env = {var}, set in env_file" in msg, msg
    assert "not-the-password-7f3a" not in run.output


@proves(
    broken=[
        "pg.backup.freshness",
        "pg.backup.completeness",
        "pg.backup.encryption",
        "pg.backup.retention",
        "pg.drill.restore",
        "pg.drill.rto",
        "pg.drill.drift",
    ]
)
def test_a_store_that_does_not_answer_breaks_every_backup_check(env: Env) -> None:
    env.backup()
    port = _dead_port()
    env.rewrite(
        lambda d: d["stores"]["offsite"].update(endpoint=f"127.0.0.1:{port}", timeout_seconds=2.0)
    )
    run = env.run_checks(
        "check_pg_freshness.py",
        "check_pg_completeness.py",
        "check_pg_encryption.py",
        "check_pg_retention.py",
        "check_pg_drill.py",
    )
    for check_id in (
        "pg.backup.freshness",
        "pg.backup.completeness",
        "pg.backup.encryption",
        "pg.backup.retention",
        "pg.drill.restore",
    ):
        run.assert_outcome(check_id, "broken", exit_code=2)
        msg = run.message(check_id)
        assert f"store offsite (http://127.0.0.1:{port}/" in msg, msg
        assert "unreachable: connection refused (fix: check stores.offsite.endpoint" in msg, msg
        assert "MaxRetryError" not in msg and "HTTPConnection" not in msg, msg
    run.assert_passes("pg.drill.sandbox_guard")  # it asks the servers, not the store


@pytest.mark.parametrize(
    "body",
    [b"", b'{"format": "opsdrill-backup-manifest/1", "id": "x"', b"[]"],
    ids=["empty", "truncated", "not an object"],
)
@proves(failed=["pg.backup.completeness", "pg.drill.restore"])
def test_a_corrupt_manifest_fails_the_backup_it_never_breaks_the_check(
    stack: Stack, tmp_path: Path, body: bytes
) -> None:
    env = derive(stack, tmp_path)
    env.backup()
    ref = env.refs()[-1]
    s3, store = env.s3()
    import io

    s3.put_object(store.bucket, ref.manifest_key, io.BytesIO(body), len(body))
    run = env.run_checks("check_pg_completeness.py", "check_pg_drill.py")
    run.assert_outcome("pg.backup.completeness", "failed", exit_code=1)
    run.assert_fails(
        "pg.backup.completeness",
        f"backup {ref.id}: expected a readable manifest, found manifest: {ref.manifest_key} "
        "is not a valid manifest",
    )
    run.assert_outcome("pg.drill.restore", "failed")
    # the only backup's manifest is bad: the drill passes it over and has nothing to restore
    run.assert_fails(
        "pg.drill.restore",
        f"drill failed at select: no good backup of crm in store offsite; passed over: {ref.id}",
        "is not a valid manifest",
    )


@pytest.mark.parametrize(("fault", "code"), [("none", 0), ("stale backup", 1), ("store down", 2)])
def test_the_readme_main_command_exits_with_the_check_runs_code(
    env: Env, tmp_path: Path, fault: str, code: int
) -> None:
    """scripts/verify (the README's main command) keeps 0/1/2 apart; make would say 2."""
    import os
    import subprocess
    from datetime import UTC, datetime, timedelta

    env.backup(now=datetime.now(UTC) - timedelta(hours=3) if fault == "stale backup" else None)
    if fault == "store down":
        port = _dead_port()
        env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint=f"127.0.0.1:{port}"))
    results = tmp_path / "results"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "verify"), "-m", "backups", "-k", "rpo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OPSDRILL_"))},
            "INVENTORY": str(env.path),
            "ALLURE_RESULTS": str(results),
            "PYTEST_WORKERS": "1",
        },
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert list(results.glob("*-result.json")), "the Allure results are written"
    word = {0: "every examined check passed", 1: "a check FAILED", 2: "could not be judged"}
    assert word[code] in out, out[-2000:]


@proves(broken=["pg.drill.restore", "secrets.bundle.decrypts"])
def test_a_wrong_drill_passphrase_is_broken_not_a_bad_backup(env: Env, tmp_path: Path) -> None:
    """gpg says "No secret key" for a wrong passphrase and for a backup encrypted to
    someone else; only the second is the backup's fault."""
    from opsdrill.secrets.bundle import backup_bundle

    env.backup()
    backup_bundle(env.inv, "app")
    var = env.data["gpg"]["drill_passphrase_env"]
    env.with_secret(tmp_path, var, "not-the-passphrase-1e2f")
    run = env.run_checks("check_pg_drill.py", "check_secrets_bundle.py")
    for check_id in ("pg.drill.restore", "secrets.bundle.decrypts"):
        run.assert_outcome(check_id, "broken", exit_code=2)
        assert f"gpg.drill_passphrase_env = {var}, set in env_file" in run.message(check_id)
    assert "not-the-passphrase-1e2f" not in run.output
