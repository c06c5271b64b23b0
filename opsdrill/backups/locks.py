"""One run of an operation per database at a time, on every host: a PostgreSQL advisory lock.

The cron wrappers' ``flock`` (scripts/backup/run-locked.sh) only keeps one wrapper from
overlapping itself on one host. A second ops host, a failover twin or an operator running
``opsdrill backup`` by hand would still back up the same database at the same time. The lock
therefore lives where every such run has to go anyway, the live server:

- ``pg_try_advisory_lock`` (session level) on a connection of its own, held for the whole
  run: pg_dump's and the snapshot's connections come and go at other times;
- the key is a 64-bit hash of the operation and the server's database name: two
  inventories that name the database differently still exclude each other (an advisory
  lock belongs to one database of the cluster, ``pg_locks.database``);
- the session's ``application_name`` says who holds it (``opsdrill backup crm (host H pid
  N)``), so a run that finds it taken names the holder, its address and since when;
- a run killed outright (SIGKILL, OOM killer, a crash) holds nothing: PostgreSQL releases
  a session's locks when the session ends, which it notices at once when the process dies.
  A host that vanishes without closing its connection (power cut, network gone) is found
  by the server's TCP keepalives, which this session sets to about two minutes.

The DSN must reach PostgreSQL itself or a session-pooling proxy: behind a
transaction-pooling PgBouncer a session lock means nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg

from opsdrill.errors import LockHeld, TargetUnreachable
from opsdrill.pg import Endpoint

NAMEDATALEN = 63  # application_name longer than this is cut by the server
# tcp_keepalives_idle, _interval, _count: a vanished client is dropped (and its lock
# released) after about 60 + 6 * 10 s. Per session, settable by any role.
KEEPALIVES = (60, 10, 6)
_HOLDER = """
SELECT l.pid, a.application_name, host(a.client_addr), a.client_port, a.usename,
       a.backend_start, now() - a.backend_start
  FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = %s::oid AND l.objid = %s::oid
"""


def lock_key(operation: str, dbname: str) -> int:
    """The advisory lock's bigint key: the same on every host and opsdrill version."""
    digest = hashlib.sha256(f"opsdrill {operation}\0{dbname}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def application_name(operation: str, name: str) -> str:
    """``opsdrill backup crm (host HOST pid N)``, the host name shortened to fit the
    server's 63 bytes so the pid is never cut off."""
    head, tail = f"opsdrill {operation} {name} (host ", f" pid {os.getpid()})"
    room = max(0, NAMEDATALEN - len((head + tail).encode()))
    host = socket.gethostname().split(".")[0].encode()[:room].decode(errors="ignore")
    return head + host + tail


@contextlib.contextmanager
def database_lock(endpoint: Endpoint, operation: str, name: str) -> Iterator[None]:
    """Hold ``operation``'s lock on ``endpoint``'s database for the ``with`` block, or raise
    ``LockHeld`` (exit 75) naming the holder. ``name`` is the inventory's name for the
    database (``databases.NAME``), for messages."""
    params = {**endpoint.params, "application_name": application_name(operation, name)}
    conn = dataclasses.replace(endpoint, params=params).connect(autocommit=True)
    try:
        try:
            dbname = _prepare(conn)
            key = lock_key(operation, dbname)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            holder = None if row and row[0] else _holder(conn, key)
        except psycopg.Error as exc:
            raise TargetUnreachable(
                f"{endpoint.label} ({endpoint.where}): taking the {operation} lock failed: "
                f"{str(exc).strip()[:300]} (fix: check that the server is up; "
                f"{endpoint.settings})"
            ) from None
        if holder is not None:
            raise LockHeld(
                f"{operation} skipped: another run holds the {operation} lock of "
                f"databases.{name} ({endpoint.where}): {holder}; nothing was done (a run "
                "that was killed holds no lock: the server releases it when its session "
                "ends; if that run hangs, stop it, or end its session with "
                "pg_terminate_backend(pid))"
            )
        yield
    finally:
        conn.close()  # ends the session, and with it the lock


def _prepare(conn: psycopg.Connection[Any]) -> str:
    """Keep the lock's session alive as long as the run (and not longer than its host):
    the server's idle_session_timeout (14+) would end it, releasing the lock mid-run."""
    idle, interval, count = KEEPALIVES
    conn.execute(
        "SELECT set_config('tcp_keepalives_idle', %s, false), "
        "set_config('tcp_keepalives_interval', %s, false), "
        "set_config('tcp_keepalives_count', %s, false)",
        (str(idle), str(interval), str(count)),
    )
    if conn.info.server_version >= 140000:
        conn.execute("SET idle_session_timeout = 0")
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def _holder(conn: psycopg.Connection[Any], key: int) -> str:
    """Who holds ``key``, in words: its application_name, address, role, since when."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(_HOLDER, (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
    if row is None:
        return "it was released a moment ago (run again)"
    pid, app, addr, port, role, started, age = row
    parts = [f"'{app}'" if app else "a session that gave no application_name"]
    if addr:
        parts.append(f"from {addr}" + (f":{port}" if port else ""))
    elif role is not None:
        parts.append("over a local socket")
    if role is not None:
        parts.append(f"as {role}")
    if isinstance(started, datetime):
        minutes = int(age.total_seconds() // 60) if age is not None else 0
        parts.append(f"since {started.astimezone(UTC):%Y-%m-%d %H:%M:%SZ} ({minutes} min ago)")
    else:
        parts.append("(its address and start are hidden from this role: pg_read_all_stats)")
    return " ".join(parts) + f", server pid {pid}"
