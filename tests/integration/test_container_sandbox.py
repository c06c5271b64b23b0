"""Issue 14: a drill into a throwaway PostgreSQL container of the backup's major, started
through testcontainers and removed afterwards on every path: success, a failed drill, an
interrupt (SIGTERM), and a run killed outright (the next one removes what it left).

The images are built here (tests/helpers/containers.py: no registry is reachable); the engine is
the system's or one the harness starts. Without one, these tests skip saying why.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from opsdrill.backups.drill import drill
from opsdrill.config.inventory import load
from opsdrill.errors import ConfigError
from tests.conftest import ROOT, Env, opsdrill
from tests.helpers.containers import (
    Engine,
    container_sandbox,
    docker_engine,
    our_containers,
    pg_images,
)

__all__ = ["docker_engine", "pg_images"]  # fixtures, used by name


def _use_container(env: Env, pattern: str) -> Env:
    return env.rewrite(lambda d: d["databases"]["crm"].update(sandbox=container_sandbox(pattern)))


def _drill_proc(env: Env, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "opsdrill", "restore", "-i", str(env.path), "-d", "crm", "--drill"],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(extra_env or {})},
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ------------------------------------------------------------------ without an engine


def test_sandbox_kinds_are_validated(env: Env) -> None:
    """Exactly one of dsn and container; only {major} in the pattern; no password_env."""
    sandbox = env.data["databases"]["crm"]["sandbox"]
    cases = {
        "set exactly one of dsn": {**sandbox, "container": "postgres:{major}"},
        "only {major} may be substituted": {"container": "postgres:{version}"},
        "password_env is for a dsn sandbox": {
            "container": "postgres:{major}",
            "password_env": sandbox["password_env"],
        },
    }
    for fragment, table in cases.items():
        env.rewrite(lambda d, t=table: d["databases"]["crm"].update(sandbox=t))
        with pytest.raises(ConfigError) as info:
            load(env.path)
        assert "databases.crm.sandbox" in info.value.message and fragment in info.value.message
    env.rewrite(
        lambda d: d["databases"]["crm"].update(sandbox={"container": "reg.example/pg:{major}"})
    )
    sb = load(env.path).database("crm").sandbox
    assert sb is not None and sb.container == "reg.example/pg:{major}" and sb.dsn is None


def test_no_docker_engine_is_2_naming_the_key(env: Env, tmp_path: Path) -> None:
    """A container sandbox without an engine: exit 2 before anything is written, naming
    the inventory key and DOCKER_HOST."""
    env.backup()
    _use_container(env, "postgres:{major}")
    proc = opsdrill(
        "restore",
        "-i",
        str(env.path),
        "-d",
        "crm",
        "--drill",
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "databases.crm.sandbox.container: no Docker engine answered" in proc.stderr
    assert "DOCKER_HOST" in proc.stderr


# ------------------------------------------------------------------ with an engine


def test_drill_into_container_passes_and_removes_it(
    env: Env, docker_engine: Engine, pg_images: str
) -> None:
    env.backup()
    _use_container(env, pg_images)
    proc = _drill_proc(env)
    code, out, err = _finish(proc)
    assert code == 0, out + err
    assert "manifest match: exact" in out
    assert f"sandbox container {pg_images.replace('{major}', '15')} (image id sha256:" in out
    assert our_containers(docker_engine, proc.pid) == []
    # The evidence names the image and its digest; the guard ran on the container.
    report = drill(env.inv, "crm")
    evidence: Any = report.evidence()
    box = evidence["sandbox_container"]
    assert box["image"] == pg_images.replace("{major}", "15")
    assert box["image_id"].startswith("sha256:") and box["container_id"]
    assert report.guard["sandbox"]["system_identifier"]
    assert (
        report.guard["sandbox"]["system_identifier"] != report.manifest.server["system_identifier"]
    )
    assert report.ok and report.comparison.exact
    assert our_containers(docker_engine, os.getpid()) == []


def test_failed_drill_removes_container(env: Env, docker_engine: Engine, pg_images: str) -> None:
    """A corrupt backup: the drill fails (exit 1) and its container is gone."""
    manifest = env.backup()
    s3, store = env.s3()
    key = manifest.object["key"]
    body = s3.get_object(store.bucket, key).read()
    bad = bytes(b ^ 0xFF for b in body[:4096]) + body[4096:]
    s3.put_object(store.bucket, key, io.BytesIO(bad), len(bad))
    _use_container(env, pg_images)
    proc = _drill_proc(env)
    code, out, err = _finish(proc)
    assert code == 1, out + err
    assert our_containers(docker_engine, proc.pid) == []


def test_interrupted_drill_removes_container(
    env: Env, docker_engine: Engine, pg_images: str, tmp_path: Path
) -> None:
    """SIGTERM while the restore runs (a decompressor held back, so the drill is surely
    mid-restore): exit 143, the scratch database and the container are gone."""
    env.backup()
    _use_container(env, pg_images)
    slow = tmp_path / "bin"
    slow.mkdir()
    real = subprocess.run(["sh", "-c", "command -v zstd"], capture_output=True, text=True)
    (slow / "zstd").write_text(f'#!/bin/sh\nsleep 120\nexec {real.stdout.strip()} "$@"\n')
    (slow / "zstd").chmod(0o755)
    proc = _drill_proc(env, {"PATH": f"{slow}:{os.environ['PATH']}"})
    deadline = time.monotonic() + 180
    scratch = ""
    while not scratch and time.monotonic() < deadline and proc.poll() is None:
        for name in our_containers(docker_engine, proc.pid):
            query = "SELECT datname FROM pg_database WHERE datname LIKE 'opsdrill_drill_%'"
            listed = subprocess.run(
                ["docker", "exec", name, "psql", "-U", "opsdrill", "-d", "postgres", "-Atc", query],
                capture_output=True,
                text=True,
                env=docker_engine.env(),
            )
            scratch = listed.stdout.strip()
        time.sleep(0.3)
    assert scratch, "the drill never created its scratch database in the container"
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc, timeout=120)
    assert code == 128 + signal.SIGTERM, out + err
    assert our_containers(docker_engine, proc.pid) == []


def test_container_of_a_killed_run_is_removed_by_the_next(
    env: Env, docker_engine: Engine, pg_images: str
) -> None:
    """A run killed outright (SIGKILL) cannot remove its container: the next drill does,
    once the owner recorded on it is provably gone, and says so."""
    from opsdrill.containers import KIND_LABEL, OWNER_LABEL
    from opsdrill.workspace import Owner

    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = Owner.of_this_process("drill-sandbox")
    owner.pid, owner.pid_started = gone.pid, None
    client = docker_engine.client()
    try:
        left = client.containers.create(
            pg_images.replace("{major}", "15"),
            command=["sleep", "600"],
            name=f"opsdrill-sandbox-{gone.pid}-leftover",
            labels={OWNER_LABEL: owner.to_json(), KIND_LABEL: "drill-sandbox"},
            network_mode="host",
        )
        left.start()
    finally:
        client.close()
    env.backup()
    _use_container(env, pg_images)
    code, out, err = _finish(_drill_proc(env))
    assert code == 0, out + err
    assert f"opsdrill-sandbox-{gone.pid}-leftover" not in our_containers(docker_engine)
    # Said by the drill that removed it: this one, unless another xdist worker's drill
    # (sharing the engine) swept first.
    said = f"removed container opsdrill-sandbox-{gone.pid}-leftover (drill-sandbox)"
    assert said in err or os.environ.get("PYTEST_XDIST_WORKER"), err


def test_build_log_records_image_build_times(docker_engine: Engine, pg_images: str) -> None:
    """The images exist, and when this harness built them it says how long it took."""
    from tests.helpers.containers import BUILD_LOG

    client = docker_engine.client()
    try:
        for major in ("15", "16"):
            image = client.images.get(pg_images.replace("{major}", major))
            assert image.id.startswith("sha256:")
    finally:
        client.close()
    if BUILD_LOG.exists():
        seconds = json.loads(BUILD_LOG.read_text())["seconds"]
        assert seconds["total"] > 0


def test_drill_checks_judge_a_container_sandbox(
    env: Env, docker_engine: Engine, pg_images: str
) -> None:
    """The checks run the same drill: the guard check judges the guard of that drill (a
    container has no address before the drill starts it), and nothing is left running."""
    env.backup()
    _use_container(env, pg_images)
    run = env.run_checks("check_pg_drill.py")
    for check_id in ("pg.drill.sandbox_guard", "pg.drill.restore", "pg.drill.rto"):
        run.assert_passes(check_id)
    res = run.by_check("pg.drill.sandbox_guard")
    assert any(a["name"] == "identities compared" for a in res["attachments"])
    (source,) = [a["source"] for a in res["attachments"] if a["name"] == "drill"]
    box = json.loads((run.results_dir / source).read_text())["sandbox_container"]
    client = docker_engine.client()
    try:
        ids = {c.id for c in client.containers.list(all=True)}
    finally:
        client.close()
    assert box["container_id"] and box["container_id"] not in ids  # removed after the run
