"""PostgreSQL access: connections without DSN passwords, and who the server is.

Passwords travel as a separate connection keyword (psycopg) or as PGPASSWORD in a child's
environment (pg_dump, pg_restore), never inside a DSN string or argv, so no error message
or process listing can show them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from opsdrill.config.inventory import Inventory
from opsdrill.errors import ConfigError, CredentialsRejected, TargetUnreachable

CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class Endpoint:
    """A server + database to connect to; the password is held apart from the DSN."""

    label: str
    params: dict[str, Any]
    password: str | None = field(default=None, repr=False)
    # What to fix when it fails, in the operator's words: the inventory keys (or command
    # line options) that say where the server is, and where the password comes from.
    settings: str = ""
    credentials: str = ""

    @classmethod
    def from_dsn(
        cls,
        label: str,
        dsn: str,
        password: str | None,
        *,
        settings: str = "",
        credentials: str = "",
    ) -> Endpoint:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            raise ConfigError(
                f"{label}: invalid DSN (check host, port, dbname syntax"
                + (f" of {settings})" if settings else ")")
            ) from None
        params.pop("password", None)
        params.setdefault("connect_timeout", CONNECT_TIMEOUT)
        return cls(label, params, password, settings, credentials)

    def with_dbname(self, dbname: str) -> Endpoint:
        return Endpoint(
            self.label,
            {**self.params, "dbname": dbname},
            self.password,
            self.settings,
            self.credentials,
        )

    @property
    def dbname(self) -> str:
        return str(self.params.get("dbname") or self.params.get("user") or "postgres")

    @property
    def where(self) -> str:
        """Human-readable location, safe to print."""
        host = self.params.get("host", "localhost")
        port = self.params.get("port", 5432)
        return f"{host}:{port}/{self.dbname}"

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(**self.params, password=self.password, **kw)
        except psycopg.OperationalError as exc:
            raise self.connect_error(exc) from None
        return conn

    def connect_error(self, exc: BaseException) -> TargetUnreachable:
        """Why connecting failed, naming what to fix: our credentials refused, or the
        server not reached. Neither says anything about the database's contents."""
        text = str(exc).strip()
        first = _last_fatal(text) or type(exc).__name__
        user = self.params.get("user", "the default user")
        if refuses_us(text):
            fix = self.credentials or self.settings
            return CredentialsRejected(
                f"{self.label} ({self.where}) refused opsdrill's login as {user}: {first}"
                + (f" (fix: check {fix})" if fix else "")
            )
        fix = f" (fix: check {self.settings} and that the server is up)" if self.settings else ""
        return TargetUnreachable(f"{self.label} ({self.where}): cannot connect: {first}{fix}")

    def libpq_env(self) -> dict[str, str]:
        """Environment for libpq client tools (pg_dump, pg_restore, psql)."""
        mapping = {
            "host": "PGHOST",
            "port": "PGPORT",
            "user": "PGUSER",
            "dbname": "PGDATABASE",
            "sslmode": "PGSSLMODE",
            "sslrootcert": "PGSSLROOTCERT",
            "connect_timeout": "PGCONNECT_TIMEOUT",
            "application_name": "PGAPPNAME",
            "sslcert": "PGSSLCERT",
            "sslkey": "PGSSLKEY",
            "sslcrl": "PGSSLCRL",
            "sslpassword": "PGSSLPASSWORD",
            "gssencmode": "PGGSSENCMODE",
            "target_session_attrs": "PGTARGETSESSIONATTRS",
            "options": "PGOPTIONS",
            "service": "PGSERVICE",
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        for key, var in mapping.items():
            if key in self.params:
                env[var] = str(self.params[key])
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


def database_endpoint(inv: Inventory, name: str) -> Endpoint:
    """The live server of ``[databases.NAME]``, knowing which inventory keys to blame."""
    db = inv.database(name)
    key = f"databases.{name}"
    return Endpoint.from_dsn(
        f"database {name}",
        db.dsn,
        inv.secret(db.password_env) if db.password_env else None,
        settings=f"{key}.dsn",
        credentials=_credentials(inv, key, db.password_env),
    )


def sandbox_endpoint_of(inv: Inventory, name: str, dsn: str, password_env: str | None) -> Endpoint:
    key = f"databases.{name}.sandbox"
    return Endpoint.from_dsn(
        f"sandbox for {name}",
        dsn,
        inv.secret(password_env) if password_env else None,
        settings=f"{key}.dsn",
        credentials=_credentials(inv, key, password_env),
    )


def _credentials(inv: Inventory, key: str, password_env: str | None) -> str:
    if password_env:
        setting = inv.secret_setting(f"{key}.password_env", password_env)
        return f"the user in {key}.dsn and its password, {setting}"
    return f"the user in {key}.dsn ({key}.password_env is not set: no password is sent)"


# libpq's words for "the server is up and does not accept this login": a wrong or missing
# password, an unknown role, pg_hba.conf, no CONNECT privilege. (libpq exposes no SQLSTATE
# for a failed connection attempt, so the text is all there is.)
_REFUSED = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "pg_hba.conf",
    "permission denied for database",
    "must be superuser",
    'role "',
)


def refuses_us(text: str) -> bool:
    lowered = text.lower()
    return any(r in lowered for r in _REFUSED)


def _last_fatal(text: str) -> str:
    """libpq's message: prefer the server's FATAL line over the connection preamble."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "FATAL:" in line:
            return line[line.index("FATAL:") :][:300]
    return lines[0][:300] if lines else ""


def server_info(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Version and cluster identity: pg_control_system()'s system_identifier, the same
    through every address, alias or port forward of one cluster (and on its physical
    replicas), which is how a drill proves its sandbox is not production.

    PostgreSQL grants EXECUTE on pg_control_system() to PUBLIC (checked on 15 with a plain
    role), but a hardened server may revoke it. Then ``system_identifier`` is None and
    ``system_identifier_error`` names the GRANT: a backup must not fail over it, and a
    drill refuses what it cannot prove. The privilege is asked first because a refused call
    would abort the caller's transaction (the backup's snapshot).
    """
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
        " has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE'),"
        " quote_ident(current_user), current_database()"
    ).fetchone()
    assert row is not None
    info: dict[str, Any] = {"version": row[0], "version_num": row[1], "system_identifier": None}
    if row[2]:
        ident = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
        info["system_identifier"] = ident[0] if ident else None
    else:
        info["system_identifier_error"] = (
            f"role {row[3]} may not execute pg_control_system() (fix: in database {row[4]}, "
            f"GRANT EXECUTE ON FUNCTION pg_control_system() TO {row[3]})"
        )
    return info
