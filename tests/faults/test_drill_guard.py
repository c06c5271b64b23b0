"""The drill's sandbox guard fails closed (issue 11, "Never touch production by mistake").

A sandbox DSN that reaches the live cluster through another address is refused even when
the live DSN cannot be reached, because every manifest records the live cluster's system
identifier; a sandbox or a backup whose identity cannot be established is refused too.
Everything runs against the local stack: the real CLI in a subprocess and the real checks.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opsdrill_stack.procs import free_port
from tests.conftest import CheckRun, Env, Stack, derive, opsdrill
from tests.helpers.registry import proves

GUARD = "pg.drill.sandbox_guard"
GRANT = "GRANT EXECUTE ON FUNCTION pg_control_system()"


def _port(stack: Stack, component: str) -> int:
    return int(stack.stack.state["components"][component]["port"])


def _conn(stack: Stack, component: str, dbname: str) -> psycopg.Connection[Any]:
    secret = (
        "OPSDRILL_LIVE_PG_PASSWORD" if component == "pg_live" else "OPSDRILL_SANDBOX_PG_PASSWORD"
    )
    return psycopg.connect(
        host="127.0.0.1",
        port=_port(stack, component),
        user="opsdrill",
        dbname=dbname,
        password=stack.secrets[secret],
        autocommit=True,
        connect_timeout=10,
    )


def _live_identifier(stack: Stack) -> str:
    with stack.live_conn("postgres") as conn:
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    assert row is not None
    return str(row[0])


def _drill(env: Env) -> Any:
    return opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill")


def _live_down(env: Env, tmp_path: Path, how: str) -> None:
    """Make the live DSN unreachable the way a production host meets it."""
    if how == "dead port":
        env.rewrite(
            lambda d: d["databases"]["crm"].update(
                dsn=f"postgresql://opsdrill@127.0.0.1:{free_port()}/crm"
            )
        )
    else:  # a rotated password: the stale env file still holds the old one
        env.with_secret(tmp_path, env.data["databases"]["crm"]["password_env"], "rotated-away")


def _sandbox_on_live(env: Env, tmp_path: Path) -> None:
    """Point the sandbox at the live cluster through another address (localhost, another
    dbname) with a password variable of its own that still works."""
    env.with_secret(
        tmp_path, "GUARD_SANDBOX_PASSWORD", env.stack.secrets["OPSDRILL_LIVE_PG_PASSWORD"]
    )
    port = _port(env.stack, "pg_live")
    env.rewrite(
        lambda d: d["databases"]["crm"]["sandbox"].update(
            dsn=f"postgresql://opsdrill@localhost:{port}/postgres",
            password_env="GUARD_SANDBOX_PASSWORD",
        )
    )


@contextlib.contextmanager
def drill_databases_seen(stack: Stack, component: str = "pg_live") -> Iterator[set[str]]:
    """Every drill scratch database that exists on the cluster while inside, or after.

    A drill drops its scratch database at the end, so only watching it while the drill
    runs shows one was created at all; polling can miss one (then the test is weaker,
    never flaky), and the exit code is asserted beside it.
    """
    seen: set[str] = set()
    stop = threading.Event()
    query = "SELECT datname FROM pg_database WHERE datname LIKE 'opsdrill\\_drill\\_%'"

    def watch() -> None:
        with _conn(stack, component, "postgres") as conn:
            while not stop.is_set():
                seen.update(row[0] for row in conn.execute(query).fetchall())
                stop.wait(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=30)
        with _conn(stack, component, "postgres") as conn:
            seen.update(row[0] for row in conn.execute(query).fetchall())


def _evidence(run: CheckRun) -> dict[str, Any]:
    """The guard check's "identities compared" attachment."""
    res = run.by_check(GUARD)
    for att in res.get("attachments", []):
        if att["name"] == "identities compared":
            data: dict[str, Any] = json.loads((run.results_dir / att["source"]).read_text())
            return data
    raise AssertionError(f"no identities attachment: {res.get('attachments')}")


def _manifest_key(env: Env, backup_id: str | None) -> tuple[str, str]:
    refs = [r for r in env.refs() if backup_id in (None, r.id) and r.manifest_key]
    ref = refs[-1]
    assert ref.manifest_key is not None
    return ref.id, ref.manifest_key


def _read_manifest(env: Env, backup_id: str | None = None) -> dict[str, Any]:
    _, key = _manifest_key(env, backup_id)
    s3, store = env.s3()
    response = s3.get_object(store.bucket, key)
    try:
        data: dict[str, Any] = json.loads(response.read())
    finally:
        response.close()
        response.release_conn()
    return data


def _rewrite_manifest(env: Env, mutate: Any, backup_id: str | None = None) -> str:
    """Edit a stored manifest (the newest by default) in place: an older format, say."""
    found, key = _manifest_key(env, backup_id)
    data = _read_manifest(env, found)
    mutate(data)
    body = json.dumps(data).encode()
    s3, store = env.s3()
    s3.put_object(store.bucket, key, io.BytesIO(body), len(body))
    return found


@proves(failed=[GUARD])
@pytest.mark.parametrize("live_down", ["dead port", "rotated password"])
def test_sandbox_on_live_is_refused_while_live_is_unreachable(
    env: Env, tmp_path: Path, live_down: str
) -> None:
    manifest = env.backup()
    assert manifest.server["system_identifier"] == _live_identifier(env.stack)
    _sandbox_on_live(env, tmp_path)
    _live_down(env, tmp_path, live_down)

    with drill_databases_seen(env.stack) as created:
        proc = _drill(env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing the drill sandbox localhost:" in proc.stderr
    assert "is the live server" in proc.stderr and "databases.crm.sandbox.dsn" in proc.stderr
    assert f"system identifier {manifest.server['system_identifier']}" in proc.stderr
    assert f"backup {manifest.id}'s manifest" in proc.stderr
    assert not created, f"the drill wrote to production: {created}"

    run = env.run_checks("check_pg_drill.py")
    run.assert_fails(GUARD, "is the live server", "never write to production")
    run.assert_fails("pg.drill.restore", "drill refused")
    evidence = _evidence(run)
    assert evidence["live"]["answered"] is False
    assert evidence["sandbox"]["system_identifier"] == manifest.server["system_identifier"]
    assert {
        "backup": manifest.id,
        "restoring": True,
        "system_identifier": manifest.server["system_identifier"],
        "address": manifest.server["address"],
    } in evidence["manifests"]


def test_drilling_an_older_backup_compares_the_newest_manifests_too(
    env: Env, tmp_path: Path
) -> None:
    """``--backup`` an older backup whose manifest has no identifier, sandbox on live, live
    down: the newer manifests still name production, and the drill is refused as such."""
    from datetime import UTC, datetime, timedelta

    old = env.backup(now=datetime.now(UTC) - timedelta(hours=2))
    newest = env.backup()
    _rewrite_manifest(env, lambda d: d["server"].pop("system_identifier"), old.id)
    _sandbox_on_live(env, tmp_path)
    _live_down(env, tmp_path, "dead port")
    with drill_databases_seen(env.stack) as created:
        proc = opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill", "--backup", old.id)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is the live server" in proc.stderr
    assert f"backup {newest.id}'s manifest" in proc.stderr
    assert not created, f"the drill wrote to production: {created}"


def test_healthy_sandbox_drills_while_live_is_unreachable_and_says_so(
    env: Env, tmp_path: Path
) -> None:
    manifest = env.backup()
    _live_down(env, tmp_path, "dead port")
    proc = _drill(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "manifest match: exact" in proc.stdout
    assert "unreachable: live identity not compared" in proc.stdout
    assert f"compared with the manifest of {manifest.id}" in proc.stdout

    run = env.run_checks("check_pg_drill.py")
    run.assert_passes(GUARD)
    evidence = _evidence(run)
    assert evidence["live"]["answered"] is False and "cannot connect" in evidence["live"]["error"]
    assert evidence["manifests"][0]["backup"] == manifest.id
    assert evidence["sandbox"]["system_identifier"] != manifest.server["system_identifier"]
    # drift needs the live server: it stays broken
    run.assert_broken("pg.drill.drift", "databases.crm.dsn")


@proves(broken=[GUARD])
def test_older_manifest_without_identifier_refuses_unless_live_answers(
    env: Env, tmp_path: Path
) -> None:
    env.backup()
    backup_id = _rewrite_manifest(
        env, lambda d: [d["server"].pop(k, None) for k in ("system_identifier", "address")]
    )
    live_dsn = env.data["databases"]["crm"]["dsn"]
    _live_down(env, tmp_path, "dead port")
    proc = _drill(env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing the drill sandbox" in proc.stderr
    assert "databases.crm.sandbox.dsn" in proc.stderr
    assert f"the manifest of {backup_id} records no system identifier (an older format)" in (
        proc.stderr
    )
    assert "the live server did not answer" in proc.stderr and "databases.crm.dsn" in proc.stderr

    run = env.run_checks("check_pg_drill.py")
    run.assert_broken(GUARD, "records no system identifier")
    run.assert_broken("pg.drill.restore")

    # with the live server answering, its identifier is compared: the drill runs
    env.rewrite(lambda d: d["databases"]["crm"].update(dsn=live_dsn))
    again = _drill(env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "live identity not compared" not in again.stdout


@contextlib.contextmanager
def sandbox_without_identity(stack: Stack) -> Iterator[tuple[str, str, str]]:
    """A DSN for a non-superuser sandbox role in a database of the sandbox cluster where
    pg_control_system() is revoked from PUBLIC (a hardened server)."""
    tag = uuid.uuid4().hex[:8]
    role, dbname, password = f"guard_{tag}", f"guard_{tag}", uuid.uuid4().hex
    with _conn(stack, "pg_sandbox", "postgres") as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {dbname} OWNER {role}")
    with _conn(stack, "pg_sandbox", dbname) as conn:
        conn.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    try:
        yield f"postgresql://{role}@127.0.0.1:{_port(stack, 'pg_sandbox')}/{dbname}", role, password
    finally:
        with _conn(stack, "pg_sandbox", "postgres") as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
            conn.execute(f"DROP ROLE IF EXISTS {role}")


@proves(broken=[GUARD])
def test_sandbox_whose_identity_cannot_be_read_is_refused(env: Env, tmp_path: Path) -> None:
    env.backup()
    with (
        sandbox_without_identity(env.stack) as (dsn, role, password),
        drill_databases_seen(env.stack, "pg_sandbox") as created,
    ):
        env.with_secret(tmp_path, "GUARD_SANDBOX_PASSWORD", password)
        env.rewrite(
            lambda d: d["databases"]["crm"]["sandbox"].update(
                dsn=dsn, password_env="GUARD_SANDBOX_PASSWORD"
            )
        )
        proc = _drill(env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "refusing the drill sandbox" in proc.stderr
        assert "databases.crm.sandbox.dsn" in proc.stderr
        assert "its system identifier is unreadable" in proc.stderr
        assert f"{GRANT} TO {role}" in proc.stderr
        assert password not in proc.stderr
        run = env.run_checks("check_pg_drill.py")
        run.assert_broken(GUARD, "system identifier is unreadable", GRANT)
        run.assert_broken("pg.drill.restore", "system identifier is unreadable")
    assert not created, f"the drill wrote to the unproven sandbox: {created}"


@contextlib.contextmanager
def backup_role(stack: Stack, dbname: str) -> Iterator[tuple[str, str]]:
    """A plain backup role, as the runbook advises: pg_read_all_data, BYPASSRLS, and a
    grant on each large object of ``dbname`` (pg_read_all_data does not cover them)."""
    role, password = f"backup_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with stack.live_conn("postgres") as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN BYPASSRLS PASSWORD '{password}'")
        conn.execute(f"GRANT pg_read_all_data TO {role}")
    with stack.live_conn(dbname) as conn:
        for (oid,) in conn.execute("SELECT oid FROM pg_largeobject_metadata").fetchall():
            conn.execute(f"GRANT SELECT ON LARGE OBJECT {oid} TO {role}")
    try:
        yield role, password
    finally:
        with stack.live_conn(dbname) as conn:
            conn.execute(f"DROP OWNED BY {role}")
        with stack.live_conn("postgres") as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def _as_backup_role(env: Env, tmp_path: Path, role: str, password: str) -> None:
    env.with_secret(tmp_path, "GUARD_BACKUP_PASSWORD", password)
    dsn = env.data["databases"]["crm"]["dsn"].replace("//opsdrill@", f"//{role}@")
    env.rewrite(
        lambda d: d["databases"]["crm"].update(dsn=dsn, password_env="GUARD_BACKUP_PASSWORD")
    )


def test_plain_backup_role_records_the_identifier(stack: Stack, tmp_path: Path) -> None:
    """PostgreSQL lets PUBLIC execute pg_control_system(): a non-superuser backup role
    records the identifier and the address it reached."""
    env = derive(stack, tmp_path, own_database=True)
    dbname = env.data["databases"]["crm"]["dsn"].rsplit("/", 1)[1]
    with backup_role(stack, dbname) as (role, password):
        _as_backup_role(env, tmp_path, role, password)
        proc = opsdrill("backup", "-i", str(env.path), "-d", "crm")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    server = _read_manifest(env)["server"]
    assert server["system_identifier"] == _live_identifier(stack)
    assert server["address"] == f"127.0.0.1:{_port(stack, 'pg_live')}"
    assert "system_identifier_error" not in server


def test_backup_role_without_pg_control_system_says_so_and_drill_fails_closed(
    stack: Stack, tmp_path: Path
) -> None:
    """A hardened server revoked pg_control_system(): the backup still runs and its
    manifest says why no identifier was recorded; a drill with live down then refuses."""
    env = derive(stack, tmp_path, own_database=True)
    dbname = env.data["databases"]["crm"]["dsn"].rsplit("/", 1)[1]
    with stack.live_conn(dbname) as conn:
        conn.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    with backup_role(stack, dbname) as (role, password):
        _as_backup_role(env, tmp_path, role, password)
        proc = opsdrill("backup", "-i", str(env.path), "-d", "crm")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        server = _read_manifest(env)["server"]
        assert server["system_identifier"] is None
        assert (
            f"role {role} may not execute pg_control_system()" in server["system_identifier_error"]
        )
        assert f"in database {dbname}, {GRANT} TO {role}" in server["system_identifier_error"]

        # live answering (even without the identifier: same revoke) is not enough either
        proc = _drill(env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"may not execute pg_control_system() (fix: in database {dbname}" in proc.stderr
        assert "the live server 127.0.0.1:" in proc.stderr and "answered but" in proc.stderr

        _live_down(env, tmp_path, "dead port")
        proc = _drill(env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "records no system identifier (role" in proc.stderr
        assert "the live server did not answer" in proc.stderr
