"""Can the backup role read everything pg_dump reads? Asked before it bites.

pg_dump reads every table, sequence and large object of the database, and refuses a table
whose row-level security would hide rows from it. A role that can read most of them fails
halfway through the night ("permission denied for large object 4100001"). Membership of
``pg_read_all_data`` covers tables, views and sequences, but neither large objects nor
row-level security, and a large object the application creates tomorrow is unreadable
again. These catalog queries answer "what could this role not dump, and which statement
fixes it" without reading any data, so ``inventory check --for backup``, the backup itself
(before anything is uploaded) and the ``pg.backup.privileges`` check can all ask.

Hand-written: no library answers this; pg_dump itself only finds out by failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

SHOWN = 5  # examples per finding; counts are always complete

# What pg_dump dumps: ordinary and partitioned tables (data read from the leaves),
# sequences; not catalog, toast or temporary schemas, nor extension members (pg_dump dumps
# the CREATE EXTENSION, not their data).
_OBJECTS = """
SELECT n.nspname, c.relname, c.relkind,
       has_table_privilege(c.oid, 'SELECT') AS can_select,
       c.relrowsecurity AND (c.relowner <> r.oid OR c.relforcerowsecurity) AS rls_applies,
       pg_get_userbyid(c.relowner) AS owner
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_roles r ON r.rolname = current_user
WHERE c.relkind IN ('r', 'p', 'S')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""
_SCHEMAS = """
SELECT n.nspname FROM pg_namespace n
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
  AND NOT has_schema_privilege(n.oid, 'USAGE')
ORDER BY 1
"""
# A large object is readable by its owner's members and by whoever its ACL grants SELECT
# (PUBLIC is grantee 0); lo_compat_privileges = on switches the checks off. (PostgreSQL 17
# has has_largeobject_privilege(); this works on every supported major.)
_LARGE_OBJECTS = """
SELECT pg_get_userbyid(l.lomowner) AS owner, count(*) AS n,
       (array_agg(l.oid ORDER BY l.oid))[1:%(shown)s]::text[] AS examples
FROM pg_largeobject_metadata l
WHERE NOT pg_has_role(l.lomowner, 'USAGE')
  AND NOT EXISTS (
    SELECT 1 FROM aclexplode(coalesce(l.lomacl, acldefault('L', l.lomowner))) a
    WHERE a.privilege_type = 'SELECT' AND (a.grantee = 0 OR pg_has_role(a.grantee, 'USAGE')))
GROUP BY 1
ORDER BY 2 DESC
"""


@dataclass(frozen=True)
class Missing:
    """One kind of object the role cannot dump, with the statement that fixes it."""

    kind: str  # "schemas", "tables", "sequences", "tables with row-level security", ...
    count: int
    examples: list[str]
    fix: str
    stops_pg_dump: bool = True  # False: the backup works, something after it does not

    def describe(self) -> str:
        shown = ", ".join(self.examples[:SHOWN])
        more = f" and {self.count - SHOWN} more" if self.count > SHOWN else ""
        return f"{self.kind}: {self.count} not readable ({shown}{more}); fix: {self.fix}"


@dataclass
class Privileges:
    role: str
    superuser: bool
    bypassrls: bool
    examined: dict[str, int] = field(default_factory=dict)
    missing: list[Missing] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing

    @property
    def dump_would_fail(self) -> bool:
        return any(m.stops_pg_dump for m in self.missing)

    def summary(self) -> str:
        return "; ".join(m.describe() for m in self.missing)

    def evidence(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "superuser": self.superuser,
            "bypassrls": self.bypassrls,
            "examined": self.examined,
            "missing": [
                {
                    "kind": m.kind,
                    "count": m.count,
                    "examples": m.examples,
                    "fix": m.fix,
                    "stops_pg_dump": m.stops_pg_dump,
                }
                for m in self.missing
            ],
        }


def _ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def check_privileges(conn: psycopg.Connection[Any]) -> Privileges:
    """What ``current_user`` could not dump from the connected database."""
    row = conn.execute(
        "SELECT current_user, rolsuper, rolbypassrls, "
        "current_setting('server_version_num')::int, "
        "current_setting('lo_compat_privileges')::bool "
        "FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if row is None:  # current_user always has a pg_roles row
        raise RuntimeError("current_user has no pg_roles row")
    role, superuser, bypassrls, version_num, lo_compat = row
    result = Privileges(str(role), bool(superuser), bool(bypassrls))
    me = _ident(result.role)
    read_all = (
        f"GRANT pg_read_all_data TO {me}"
        if version_num >= 140000
        else f"GRANT SELECT ON ALL TABLES IN SCHEMA <schema> TO {me}"
    )

    schemas = [str(r[0]) for r in conn.execute(_SCHEMAS).fetchall()]
    objects = conn.execute(_OBJECTS).fetchall()
    result.examined["tables"] = sum(1 for o in objects if o[2] in ("r", "p"))
    result.examined["sequences"] = sum(1 for o in objects if o[2] == "S")
    lo_total = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
    result.examined["large_objects"] = int(lo_total[0]) if lo_total else 0
    if superuser:
        return result  # a superuser reads everything, row-level security included

    if schemas:
        result.missing.append(
            Missing("schemas", len(schemas), schemas, f"GRANT USAGE ON SCHEMA ... TO {me}")
        )
    for kind, relkinds in (("tables", ("r", "p")), ("sequences", ("S",))):
        names = [f"{o[0]}.{o[1]}" for o in objects if o[2] in relkinds and not o[3]]
        if names:
            result.missing.append(Missing(kind, len(names), names, read_all))
    if not bypassrls:
        hidden = [f"{o[0]}.{o[1]}" for o in objects if o[4]]
        if hidden:
            result.missing.append(
                Missing(
                    "tables with row-level security",
                    len(hidden),
                    hidden,
                    f"ALTER ROLE {me} BYPASSRLS",
                )
            )
    # Not read by pg_dump, but recorded in every manifest: the drill's sandbox guard
    # refuses to restore a backup that does not say which cluster it came from.
    control = conn.execute(
        "SELECT has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')"
    ).fetchone()
    if control is not None and not control[0]:
        result.missing.append(
            Missing(
                "functions the manifest needs",
                1,
                ["pg_control_system() (the cluster's system identifier)"],
                f"GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_system() TO {me}",
                stops_pg_dump=False,
            )
        )
    if not lo_compat:
        for owner, count, examples in conn.execute(_LARGE_OBJECTS, {"shown": SHOWN}):
            result.missing.append(
                Missing(
                    f"large objects owned by {owner}",
                    int(count),
                    [str(e) for e in examples],
                    # membership also covers the large objects the owner creates later
                    f"GRANT {_ident(str(owner))} TO {me}",
                )
            )
    return result
