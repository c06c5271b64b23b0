"""Issue 14: client tools chosen by the server's PostgreSQL major.

This host's Debian tools are PostgreSQL 15; the ``pgserver`` wheel gives a real
PostgreSQL 16.2 (server and client tools). A backup of a 16 server and its drill work with
tools of 16 from ``pg_bin_dir`` or from a container of 16, and with none of them the
backup fails before any work, naming the major and how to install its tools (exit 2).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from opsdrill import pgtools
from opsdrill.errors import ConfigError
from opsdrill_stack.demo_crm import create_demo_crm
from opsdrill_stack.postgres import SUPERUSER, PgCluster, pgserver_bindir
from tests.conftest import Env, Stack, derive, opsdrill
from tests.helpers.containers import (
    Engine,
    container_sandbox,
    docker_engine,
    our_containers,
    pg_images,
)
from tests.integration.test_operations import object_keys

__all__ = ["docker_engine", "pg_images"]  # fixtures, used by name

PW16 = "OPSDRILL_LIVE16_PG_PASSWORD"
SANDBOX16 = "OPSDRILL_SANDBOX16_PG_PASSWORD"


# ------------------------------------------------------------------ the rule, on fake tools


def _fake_tool(directory: Path, tool: str, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / tool
    exe.write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) {version}'\n")
    exe.chmod(0o755)
    return directory


def test_tools_are_chosen_by_the_server_major(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_bin_dir first, then Debian's smallest major at least the server's, then PATH;
    else a ConfigError naming the major and the fixes (a unit test: fake tools)."""
    debian = tmp_path / "debian"
    for major in ("15", "17"):
        _fake_tool(debian / major / "bin", "pg_dump", f"{major}.1")
    on_path = _fake_tool(tmp_path / "path", "pg_dump", "18.0")
    own16 = _fake_tool(tmp_path / "own16", "pg_dump", "16.2")
    own14 = _fake_tool(tmp_path / "own14", "pg_dump", "14.9")
    monkeypatch.setattr(pgtools, "DEBIAN_ROOT", debian)
    monkeypatch.setenv("PATH", f"{on_path}:/usr/bin:/bin")

    def pick(major: int | None, bin_dir: Path | None = None) -> pgtools.PgTools:
        return pgtools.choose(
            major,
            "pg_dump",
            key="databases.crm",
            pg_bin_dir=str(bin_dir) if bin_dir else None,
            container="",
            why="the live server",
        )

    assert pick(15).bindir == debian / "15" / "bin"
    assert pick(16).bindir == debian / "17" / "bin"  # the smallest at least 16
    assert pick(16, own16).bindir == own16 and "pg_bin_dir" in pick(16, own16).source
    assert pick(16, own14).bindir == debian / "17" / "bin"  # too old: the next source
    assert pick(18).bindir == on_path and pick(18).major == 18
    assert pick(None).major == 18  # unknown server: the newest installed
    with pytest.raises(ConfigError) as info:
        pick(19, own14)
    message = info.value.message
    for fragment in (
        "runs PostgreSQL 19",
        "no pg_dump of PostgreSQL 19 or newer",
        "PostgreSQL 14 from databases.crm.pg_bin_dir",
        "apt-get install postgresql-client-19",
        "databases.crm.pg_bin_dir",
        "tools_container is empty",
    ):
        assert fragment in message, message
    with pytest.raises(ConfigError, match=r"databases\.crm\.pg_bin_dir: .* does not exist"):
        pick(15, tmp_path / "nowhere")


def test_pg_bin_dir_is_validated(env: Env) -> None:
    from opsdrill.config.inventory import load

    env.rewrite(
        lambda d: d["databases"]["crm"].update(pg_bin_dir="/usr/lib/postgresql/16/bin/pg_dump")
    )
    with pytest.raises(ConfigError, match=r"databases\.crm\.pg_bin_dir: .*the directory"):
        load(env.path)
    env.rewrite(lambda d: d["databases"]["crm"].update(pg_bin_dir="/opt/pg16/bin"))
    assert load(env.path).database("crm").pg_bin_dir == "/opt/pg16/bin"


# ------------------------------------------------------------------ a real PostgreSQL 16


@dataclass
class Pg16:
    live: PgCluster
    sandbox: PgCluster
    password: str
    sandbox_password: str


@pytest.fixture(scope="module")
def pg16() -> Iterator[Pg16]:
    """A live PostgreSQL 16 server with the demo CRM, and a 16 sandbox, from pgserver's
    binaries run as the postgres user (as the local stack runs Debian's)."""
    base = Path(tempfile.mkdtemp(prefix="opsdrill-test-pg16-"))
    os.chmod(base, 0o755)
    bindir = str(pgserver_bindir())
    live = PgCluster("live16", base / "live", bindir=bindir)
    sandbox = PgCluster("sandbox16", base / "sandbox", bindir=bindir)
    found = Pg16(live, sandbox, "opsdrill-live16-" + os.urandom(8).hex(), "opsdrill-sb16-x")
    found.sandbox_password = "opsdrill-sandbox16-" + os.urandom(8).hex()
    try:
        live.init(found.password)
        sandbox.init(found.sandbox_password)
        live.start()
        sandbox.start()
        kw = {"host": "127.0.0.1", "port": live.port, "user": SUPERUSER}
        with psycopg.connect(
            dbname="postgres", password=found.password, autocommit=True, **kw
        ) as c:  # type: ignore[arg-type]
            c.execute("CREATE DATABASE crm")
        with psycopg.connect(dbname="crm", password=found.password, **kw) as c:  # type: ignore[arg-type]
            create_demo_crm(c, size_mb=2)
        assert "16." in live.version()
        yield found
    finally:
        live.stop()
        sandbox.stop()
        shutil.rmtree(base, ignore_errors=True)


def _env16(stack: Stack, tmp_path: Path, pg16: Pg16, *, sandbox16: bool = True) -> Env:
    """The worker's stack (S3, GnuPG) with the 16 server as databases.crm."""
    env = derive(stack, tmp_path)
    env.with_secret(tmp_path, PW16, pg16.password)
    env.with_secret(tmp_path, SANDBOX16, pg16.sandbox_password)

    def point(d: dict[str, object]) -> None:
        crm = d["databases"]["crm"]  # type: ignore[index]
        crm["dsn"] = f"postgresql://{SUPERUSER}@127.0.0.1:{pg16.live.port}/crm"
        crm["password_env"] = PW16
        if sandbox16:
            crm["sandbox"] = {
                "dsn": f"postgresql://{SUPERUSER}@127.0.0.1:{pg16.sandbox.port}/postgres",
                "password_env": SANDBOX16,
            }

    return env.rewrite(point)


def test_host_tools_15_do_not_match_a_16_server(stack: Stack, tmp_path: Path, pg16: Pg16) -> None:
    """No pg_bin_dir, no Docker engine: exit 2 before any work, naming the major and the
    fixes (today pg_dump 15 runs and fails on "server version mismatch", exit 1)."""
    env = _env16(stack, tmp_path, pg16)
    proc = opsdrill(
        "backup",
        "-i",
        str(env.path),
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for fragment in (
        "runs PostgreSQL 16",
        "no pg_dump of PostgreSQL 16 or newer",
        "PostgreSQL 15 from Debian's /usr/lib/postgresql/15/bin",
        "apt-get install postgresql-client-16",
        "databases.crm.pg_bin_dir",
        "no Docker engine answers",
        "nothing was done",
    ):
        assert fragment in proc.stderr, proc.stderr
    assert object_keys(env) == []


def test_backup_and_drill_of_16_with_pg_bin_dir(stack: Stack, tmp_path: Path, pg16: Pg16) -> None:
    """pg_bin_dir names pgserver's 16 tools: the backup uses them and says so in the
    manifest, the drill restores with them into a 16 sandbox; a 15 sandbox is refused."""
    env = _env16(stack, tmp_path, pg16)
    env.rewrite(lambda d: d["databases"]["crm"].update(pg_bin_dir=str(pgserver_bindir())))
    backup = opsdrill("backup", "-i", str(env.path))
    assert backup.returncode == 0, backup.stdout + backup.stderr
    manifest = env.backup()
    assert manifest.server["version_num"] // 10000 == 16
    assert "(PostgreSQL) 16.2" in manifest.tools["pg_dump"]
    assert manifest.tools["pg_dump_from"].startswith("databases.crm.pg_bin_dir")
    drilled = opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill")
    assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    assert "manifest match: exact" in drilled.stdout
    # The stack's sandbox is 15: a 16 dump does not restore into it, said before any work.
    env.rewrite(
        lambda d: d["databases"]["crm"].update(sandbox=stack.data["databases"]["crm"]["sandbox"])
    )
    older = opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill")
    assert older.returncode == 2, older.stdout + older.stderr
    assert "runs PostgreSQL 15, older than the backup's server (PostgreSQL 16" in older.stderr


def test_backup_and_drill_of_16_in_containers(
    stack: Stack, tmp_path: Path, pg16: Pg16, docker_engine: Engine, pg_images: str
) -> None:
    """No tools of 16 installed, a Docker engine answers: pg_dump and pg_restore run in
    the 16 image, the drill restores into a 16 container; nothing is left running."""
    env = _env16(stack, tmp_path, pg16, sandbox16=False)
    env.rewrite(
        lambda d: d["databases"]["crm"].update(
            tools_container=pg_images, sandbox=container_sandbox(pg_images)
        )
    )
    manifest = env.backup()
    image16 = pg_images.replace("{major}", "16")
    assert "(PostgreSQL) 16.2" in manifest.tools["pg_dump"]
    assert manifest.tools["pg_dump_from"].startswith(f"container {image16} (image id sha256:")
    drilled = opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill")
    assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    assert "manifest match: exact" in drilled.stdout
    assert f"sandbox container {image16}" in drilled.stdout
    assert our_containers(docker_engine) == [] or all(
        "tools" not in n for n in our_containers(docker_engine)
    )
