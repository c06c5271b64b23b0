"""The drill's scratch databases on the sandbox: created with their owner recorded, dropped
robustly whatever holds them, and swept when a killed drill left one behind.

Created only after the sandbox guard has passed (opsdrill.backups.sandbox_guard), never reused (a
name that exists may be production's), and dropped on every exit path: a scratch database
holds a full copy of production's data.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from opsdrill import workspace
from opsdrill.errors import ConfigError, OpsdrillError, RefusedError, TargetUnreachable
from opsdrill.pg import Endpoint

SCRATCH_PREFIX = "opsdrill_drill_"
SCRATCH_COMMENT = "opsdrill drill scratch database; owner: "
# A scratch database whose owner cannot be proven gone (it ran on another host, or left no
# owner comment) is dropped only once no drill can still be using it: a drill running for
# a day has missed any RTO by far. Never less: it may be a concurrent drill's.
SCRATCH_MAX_AGE = timedelta(hours=24)
# How long dropping a database waits for the sessions in it to go (autovacuum, a
# monitoring agent) before the error names them; each plain DROP waits up to 5 s itself.
DROP_WITHIN_SECONDS = 60.0


def create_database(server: Endpoint, dbname: str, *, comment: str | None = None) -> None:
    """Create the restore target; never reuse an existing database (it may be production).
    ``comment`` goes on it at once (the drill's owner record: see sweep_scratch)."""
    with server.connect(autocommit=True) as conn:
        try:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname))
            )
        except psycopg.errors.DuplicateDatabase:
            raise RefusedError(
                f"database {dbname!r} already exists on {server.where.rsplit('/', 1)[0]}; "
                "a restore never writes into an existing database (fix: choose --new-name)"
            ) from None
        if comment is not None:
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(dbname), sql.Literal(comment)
                )
            )


def drop_database(server: Endpoint, dbname: str, *, within: float = DROP_WITHIN_SECONDS) -> None:
    """Drop ``dbname``, waiting out the sessions that hold it; cleanup no signal cuts short.

    ``WITH (FORCE)`` ends the other sessions only if this role may signal each of them: a
    sandbox role that is not a superuser may not end autovacuum's or another role's
    (unless it has pg_signal_backend). A plain DROP then makes autovacuum workers exit by
    itself and waits up to 5 s for the rest; both are retried with a backoff for
    ``within`` seconds, after which the error names what still holds the database.
    """
    drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname))
    deadline = time.monotonic() + within
    delay = 0.5
    with workspace.shielded():
        while True:
            with server.connect(autocommit=True) as conn:
                try:
                    held = _try_drop(conn, drop)
                    if held is None:
                        return
                    if time.monotonic() + delay > deadline:
                        raise _still_held(server, conn, dbname, within, held)
                except psycopg.errors.InsufficientPrivilege as exc:  # not its owner
                    raise ConfigError(
                        f"{server.label} ({server.where}): cannot drop database {dbname}: "
                        f"{_first_line(exc)} (fix: drop it by hand as its owner)"
                    ) from None
                except psycopg.Error as exc:
                    raise TargetUnreachable(
                        f"{server.label} ({server.where}): cannot drop database {dbname}: "
                        f"{_first_line(exc)} (fix: drop it by hand; the next drill removes "
                        "it once this run is gone)"
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _try_drop(conn: psycopg.Connection[Any], drop: sql.Composed) -> str | None:
    """None once dropped, else why not: FORCE, refused when a session is one this role may
    not end, then a plain DROP, which ends autovacuum itself and fails on other sessions.
    A plain DROP refused for privileges (not the owner) raises."""
    try:
        conn.execute(drop + sql.SQL(" WITH (FORCE)"))
        return None
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectInUse) as exc:
        forced = _first_line(exc)
    try:
        conn.execute(drop)
        return None
    except psycopg.errors.ObjectInUse as exc:
        return f"{forced}; without FORCE: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _still_held(
    server: Endpoint, conn: psycopg.Connection[Any], dbname: str, within: float, why: str
) -> ConfigError:
    """What holds ``dbname`` (sessions, prepared transactions), for the operator."""
    sessions = conn.execute(
        "SELECT pid, backend_type, usename, application_name, host(client_addr), state "
        "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY pid",
        (dbname,),
    ).fetchall()
    holders = []
    for pid, kind, user, app, addr, state in sessions:
        if kind is None:  # all a role without pg_read_all_stats sees of others' sessions
            facts = [f"a session of role {user}" if user else "autovacuum or another process"]
        else:
            facts = [kind, *([f"role {user}"] if user else [])]
            facts += [f"application {app!r}"] if app else []
            facts += [f"from {addr}"] if addr else []
            facts += [state] if state else []
        holders.append(f"pid {pid} ({', '.join(facts)})")
    prepared = conn.execute(
        "SELECT gid, owner FROM pg_prepared_xacts WHERE database = %s", (dbname,)
    ).fetchall()
    holders += [f"prepared transaction {gid!r} of role {owner}" for gid, owner in prepared]
    role = server.params.get("user", "the sandbox role")
    return ConfigError(
        f"{server.label} ({server.where}): could not drop database {dbname} within "
        f"{within:g}s ({why}); held by "
        f"{', '.join(holders) or 'sessions gone by now'} (fix: let {role} end them, "
        f"GRANT pg_signal_backend TO {role}, or stop what connects to it; then drop it by "
        "hand, or let the next drill remove it)"
    )


def scratch_name(name: str, now: datetime) -> str:
    """``opsdrill_drill_<db>_<timestamp>_<hex>``, within PostgreSQL's 63 bytes: a longer
    name would be truncated on CREATE and then missed by the DROP."""
    room = 63 - len(SCRATCH_PREFIX) - len("_YYYYmmddHHMMSS_hhhhhh")
    short = name.encode()[:room].decode(errors="ignore")
    return f"{SCRATCH_PREFIX}{short}_{now:%Y%m%d%H%M%S}_{secrets.token_hex(3)}"


_SCRATCH_TS = re.compile(r"_(\d{14})_[0-9a-f]{6}$")


def sweep_scratch(sandbox: Endpoint, say: workspace.Say = workspace.say_on_stderr) -> list[str]:
    """Drop the scratch databases killed drills left on the sandbox; one line each.

    Only those provably abandoned: the owner recorded in the comment ran on this host and
    its process is gone, or the database is older than SCRATCH_MAX_AGE. Never a concurrent
    drill's, from this host or another.
    """
    with sandbox.connect(autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE datname LIKE %s ORDER BY datname",
            (SCRATCH_PREFIX.replace("_", "\\_") + "%",),
        ).fetchall()
    done = []
    for dbname, comment in rows:
        who = _abandoned(str(dbname), comment, datetime.now(UTC))
        if who is None:
            continue
        try:
            drop_database(sandbox, dbname)
        except OpsdrillError as exc:
            line = f"could not remove scratch database {dbname} left by {who}: {exc.message}"
        else:
            line = f"removed scratch database {dbname} from the sandbox, left by {who}"
        say(line)
        done.append(line)
    return done


def _abandoned(dbname: str, comment: str | None, now: datetime) -> str | None:
    """Whose the scratch database was, if it is provably abandoned; else None."""
    owner = None
    if comment and comment.startswith(SCRATCH_COMMENT):
        owner = workspace.Owner.from_json(comment.removeprefix(SCRATCH_COMMENT))
    if owner is not None and owner.on_this_host():  # judged: gone, or a concurrent drill
        return owner.describe() if owner.provably_dead() else None
    created: datetime | None = None
    with contextlib.suppress(ValueError):
        if owner is not None:
            created = datetime.fromisoformat(owner.started)
        elif match := _SCRATCH_TS.search(dbname):
            created = datetime.strptime(match[1], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    if created is not None and now - created > SCRATCH_MAX_AGE:
        hours = SCRATCH_MAX_AGE.total_seconds() / 3600
        return f"a drill started {created:%Y-%m-%d %H:%M}Z, more than {hours:g} h ago"
    return None


def drop_after_failure(sandbox: Endpoint, scratch: str) -> None:
    """Drop the scratch database of a drill that failed or was interrupted; a failure to
    is said on stderr, and the drill's own error goes on."""
    try:
        drop_database(sandbox, scratch)
    except OpsdrillError as exc:
        workspace.say_on_stderr(f"the drill's scratch database was not dropped: {exc.message}")
