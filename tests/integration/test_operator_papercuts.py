"""What a new operator trips over (issue 17): messages that name both fixes, commands that
say what they found, a restore that refuses before asking and suggests only what applies,
progress that never swallows an error line, check runs that leave a trace when they
cannot start, and runbook links that work in a hosted report."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opsdrill.config.inventory import load
from opsdrill.errors import ConfigError
from tests.conftest import ROOT, Env, opsdrill, run_pytest
from tests.integration.test_operations import restore_into_sandbox

# ------------------------------------------------------------------ missing secrets

INVENTORY = """\
name = "papercuts"
{env_file}
[stores.offsite]
endpoint = "127.0.0.1:9"
bucket = "crm-backups"
secure = false
access_key_env = "T_ACCESS"
secret_key_env = "T_SECRET"

[databases.crm]
dsn = "postgresql://backup@127.0.0.1:5/crm"
password_env = "T_DB_PASSWORD"
encrypt = false
"""


def test_a_missing_secret_names_its_key_and_both_ways_to_set_it(tmp_path: Path) -> None:
    secrets_file = tmp_path / "opsdrill.env"
    secrets_file.write_text("T_ACCESS=a-key\nT_SECRET=s-key\n")
    secrets_file.chmod(0o600)
    with_file = tmp_path / "with.toml"
    with_file.write_text(INVENTORY.format(env_file=f'env_file = "{secrets_file}"'))
    without = tmp_path / "without.toml"
    without.write_text(INVENTORY.format(env_file=""))

    with pytest.raises(ConfigError) as caught:
        load(with_file, environ={})
    assert (
        "databases.crm.password_env: environment variable T_DB_PASSWORD is not set (fix: export "
        f"T_DB_PASSWORD=...), and env_file {secrets_file} does not set it either (or fix: add "
        "the line T_DB_PASSWORD=... to that file)"
    ) in caught.value.message

    with pytest.raises(ConfigError) as caught:
        load(without, environ={"T_ACCESS": "a", "T_SECRET": "s"})
    assert "T_DB_PASSWORD is not set (fix: export T_DB_PASSWORD=...), and the inventory has " in (
        caught.value.message
    )
    assert 'name it at the top of the inventory: env_file = "/path/to/it")' in caught.value.message

    # a command that needs fewer secrets loads; the first use of the missing one says the same
    inv = load(with_file, environ={}, scope="store")
    with pytest.raises(ConfigError) as caught:
        inv.secret("T_DB_PASSWORD")
    assert caught.value.message.startswith(
        "databases.crm.password_env: environment variable T_DB_PASSWORD is not set (fix: "
        f"export T_DB_PASSWORD=...), and env_file {secrets_file} does not set it either"
    )


# ------------------------------------------------------------------ list


def test_list_on_an_empty_store_says_so_and_where_it_looked(env: Env) -> None:
    proc = opsdrill("list", "-i", str(env.path), "-d", "crm")
    assert proc.returncode == 0, proc.stderr
    store = env.data["stores"]["offsite"]
    where = f"s3://{store['bucket']}/{store['prefix']}/crm/"
    assert f"no backups of crm under {where}" in proc.stdout, proc.stdout
    env.backup()
    listed = opsdrill("list", "-i", str(env.path), "-d", "crm")
    assert "no backups" not in listed.stdout and "complete" in listed.stdout


# ------------------------------------------------------------------ restore --into


def _server(env: Env, which: str) -> tuple[str, str]:
    """(DSN of the maintenance database, password variable) of the live or sandbox server."""
    if which == "sandbox":
        sandbox = env.data["databases"]["crm"]["sandbox"]
        return sandbox["dsn"], sandbox["password_env"]
    live = env.data["databases"]["crm"]
    return live["dsn"].rsplit("/", 1)[0] + "/postgres", live["password_env"]


def _sql(env: Env, which: str, statement: str) -> list[Any]:
    dsn, var = _server(env, which)
    with psycopg.connect(dsn, password=env.stack.secrets[var], autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def test_restore_into_an_existing_name_refuses_before_asking(env: Env) -> None:
    env.backup()
    taken = f"crm_taken_{uuid.uuid4().hex[:8]}"
    _sql(env, "sandbox", f'CREATE DATABASE "{taken}"')
    try:
        proc = restore_into_sandbox(env, "--new-name", taken, tty_input="crm")
    finally:
        _sql(env, "sandbox", f'DROP DATABASE IF EXISTS "{taken}"')
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"database '{taken}' already exists" in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert "Type the database name" not in proc.stdout  # refused first, never asked


def test_a_rehearsal_on_a_server_without_the_live_name_suggests_only_what_applies(
    env: Env,
) -> None:
    env.backup()
    assert _sql(env, "sandbox", "SELECT 1 FROM pg_database WHERE datname = 'crm'") == []
    name = f"crm_rehearsal_{uuid.uuid4().hex[:8]}"
    try:
        proc = restore_into_sandbox(env, "--confirm", "crm", "--new-name", name)
    finally:
        _sql(env, "sandbox", f'DROP DATABASE IF EXISTS "{name}"')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RENAME TO crm_old" not in proc.stdout, proc.stdout
    assert "There is no database 'crm' on " in proc.stdout
    assert f"ALTER DATABASE {name} RENAME TO crm;" in proc.stdout


def test_a_restore_next_to_the_live_database_suggests_the_swap(env: Env) -> None:
    env.backup()
    dsn, var = _server(env, "live")
    name = f"crm_restored_{uuid.uuid4().hex[:8]}"
    args = ["restore", "-i", str(env.path), "-d", "crm", "--into", dsn]
    args += ["--into-password-env", var, "--no-owner", "--confirm", "crm", "--new-name", name]
    try:
        proc = opsdrill(*args, env={**os.environ, **env.stack.secrets})
    finally:
        _sql(env, "live", f'DROP DATABASE IF EXISTS "{name}"')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALTER DATABASE crm RENAME TO crm_old;" in proc.stdout
    assert f"ALTER DATABASE {name} RENAME TO crm;" in proc.stdout
    assert "There is no database" not in proc.stdout


def _on_terminal_stderr(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (so progress is drawn): exit code,
    stdout, and everything the terminal received."""
    import pty

    master, slave = pty.openpty()
    received = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the child closed the terminal
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsdrill", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        out, _ = proc.communicate(timeout=300)
        reader.join(timeout=10)
    finally:
        os.close(master)
    return proc.returncode, out.decode(), received.decode(errors="replace")


def test_a_failed_restore_prints_its_errors_below_the_progress_line(env: Env) -> None:
    manifest = env.backup()
    s3, store = env.s3()
    key = manifest.object["key"]
    size = int(manifest.object["size"])
    junk = os.urandom(size)  # the object is there, its bytes are not a backup: gpg fails
    s3.put_object(store.bucket, key, io.BytesIO(junk), size)
    dsn, var = _server(env, "sandbox")
    name = f"crm_broken_{uuid.uuid4().hex[:8]}"
    args = ["restore", "-i", str(env.path), "-d", "crm", "--into", dsn, "--into-password-env"]
    args += [var, "--no-owner", "--confirm", "crm", "--new-name", name]
    code, _, terminal = _on_terminal_stderr(args, {**os.environ, **env.stack.secrets})
    assert code == 1, terminal
    assert f"restore {manifest.id}: " in terminal and "MiB/s" in terminal  # progress drawn
    for message in ("Restore failed", "opsdrill: error:"):
        at = terminal.index(message)
        assert terminal[at - 1] == "\n", repr(terminal[max(0, at - 80) : at + 40])


def test_progress_ends_its_line_before_anything_else_is_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opsdrill import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", terminal)
    with pytest.raises(RuntimeError), progress.Progress("restore x") as bar:
        bar.add(3 * 1048576)
        print("opsdrill: warning: from anywhere", file=sys.stderr)
        bar.add(1048576)
        bar.set_stage("pg_restore")
        raise RuntimeError("stops mid-line")
    print("opsdrill: error: after the block")
    lines = terminal.getvalue().split("\n")
    assert lines[0].startswith("\rrestore x: 3.0 MiB") and lines[1].startswith("opsdrill: warning")
    assert lines[2].startswith("\rpg_restore: 4.0 MiB")  # a new stage always draws
    assert lines[3:] == ["opsdrill: error: after the block", ""]
    assert sys.stderr is terminal and sys.stdout is terminal  # the stand-ins are gone


# ------------------------------------------------------------------ broken checks' words

HTTP_LIBRARY = re.compile(
    r"MaxRetryError|NewConnectionError|HTTPConnection|ProtocolError|ConnectTimeoutError"
    r"|urllib3|S3Error|ServerError"
)


def test_drill_checks_with_the_store_down_name_the_store_not_the_http_library(env: Env) -> None:
    from opsdrill_stack.procs import free_port

    env.backup()
    port = free_port()
    env.rewrite(
        lambda d: d["stores"]["offsite"].update(endpoint=f"127.0.0.1:{port}", timeout_seconds=2)
    )
    run = env.run_checks("check_pg_drill.py")
    broken = [r for r in run.results if r["status"] == "broken"]
    assert broken, [(r["name"], r["status"]) for r in run.results]
    for result in run.results:
        message = result.get("statusDetails", {}).get("message", "")
        assert not HTTP_LIBRARY.search(message), (result["name"], message)
    for result in broken:
        message = result["statusDetails"]["message"]
        assert f"store offsite (http://127.0.0.1:{port}/" in message, message
        assert "fix: check stores.offsite.endpoint" in message, message


def test_operations_with_the_store_down_name_the_store_not_the_http_library(env: Env) -> None:
    from opsdrill_stack.procs import free_port

    env.backup()
    port = free_port()
    for store in ("offsite", "offsite-files", "live-files"):
        env.rewrite(
            lambda d, s=store: d["stores"][s].update(
                endpoint=f"127.0.0.1:{port}", timeout_seconds=2
            )
        )
    inv = str(env.path)
    for args in (
        ["restore", "-i", inv, "-d", "crm", "--drill"],
        ["list", "-i", inv],
        ["prune", "-i", inv, "--dry-run"],
        ["mirror", "-i", inv],
        ["secrets", "list", "-i", inv, "-b", "app"],
    ):
        proc = opsdrill(*args)
        assert proc.returncode == 2, (args, proc.stdout + proc.stderr)
        assert f"(http://127.0.0.1:{port}/" in proc.stderr, (args, proc.stderr)
        assert not HTTP_LIBRARY.search(proc.stdout + proc.stderr), (args, proc.stderr)


def test_an_untrusted_s3_certificate_names_the_stores_ca_file(env: Env, tmp_path: Path) -> None:
    from opsdrill_stack.mail import make_tls
    from tests.helpers.mail_fakes import fake_tls

    tls = make_tls(tmp_path / "tls")
    with fake_tls(str(tls.cert), str(tls.key)) as port:
        env.rewrite(
            lambda d: d["stores"]["offsite"].update(
                endpoint=f"127.0.0.1:{port}", secure=True, timeout_seconds=5
            )
        )
        proc = opsdrill("list", "-i", str(env.path), "-d", "crm")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "TLS failed" in proc.stderr and "set stores.offsite.ca_file" in proc.stderr, proc.stderr
    assert not HTTP_LIBRARY.search(proc.stderr), proc.stderr


# ------------------------------------------------------------------ the check run


def test_a_check_run_that_cannot_start_leaves_one_broken_result(tmp_path: Path) -> None:
    """scripts/verify (what `make verify` runs) with a malformed inventory: exit 2, and the
    results directory holds one result saying why, not nothing or the last run's."""
    bad = tmp_path / "inventory.toml"
    bad.write_text('name = "x"\nbogus = 1\n')
    results = tmp_path / "allure-results"
    results.mkdir()
    (results / "previous-run-result.json").write_text("{}")  # the last run's, now stale
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OPSDRILL_"))}
    env |= {"INVENTORY": str(bad), "ALLURE_RESULTS": str(results), "PYTEST_WORKERS": "2"}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "verify")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the run could not start" in proc.stderr
    assert not (results / "previous-run-result.json").exists()
    (found,) = results.glob("*-result.json")
    result = json.loads(found.read_text())
    assert result["name"] == "opsdrill check run could not start"
    assert result["status"] == "broken"
    assert result["statusDetails"]["message"] == (
        f"opsdrill inventory: {bad}: bogus: unknown key (fix: remove it or check its spelling)"
    )
    labels = {label["name"]: label["value"] for label in result["labels"]}
    assert labels["epic"] == "opsdrill" and labels["feature"] == "check run"
    assert result["historyId"] and result["start"] <= result["stop"]
    assert (results / "environment.properties").exists()


DEMO_CHECK = """
from opsdrill_pytest.checks import RUNBOOK_BACKUP, Check

FRESH = Check("pg.backup.freshness", "critical", f"{RUNBOOK_BACKUP}#freshness", "backups", "x")


@FRESH
def check_fresh():
    pass
"""


@pytest.mark.parametrize(
    ("option", "url"),
    [
        (
            ["--runbook-base-url", "https://git.example.com/ops/opsdrill/-/blob/main/"],
            "https://git.example.com/ops/opsdrill/-/blob/main/docs/runbooks/"
            "backup-and-restore.md#freshness",
        ),
        ([], "docs/runbooks/backup-and-restore.md#freshness"),
    ],
)
def test_runbook_links_are_absolute_with_a_base_url(
    tmp_path: Path, option: list[str], url: str
) -> None:
    (tmp_path / "check_demo.py").write_text(DEMO_CHECK)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\npython_files = check_*.py\npython_functions = check_*\n"
    )
    results = tmp_path / "results"
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "check_demo.py")]
    argv += ["-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path)]
    argv += ["--local-stack", "never", "-p", "no:cacheprovider"]
    argv += ["--alluredir", str(results), *option]
    run = run_pytest(argv, results, cwd=tmp_path)
    assert run.returncode == 0, run.output
    (result,) = run.results
    assert result["links"] == [
        {
            "type": "link",
            "url": url,
            "name": "runbook: docs/runbooks/backup-and-restore.md#freshness",
        }
    ]


def test_a_runbook_base_url_that_is_no_url_is_a_usage_error(tmp_path: Path) -> None:
    results = tmp_path / "results"
    argv = [sys.executable, "-m", "pytest", str(ROOT / "opsdrill_checks"), "--collect-only", "-q"]
    argv += ["--runbook-base-url", "git.example.com/ops", "--local-stack", "never"]
    argv += ["-p", "no:cacheprovider", "--alluredir", str(results)]
    run = run_pytest(argv, results)
    assert run.returncode == 4, run.output
    assert "--runbook-base-url 'git.example.com/ops': expected an http(s):// URL" in run.output


def test_unit_next_step_after_a_verified_restore() -> None:
    from opsdrill.cli.pg import _next_step

    where = "postgresql://opsdrill@db:5432"
    assert (
        _next_step(where, "crm", "crm", live_here=False) == f"Point the application at {where}/crm."
    )
    swap = _next_step(where, "crm_restored", "crm", live_here=True)
    assert "ALTER DATABASE crm RENAME TO crm_old;" in swap
    rehearsal = _next_step(where, "crm_restored", "crm", live_here=False)
    assert "crm_old" not in rehearsal and "ALTER DATABASE crm_restored RENAME TO crm;" in rehearsal
