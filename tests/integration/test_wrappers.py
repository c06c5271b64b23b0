"""The cron wrappers in scripts/backup: run the real command, lock, log one line."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Env

SCRIPTS = ROOT / "scripts" / "backup"


def wrapper(name: str, env: Env, lock_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    child_env = {
        **os.environ,
        "OPSDRILL_INVENTORY": str(env.path),
        "OPSDRILL_BIN": str(Path(sys.executable).parent / "opsdrill"),
        "OPSDRILL_LOCK_DIR": str(lock_dir),
    }
    return subprocess.run(
        [str(SCRIPTS / name), *args], capture_output=True, text=True, env=child_env, timeout=300
    )


def test_wrappers_run_the_operation_and_log_one_line(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSDRILL_METRICS_DIR", str(tmp_path / "textfile"))
    for name, expect in (
        ("pg-backup.sh", "opsdrill-backup: ok"),
        ("secrets-backup.sh", "opsdrill-secrets-backup: ok"),
        ("prune.sh", "opsdrill-prune: ok"),
    ):
        proc = wrapper(name, env, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert expect in proc.stderr
    assert len([r for r in env.refs() if r.complete]) == 1
    proms = sorted(p.name for p in (tmp_path / "textfile").glob("*.prom"))
    assert proms == ["opsdrill-backup.prom", "opsdrill-prune.prom", "opsdrill-secrets-backup.prom"]
    assert (
        'opsdrill_operation_success{operation="backup",target="all"} 1.0'
        in (tmp_path / "textfile" / "opsdrill-backup.prom").read_text()
    )


def test_wrapper_skips_while_a_previous_run_holds_the_lock(env: Env, tmp_path: Path) -> None:
    with open(tmp_path / "opsdrill-backup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = wrapper("pg-backup.sh", env, tmp_path)
    assert proc.returncode == 75
    assert "SKIPPED: a previous run still holds" in proc.stderr
    assert env.refs() == []


def test_wrapper_passes_failure_exit_code_through(env: Env, tmp_path: Path) -> None:
    env.rewrite(lambda d: d["databases"]["crm"].update(password_env="OPSDRILL_UNSET_VAR"))
    proc = wrapper("pg-backup.sh", env, tmp_path)
    assert proc.returncode == 2
    assert "FAILED (exit 2)" in proc.stderr
