"""The domains the application really sends from, read from its own database.

Per-port overrides let each portal send from its own address, so the inventory's list of
sending domains can fall behind what the application does. ``discover_sending_domains``
runs the inventory's ``sending_domain_discovery.query`` (one domain per row, first
column) against the named database: in a read-only transaction, under a statement
timeout, as the database's inventory credentials. Values are normalised the way the
inventory normalises its keys (lower case, no trailing dot, IDNs in their ``xn--`` form)
so the two compare with ``==``; NULLs and empty strings are counted but carry no domain,
and anything else that is not a domain name is kept apart (``invalid``) for the caller to
report, never silently dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from opsdrill.config.inventory import Inventory
from opsdrill.config.mail import normalise_domain
from opsdrill.errors import ConfigError, TargetUnreachable
from opsdrill.findings import Finding

DEFAULT_TIMEOUT_SECONDS = 30.0
# A sending-domain query returns a handful of rows; more means the query is wrong.
MAX_ROWS = 10_000


@dataclass(frozen=True)
class Discovery:
    database: str
    where: str
    query: str
    domains: frozenset[str]
    rows: int
    empty: int
    invalid: tuple[str, ...]

    def evidence(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "where": self.where,
            "query": self.query,
            "rows": self.rows,
            "null_or_empty_rows": self.empty,
            "domains": sorted(self.domains),
            "invalid_values": list(self.invalid),
        }


def discovery_findings(found: Discovery, listed: Collection[str]) -> list[Finding]:
    """Each discovered domain the inventory does not describe (``listed``: its
    ``sending_domains``), then each value that is no domain name."""
    findings = [
        Finding(
            "discovery.unlisted",
            f"domain {domain} sends mail but the inventory says nothing about which provider "
            f'sends for it (fix: add [sending_domains."{domain}"] with its providers)',
        )
        for domain in sorted(found.domains - set(listed))
    ]
    findings += [
        Finding(
            "discovery.invalid",
            f"value {value!r} from the discovery query is not a domain name (fix the query "
            "or the row: the domain cannot be checked)",
        )
        for value in found.invalid
    ]
    return findings


def _domain(value: object) -> str | None:
    """The normalised domain of one row value; None when it is no domain name."""
    text = str(value).strip()
    try:
        if not text.isascii():
            text = text.rstrip(".").encode("idna").decode("ascii")
        return normalise_domain(text)
    except (ValueError, UnicodeError):
        return None


def discover_sending_domains(
    inv: Inventory, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
) -> Discovery:
    """Run the discovery query; see the module docstring.

    Raises ``ConfigError`` without a ``[sending_domain_discovery]`` section or when the
    query is rejected (a typo, a missing table, a write), and ``TargetUnreachable`` when
    the server cannot be reached or the query outlives ``timeout_seconds``.
    """
    cfg = inv.model.sending_domain_discovery
    if cfg is None:
        raise ConfigError(f"{inv.path}: no [sending_domain_discovery] section")
    # imported here: every DNS check imports this module, few inventories discover
    # (psycopg is ~70 ms of a DNS-only run's start-up)
    import psycopg

    from opsdrill.pg import database_endpoint

    endpoint = database_endpoint(inv, cfg.database)
    label = f"sending_domain_discovery on {endpoint.where}"
    with endpoint.connect(autocommit=False) as conn:
        conn.read_only = True
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                (f"{max(1, int(timeout_seconds * 1000))}ms",),
            )
            cursor = conn.execute(cfg.query)
            rows = cursor.fetchmany(MAX_ROWS + 1)
        except psycopg.errors.QueryCanceled:
            raise TargetUnreachable(
                f"{label}: the query did not finish within {timeout_seconds:g}s"
            ) from None
        except psycopg.OperationalError as exc:
            raise TargetUnreachable(f"{label}: {_first_line(exc)}") from None
        except psycopg.Error as exc:
            raise ConfigError(
                f"{label}: the query failed: {_first_line(exc)} "
                "(fix: sending_domain_discovery.query must be one read-only SELECT "
                "returning one domain per row)"
            ) from None
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
    if len(rows) > MAX_ROWS:
        raise ConfigError(
            f"{label}: the query returned more than {MAX_ROWS} rows "
            "(fix: SELECT DISTINCT the domain part only)"
        )
    domains: set[str] = set()
    invalid: list[str] = []
    empty = 0
    for row in rows:
        value = row[0] if row else None
        if value is None or not str(value).strip():
            empty += 1
            continue
        domain = _domain(value)
        if domain is None:
            invalid.append(str(value)[:200])
        else:
            domains.add(domain)
    return Discovery(
        database=cfg.database,
        where=endpoint.where,
        query=cfg.query,
        domains=frozenset(domains),
        rows=len(rows),
        empty=empty,
        invalid=tuple(sorted(set(invalid))),
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
