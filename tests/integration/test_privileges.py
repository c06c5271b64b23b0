"""The backup role's privileges, proved before they bite: a role that is only a member of
pg_read_all_data cannot dump a table with row-level security nor a large object. The
pre-flight names each and the statement that fixes it, in `inventory check --for backup`,
in the backup itself (before anything is uploaded) and in pg.backup.privileges."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Env, Stack, derive, opsdrill
from tests.helpers.registry import proves


@dataclass
class RestrictedRole:
    env: Env
    name: str
    dbname: str

    def grant(self, *statements: str) -> None:
        with self.env.stack.live_conn(self.dbname) as conn:
            for statement in statements:
                conn.execute(statement)


@pytest.fixture
def restricted(stack: Stack, tmp_path: Path) -> Iterator[RestrictedRole]:
    """The test's own copy of crm, read by a fresh role that is only a member of
    pg_read_all_data (what the runbook used to advise), with row-level security enabled
    on one table. The large objects belong to the application's (here: the superuser's)
    role, as they do when the application creates them."""
    env = derive(stack, tmp_path, own_database=True)
    dbname = env.data["databases"]["crm"]["dsn"].rsplit("/", 1)[1]
    role = f"backup_{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(12)
    with stack.live_conn(dbname) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE pg_read_all_data")
        conn.execute("ALTER TABLE crm.email_settings ENABLE ROW LEVEL SECURITY")
    dsn = env.data["databases"]["crm"]["dsn"].replace("//opsdrill@", f"//{role}@")
    env.rewrite(lambda d: d["databases"]["crm"].update(dsn=dsn))
    env.with_secret(tmp_path, env.data["databases"]["crm"]["password_env"], password)
    try:
        yield RestrictedRole(env, role, dbname)
    finally:
        with stack.live_conn("postgres") as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_inventory_check_for_backup_names_each_missing_grant(restricted: RestrictedRole) -> None:
    role = restricted.name
    proc = opsdrill("inventory", "check", str(restricted.env.path), "--for", "backup")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "databases.crm (127.0.0.1:" in err and f"role {role}:" in err, err
    assert "tables with row-level security: 1 not readable (crm.email_settings)" in err, err
    assert f'fix: ALTER ROLE "{role}" BYPASSRLS' in err, err
    assert "large objects owned by opsdrill: 3 not readable (4100001, 4100002, 4100003)" in err
    assert f'fix: GRANT "opsdrill" TO "{role}"' in err, err
    # --offline touches no target
    offline = opsdrill(
        "inventory", "check", str(restricted.env.path), "--for", "backup", "--offline"
    )
    assert offline.returncode == 0, offline.stderr
    # what it said fixes it: pg_dump then reads everything
    restricted.grant(f"ALTER ROLE {role} BYPASSRLS", f"GRANT opsdrill TO {role}")
    fixed = opsdrill("inventory", "check", str(restricted.env.path), "--for", "backup")
    assert fixed.returncode == 0, fixed.stderr
    assert f"role {role} can read all pg_dump reads (17 tables" in fixed.stdout, fixed.stdout
    assert opsdrill("backup", "-i", str(restricted.env.path)).returncode == 0


@proves(failed=["pg.backup.privileges"])
def test_privileges_check_fails_naming_the_grant_and_passes_once_granted(
    restricted: RestrictedRole,
) -> None:
    run = restricted.env.run_checks("check_pg_privileges.py")
    run.assert_outcome("pg.backup.privileges", "failed", exit_code=1)
    run.assert_fails(
        "pg.backup.privileges",
        f"expected role {restricted.name} to read everything pg_dump reads",
        "tables with row-level security: 1 not readable (crm.email_settings)",
        f'GRANT "opsdrill" TO "{restricted.name}"',
        "(backups or drills fail on these until fixed)",
    )
    restricted.grant(
        f"ALTER ROLE {restricted.name} BYPASSRLS", f"GRANT opsdrill TO {restricted.name}"
    )
    run = restricted.env.run_checks("check_pg_privileges.py")
    run.assert_outcome("pg.backup.privileges", "passed", exit_code=0)


@proves(broken=["pg.backup.privileges"])
def test_privileges_check_is_broken_when_the_live_server_refuses_the_login(
    env: Env, tmp_path: Path
) -> None:
    var = env.data["databases"]["crm"]["password_env"]
    env.with_secret(tmp_path, var, "not-the-password-51c")
    run = env.run_checks("check_pg_privileges.py")
    run.assert_outcome("pg.backup.privileges", "broken", exit_code=2)
    assert f"databases.crm.password_env = {var}" in run.message("pg.backup.privileges")


def test_a_large_object_created_after_the_grant_is_still_readable(
    restricted: RestrictedRole,
) -> None:
    """The fix the pre-flight names (membership of the owner) covers tomorrow's large
    objects too, unlike a GRANT SELECT ON LARGE OBJECT per object."""
    role = restricted.name
    restricted.grant(f"ALTER ROLE {role} BYPASSRLS", f"GRANT opsdrill TO {role}")
    restricted.grant("SELECT lo_from_bytea(0, 'created by the application later')")
    proc = opsdrill("inventory", "check", str(restricted.env.path), "--for", "backup")
    assert proc.returncode == 0, proc.stderr
    assert "4 large objects" in proc.stdout, proc.stdout


def test_the_preflight_reads_the_catalog_only(restricted: RestrictedRole) -> None:
    """A role without any privilege on the data still gets a complete answer."""
    from opsdrill.backups.preflight import check_privileges

    password = restricted.env.inv.secret(restricted.env.data["databases"]["crm"]["password_env"])
    restricted.grant(f"REVOKE pg_read_all_data FROM {restricted.name}")
    port = restricted.env.stack.stack.state["components"]["pg_live"]["port"]
    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=restricted.name,
        password=password,
        dbname=restricted.dbname,
        autocommit=True,
    ) as conn:
        found = check_privileges(conn)
    kinds = {m.kind: m.count for m in found.missing}
    assert kinds["tables"] == found.examined["tables"] > 10, kinds
    assert kinds["sequences"] == found.examined["sequences"], kinds
    assert kinds["schemas"] >= 2, kinds


def test_a_role_that_cannot_read_the_system_identifier_is_told_the_grant(
    restricted: RestrictedRole,
) -> None:
    """Without it every manifest lacks the cluster's identity and drills refuse."""
    role = restricted.name  # not a member of opsdrill, which owns the function here
    restricted.grant("REVOKE EXECUTE ON FUNCTION pg_catalog.pg_control_system() FROM PUBLIC")
    try:
        proc = opsdrill("inventory", "check", str(restricted.env.path), "--for", "backup")
    finally:
        restricted.grant("GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_system() TO PUBLIC")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        f'fix: GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_system() TO "{role}"' in proc.stderr
    )


def test_a_backup_by_a_role_that_cannot_read_everything_stops_before_uploading(
    restricted: RestrictedRole,
) -> None:
    """Today pg_dump itself finds out, halfway through the dump, after the upload began."""
    env = restricted.env
    proc = opsdrill("backup", "-i", str(env.path), "-d", "crm")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "backup pre-flight: databases.crm" in proc.stderr, proc.stderr
    assert "large objects owned by opsdrill: 3 not readable" in proc.stderr, proc.stderr
    assert "nothing was dumped or uploaded" in proc.stderr
    s3, store = env.s3()
    assert not list(s3.list_objects(store.bucket, prefix=store.prefix, recursive=True))
