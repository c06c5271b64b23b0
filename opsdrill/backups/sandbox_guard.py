"""The drill's sandbox guard: a drill never writes to production, and refuses when it
cannot prove it would not.

Production's identity is its PostgreSQL system identifier, read from the live server when
it answers and from the manifests, which recorded it at backup time; the sandbox must
answer with another one. An address can lie (an alias, a port forward, a new DNS record);
the identifier cannot, short of a physical clone of production, which is refused too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from opsdrill.backups import catalog
from opsdrill.backups.manifest import Manifest
from opsdrill.config.inventory import Inventory
from opsdrill.errors import ConfigError, OpsdrillError, RefusedError, TargetUnreachable
from opsdrill.pg import Endpoint, sandbox_endpoint_of, server_info
from opsdrill.s3 import client, store_call


def sandbox_endpoint(inv: Inventory, name: str) -> tuple[Endpoint, float]:
    db = inv.database(name)
    if db.sandbox is None:
        raise ConfigError(
            f"{inv.path}: databases.{name}.sandbox: missing (fix: add a [databases.{name}."
            'sandbox] with the dsn of a throwaway server, or container = "postgres:{major}")'
        )
    if db.sandbox.dsn is None:
        raise ConfigError(
            f"databases.{name}.sandbox is a container ({db.sandbox.container}): it has no "
            "address before a drill starts it (opsdrill.backups.drill does, and guards it)"
        )
    return (
        sandbox_endpoint_of(inv, name, db.sandbox.dsn, db.sandbox.password_env),
        db.sandbox.max_shrink_percent,
    )


# Besides the manifest restored, the newest few: production's identity as of lately.
RECENT_MANIFESTS = 3


class SandboxRefused(RefusedError):
    """The guard refused the sandbox (exit 2); ``evidence`` is what it compared."""

    def __init__(self, message: str, evidence: dict[str, Any]) -> None:
        super().__init__(message)
        self.evidence = evidence


class SandboxIsProduction(SandboxRefused):
    """Proven: the sandbox is the live cluster (same address, or same system identifier
    as the live server or a backup's manifest). A check *fails* on this."""


class SandboxUnproven(SandboxRefused):
    """Not proven either way: the sandbox's identity, or production's, could not be read.
    A drill refuses (fail closed); a check is *broken*, nothing being known."""


@dataclass
class GuardManifests:
    """The manifests the guard compares the sandbox with: the one to restore (None when
    there is none to read) and the newest few others; ``notes`` says what was unreadable."""

    restoring: Manifest | None
    recent: list[Manifest] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def guard_manifests(
    inv: Inventory, name: str, restoring: Manifest | None, notes: list[str] | None = None
) -> GuardManifests:
    """``restoring`` plus the newest few other complete manifests, best effort: one that
    cannot be read is noted, never fatal (the restored one is what fails closed)."""
    found = GuardManifests(restoring, notes=list(notes or []))
    store_name, store = inv.store_for(name)
    try:
        s3 = client(inv, store)
        refs = store_call(store_name, store, catalog.list_backups, s3, store, name)
    except OpsdrillError as exc:
        found.notes.append(f"newest manifests not compared: {exc.message}")
        return found
    skip = restoring.id if restoring else None
    for ref in [r for r in reversed(refs) if r.complete and r.id != skip][:RECENT_MANIFESTS]:
        try:
            found.recent.append(
                store_call(store_name, store, catalog.read_manifest, s3, store, ref)
            )
        except OpsdrillError as exc:
            found.notes.append(f"manifest of {ref.id} not compared: {exc.message}")
    return found


@dataclass
class Guard:
    """What guard_sandbox compared, for the drill's notes and the check's evidence."""

    sandbox: dict[str, Any]
    live: dict[str, Any]
    manifests: list[dict[str, Any]]
    notes: list[str]

    @property
    def live_answered(self) -> bool:
        return bool(self.live.get("answered"))

    def evidence(self) -> dict[str, Any]:
        return asdict(self)


def check_address(live: Endpoint, sandbox: Endpoint) -> None:
    """The cheap half of the guard, before anything is read: the same host:port."""
    if _host_port(live) == _host_port(sandbox):
        where = {"live": live.where, "sandbox": sandbox.where}
        _refuse(
            SandboxIsProduction, sandbox, f"is the live server {live.where} (same address)", where
        )


def guard_sandbox(
    live: Endpoint,
    sandbox: Endpoint,
    manifests: GuardManifests,
    *,
    live_required: bool = True,
) -> Guard:
    """Refuse a sandbox that is, or may be, the live cluster: fail closed.

    By address, then by cluster identity (system_identifier), compared with the live
    server when it answers AND with the manifests, which recorded production's identity at
    backup time: a live server reached through another address, a DNS alias or a port
    forward is refused even while the live DSN is down, wrong or stale. Refused as well
    (``SandboxUnproven``): a sandbox whose identifier cannot be read, and a drill where
    neither the live server nor the manifest to restore names production's identifier (an
    older manifest). ``live_required`` raises the live server's error after those checks.
    Reads only; nothing is written anywhere.
    """
    check_address(live, sandbox)
    with sandbox.connect(autocommit=True) as conn:
        sandbox_info = {"address": sandbox.where, **server_info(conn)}
    live_info: dict[str, Any] = {"address": live.where, "answered": False}
    live_error: TargetUnreachable | None = None
    try:
        with live.connect(autocommit=True) as conn:
            live_info.update(server_info(conn), answered=True)
    except TargetUnreachable as exc:
        live_error = exc
        live_info["error"] = exc.message
    restoring = manifests.restoring
    seen = [m for m in [restoring, *manifests.recent] if m is not None]
    guard = Guard(
        sandbox_info,
        live_info,
        [
            {
                "backup": m.id,
                "restoring": m is restoring,
                "system_identifier": m.server.get("system_identifier"),
                "address": m.server.get("address"),
            }
            for m in seen
        ],
        list(manifests.notes),
    )
    mine = sandbox_info.get("system_identifier")
    if mine is None:
        why = sandbox_info.get("system_identifier_error", "pg_control_system() returned nothing")
        _refuse(
            SandboxUnproven,
            sandbox,
            f"cannot be proven not to be production: its system identifier is unreadable ({why}); "
            "a drill that cannot prove it is not on production does not run",
            guard.evidence(),
        )
    production = []
    if live_info.get("system_identifier"):
        production.append((f"the live server {live.where}", live_info["system_identifier"]))
    production += [(f"backup {m.id}'s manifest", m.server.get("system_identifier")) for m in seen]
    same = [source for source, ident in production if ident == mine]
    if same:
        _refuse(
            SandboxIsProduction,
            sandbox,
            f"is the live server: the same cluster (system identifier {mine}) as "
            + ", ".join(same),
            guard.evidence(),
        )
    if live_error is not None and live_required:
        raise live_error
    if not live_info.get("system_identifier") and not (
        restoring and restoring.server.get("system_identifier")
    ):
        _refuse(SandboxUnproven, sandbox, _unproven(live, live_info, restoring), guard.evidence())
    if not live_info.get("system_identifier"):
        assert restoring is not None
        others = len(manifests.recent)
        guard.notes.append(
            f"live server {live.where} "
            + ("unreachable" if live_error else "answered without its system identifier")
            + f": live identity not compared; the sandbox (system identifier {mine}) was "
            f"compared with the manifest of {restoring.id} (system identifier "
            f"{restoring.server['system_identifier']})"
            + (f" and {others} other recent manifest(s)" if others else "")
            + " only"
        )
    return guard


def _unproven(live: Endpoint, live_info: dict[str, Any], restoring: Manifest | None) -> str:
    """Why production's identity is unknown, and what to fix."""
    if live_info["answered"]:
        live_why = live_info.get("system_identifier_error", "identifier unreadable")
        live_part = f"the live server {live.where} answered but {live_why}"
    else:
        live_part = f"the live server did not answer ({live_info['error']})"
    if restoring is None:
        manifest_part = "no backup manifest could be read"
    else:
        recorded = restoring.server.get("system_identifier_error")
        manifest_part = f"the manifest of {restoring.id} records no system identifier " + (
            f"({recorded})" if recorded else "(an older format)"
        )
    return (
        f"cannot be proven not to be production: {manifest_part} and {live_part}; a drill that "
        "cannot prove it is not on production does not run (fix: make "
        f"{live.settings or 'the live DSN'} reachable for this drill, or drill a backup "
        "whose manifest records the identifier)"
    )


def _host_port(endpoint: Endpoint) -> tuple[str, str]:
    return str(endpoint.params.get("host")), str(endpoint.params.get("port", 5432))


def _refuse(
    kind: type[SandboxRefused], sandbox: Endpoint, why: str, evidence: dict[str, Any]
) -> NoReturn:
    fix = sandbox.settings or "sandbox.dsn"
    if kind is SandboxIsProduction:
        why += f"; a drill must never write to production (fix: point {fix} at a throwaway server)"
    raise kind(f"refusing the drill sandbox {sandbox.where} ({fix}): it {why}", evidence)


def major(version_num: Any) -> int | None:
    """PostgreSQL's major version from server_version_num (150004 -> 15; 90624, 9.6,
    -> 9: enough to order them, and no supported server is older than 10)."""
    if not isinstance(version_num, int) or version_num <= 0:
        return None
    return version_num // 10000


def require_major(guard: Guard, manifest: Manifest, sandbox: Endpoint) -> None:
    """A dump restores into its own major or a newer one, never an older: say so before
    anything is created, not halfway through pg_restore ("unsupported version")."""
    backup = major(manifest.server.get("version_num"))
    mine = major(guard.sandbox.get("version_num"))
    if backup is None or mine is None or mine >= backup:
        return
    raise ConfigError(
        f"drill sandbox {sandbox.where} runs PostgreSQL {mine}, older than the backup's "
        f"server (PostgreSQL {backup}, {manifest.server.get('version')}): a dump restores "
        f"only into its own major or a newer one (fix: point {sandbox.settings or 'sandbox.dsn'} "
        f"at a PostgreSQL {backup} or newer server)"
    )
