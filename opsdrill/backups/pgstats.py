"""What a database holds, counted: the manifest's side at backup time, the restored side in
a drill, the live side for drift.

Counts are taken inside the snapshot pg_dump uses, so tables compare exactly. Two kinds of
object need more care than a count:

- Sequences are not transactional: pg_dump reads each one's value at its own moment, and so
  does this module, so a busy database gives two different readings and neither is "the
  snapshot's". The restored sequence holds the value the dump carried; whether that value is
  safe is judged against the restored data itself (the owning column's max, or min for a
  descending sequence), see ``judge_sequences``.
- Materialized views hold whatever their last REFRESH produced. A restore refreshes every
  view that was populated from the restored tables, and leaves an unpopulated one
  unpopulated; counting an unpopulated view is an error that would abort the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # psycopg loads where a connection is made: the manifest model needs none
    import psycopg

# Make row::text deterministic across sessions so content hashes compare.
STABLE_SESSION = (
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';"
    " SET extra_float_digits = 3; SET bytea_output = 'hex'; SET statement_timeout = 0"
)
INV_READ = 0x40000  # lo_open mode: read


@dataclass
class SnapshotStats:
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    sequences: dict[str, dict[str, Any]] = field(default_factory=dict)
    large_objects: dict[str, Any] = field(default_factory=dict)


# Ordinary tables (leaf partitions included: each is counted, the partitioned parent holds
# no rows of its own) and materialized views; not catalogs, toast, temp or extension members.
TABLES_QUERY = """
SELECT format('%I.%I', n.nspname, c.relname), n.nspname, c.relname, c.relkind,
       c.relispopulated, c.relpersistence
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1
"""
# Each sequence with its direction and, when a column owns it (serial, identity), that
# column: what "would hand out used ids" is judged against.
SEQUENCES_QUERY = """
SELECT format('%I.%I', n.nspname, c.relname), n.nspname, c.relname, s.seqincrement,
       tn.nspname, t.relname, a.attname,
       CASE WHEN a.attname IS NOT NULL
            THEN format('%I.%I.%I', tn.nspname, t.relname, a.attname) END
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_sequence s ON s.seqrelid = c.oid
LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
     AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i')
LEFT JOIN pg_class t ON t.oid = d.refobjid
LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE c.relkind = 'S'
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.objid = c.oid AND e.deptype = 'e')
ORDER BY 1
"""


def collect_stats(
    conn: psycopg.Connection[Any],
    content_hashes: bool,
    *,
    column_extremes: bool = False,
    sequences: bool = True,
) -> SnapshotStats:
    """Exact per-table row counts (and optional content hashes) as the snapshot sees them.

    ``column_extremes``: also read each owned sequence's column max and min (a drill judges
    the restored sequences with them). ``sequences=False``: the caller read them already
    (a backup reads them before pg_dump starts, see ``read_sequences``). hashtextextended
    is internal to PostgreSQL: hashes compare only within one major version, which holds
    for a drill restoring into it.
    """
    from psycopg.sql import SQL, Identifier

    stats = SnapshotStats()
    conn.execute(STABLE_SESSION)
    for name, schema, relname, kind, populated, persistence in conn.execute(
        TABLES_QUERY
    ).fetchall():
        entry: dict[str, Any] = {}
        if kind == "m":
            entry["kind"] = "materialized view"
            entry["populated"] = bool(populated)
        if persistence == "u":
            entry["unlogged"] = True
        if kind == "m" and not populated:
            entry["rows"] = 0  # counting it is an error (and would abort the snapshot)
            stats.tables[name] = entry
            continue
        ident = Identifier(schema, relname)
        if content_hashes:
            q = SQL(
                "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {} t"
            ).format(ident)
            rows, digest = conn.execute(q).fetchone() or (0, "0")
            entry.update(rows=int(rows), content_hash=str(digest))
        else:
            row = conn.execute(SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
            entry["rows"] = int(row[0]) if row else 0
        stats.tables[name] = entry
    if sequences:
        stats.sequences = read_sequences(conn, column_extremes=column_extremes)
    stats.large_objects = _large_objects(conn, content_hashes)
    return stats


def read_sequences(
    conn: psycopg.Connection[Any], *, column_extremes: bool = False
) -> dict[str, dict[str, Any]]:
    """Every sequence's value, direction and owning column.

    A backup calls this before pg_dump starts: sequences only move in their direction
    (short of a setval), so the dump's own reading, taken later, is at or past this one,
    which makes "restored behind the manifest" a real loss and never a race.
    """
    from psycopg.sql import SQL, Identifier

    found_all: dict[str, dict[str, Any]] = {}
    for name, schema, relname, increment, tschema, table, column, owner in conn.execute(
        SEQUENCES_QUERY
    ).fetchall():
        q = SQL("SELECT last_value, is_called FROM {}").format(Identifier(schema, relname))
        seq = conn.execute(q).fetchone() or (0, False)
        found: dict[str, Any] = {
            "last_value": int(seq[0]),
            "is_called": bool(seq[1]),
            "increment": int(increment),
        }
        if column is not None:
            found["owned_by"] = str(owner)
            if column_extremes:
                extremes = conn.execute(
                    SQL("SELECT max({c})::numeric::text, min({c})::numeric::text FROM {t}").format(
                        c=Identifier(column), t=Identifier(tschema, table)
                    )
                ).fetchone()
                found["column_max"] = _int_or_none(extremes[0] if extremes else None)
                found["column_min"] = _int_or_none(extremes[1] if extremes else None)
        found_all[name] = found
    return found_all


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _large_objects(conn: psycopg.Connection[Any], content_hashes: bool) -> dict[str, Any]:
    """Count and total bytes (each object opened and sought to its end: no data is read,
    and pg_largeobject itself is readable by superusers only)."""
    row = conn.execute(
        "SELECT count(*), coalesce(sum(lo_lseek64(lo_open(oid, %s), 0, 2)), 0)::bigint"
        " FROM pg_largeobject_metadata",
        (INV_READ,),
    ).fetchone()
    found: dict[str, Any] = {"count": int(row[0]) if row else 0, "bytes": int(row[1]) if row else 0}
    if content_hashes:
        digest = conn.execute(
            "SELECT coalesce(sum(hashtextextended(lo_get(oid)::text, 0)), 0)::text"
            " FROM pg_largeobject_metadata"
        ).fetchone()
        found["content_hash"] = str(digest[0]) if digest else "0"
    return found


def next_value(seq: dict[str, Any]) -> int:
    """What nextval() would hand out next (the value itself if never called)."""
    last = int(seq["last_value"])
    return last + int(seq.get("increment", 1)) if seq.get("is_called") else last


def reuse_problem(name: str, seq: dict[str, Any]) -> str | None:
    """Why ``seq`` (restored, with column extremes) would hand out an id its own column
    already holds; None when it would not, or when no column owns it."""
    if "owned_by" not in seq:
        return None
    upcoming = next_value(seq)
    if int(seq.get("increment", 1)) > 0:
        top = seq.get("column_max")
        if top is not None and upcoming <= top:
            return (
                f"sequence {name}: next value {upcoming} is not above {seq['owned_by']}'s "
                f"max {top} (would hand out used ids)"
            )
    else:
        bottom = seq.get("column_min")
        if bottom is not None and upcoming >= bottom:
            return (
                f"sequence {name} (descending): next value {upcoming} is not below "
                f"{seq['owned_by']}'s min {bottom} (would hand out used ids)"
            )
    return None
