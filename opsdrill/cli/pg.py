"""Handlers: PostgreSQL backup, list, prune, restore and drill."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from opsdrill import metrics
from opsdrill.cli.common import databases_in, inventory_for
from opsdrill.config.inventory import Inventory
from opsdrill.errors import ConfigError, OpsdrillError, RefusedError

if TYPE_CHECKING:
    from opsdrill.backups.drill import DrillReport
    from opsdrill.pg import Endpoint


def cmd_backup(args: argparse.Namespace) -> int:
    """Each database in turn. One whose lock another run holds is skipped (said on stderr)
    and the others still run; the command then exits 75 (``LockHeld``) if none failed."""
    from opsdrill.backups.backup import run_backup
    from opsdrill.backups.uploads import Swept
    from opsdrill.errors import LockHeld

    inv = inventory_for(args, scope="backup")
    skipped: list[LockHeld] = []
    names = databases_in(inv, args.database)
    for name in names:
        swept: list[Swept] = []
        try:
            manifest = run_backup(inv, name, on_sweep=swept.append)
        except LockHeld as exc:
            if len(names) == 1:
                raise
            print(f"opsdrill: {exc.message}", file=sys.stderr)
            skipped.append(exc)
            continue
        metrics.add_bytes(int(manifest.object["size"]))
        aborted = sum(len(found.aborted) for found in swept)
        also = f"; swept {aborted} stale upload{'s' if aborted > 1 else ''}" if aborted else ""
        print(
            f"backup {manifest.id}: {manifest.object['size']} bytes, "
            f"sha256 {manifest.object['sha256'][:16]}..., "
            f"{sum(t['rows'] for t in manifest.tables.values())} rows in "
            f"{len(manifest.tables)} tables, {manifest.duration_seconds:.1f}s "
            f"-> {manifest.object['key']}{also}"
        )
    if skipped:
        raise LockHeld(f"{len(skipped)} of {len(names)} databases skipped (above): locked")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from opsdrill.backups import catalog
    from opsdrill.s3 import client, store_call

    inv = inventory_for(args, scope="store")
    for name in databases_in(inv, args.database):
        store_name, store = inv.store_for(name)
        refs = store_call(store_name, store, catalog.list_backups, client(inv, store), store, name)
        if not refs:  # silence would read as "the command did nothing" or "wrong store"
            where = f"s3://{store.bucket}/{catalog.db_prefix(store, name)}"
            print(f"no backups of {name} under {where} (store {store_name}, {store.endpoint})")
        for ref in refs:
            state = "complete" if ref.complete else "INCOMPLETE (no manifest)"
            print(f"{ref.id}  {ref.taken_at:%Y-%m-%d %H:%M:%SZ}  {ref.size:>12}  {state}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from opsdrill.backups.prune import prune

    inv = inventory_for(args, scope="store")
    for name in databases_in(inv, args.database):
        decisions = prune(inv, name, dry_run=args.dry_run)
        for decision in decisions:
            verb = "keep  " if decision.keep else ("would delete" if args.dry_run else "delete")
            print(f"{verb} {decision.backup.id}: {decision.reason}")
        kept = [d.backup for d in decisions if d.keep]
        gone = len(decisions) - len(kept)
        print(
            f"{name}: {len(kept)} kept ({sum(r.good for r in kept)} good), {gone} "
            f"{'would be deleted (dry run: nothing changed)' if args.dry_run else 'deleted'}"
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from opsdrill.backups.drill import drill

    inv = inventory_for(args)
    if args.drill:
        report = drill(inv, args.database, backup_id=args.backup, live_required=False)
        metrics.add_bytes(int(report.manifest.object["size"]))
        print(drill_summary(report))
        return 0 if report.ok else 1
    return restore_interactive(inv, args)


def drill_summary(report: DrillReport) -> str:
    lines = [
        f"drill {report.database}: backup {report.backup_id}"
        + (
            f" (NOT the newest: {len(report.passed_over)} newer passed over, see notes)"
            if report.passed_over
            else ""
        )
        + " restored into sandbox "
        f"{report.sandbox} in {report.restore_seconds:.1f}s, verified in "
        f"{report.verify_seconds:.1f}s, total {report.total_seconds:.1f}s "
        f"(RTO {report.rto_seconds:.0f}s: {'met' if report.within_rto else 'MISSED'})",
        f"manifest match: {'exact' if report.comparison.exact else 'MISMATCH'} "
        f"({len(report.manifest.tables)} tables, {len(report.manifest.sequences)} sequences)",
    ]
    lines += [f"  mismatch: {m}" for m in report.comparison.mismatches]
    lines += [f"  note: {n}" for n in report.notes]
    if report.drift is not None:
        lines += [f"  drift: {s}" for s in report.drift.suspicious]
    return "\n".join(lines)


def restore_interactive(inv: Inventory, args: argparse.Namespace) -> int:
    """A production restore: into a NEW database, the old one kept for swapping back."""
    from opsdrill.backups import restore
    from opsdrill.backups.scratch import create_database, drop_database
    from opsdrill.pg import Endpoint
    from opsdrill.progress import Progress

    db = inv.database(args.database)
    ref, manifest = restore.pick_backup(inv, args.database, args.backup)
    password_env = args.into_password_env or db.password_env
    password = inv.secret(password_env) if password_env else None
    # --into names a server; its dbname is only the maintenance database we connect to.
    server = Endpoint.from_dsn("restore target", args.into, password)
    live_dbname = Endpoint.from_dsn("live", db.dsn, None).dbname
    new_name = args.new_name or f"{live_dbname}_restored_{datetime.now(UTC):%Y%m%d%H%M%S}"
    where = server.where.rsplit("/", 1)[0]
    existing = _databases_named(server, {new_name, live_dbname})
    if new_name in existing:  # refused before asking: a "yes" could not change the answer
        raise RefusedError(
            f"database {new_name!r} already exists on {where}; a restore never writes into an "
            "existing database; nothing was changed (fix: choose another --new-name)"
        )
    # pg_restore of the backup's major, chosen before asking or creating anything (exit 2)
    tools = restore.restore_tools(inv, args.database, manifest)
    print(
        f"Backup:   {ref.id} (taken {manifest.taken_at}, {manifest.object['size']} bytes, "
        f"{sum(t['rows'] for t in manifest.tables.values())} rows)"
    )
    print(f"Target:   new database {new_name!r} on {where}")
    print("Existing databases are not touched; swap names yourself once verified.")
    if args.confirm is not None:
        if args.confirm != args.database:
            raise RefusedError(
                f"--confirm {args.confirm!r} does not match --database {args.database!r}; "
                f"not confirmed, nothing was changed (fix: --confirm {args.database})"
            )
    elif not sys.stdin.isatty():
        raise ConfigError(
            "refusing a production restore without a terminal "
            f"(fix: run interactively, or pass --confirm {args.database})"
        )
    else:
        typed = input(f"Type the database name ({args.database}) to proceed: ").strip()
        if typed != args.database:
            # Not a failure of the backup or the target: the operator did not confirm.
            raise RefusedError(
                f"Not confirmed: the name typed was not {args.database!r}; nothing was "
                f"changed (fix: run it again and type {args.database})"
            )
    create_database(server, new_name)
    target = server.with_dbname(new_name)
    try:
        # the progress line is ended when the restore stops, failed or not, so the
        # messages below start lines of their own
        with Progress(f"restore {ref.id}") as progress:
            result = restore.restore_into(
                inv,
                args.database,
                ref,
                manifest,
                target,
                jobs=db.restore_jobs,
                keep_owners=not args.no_owner,
                progress=progress,
                tools=tools,
            )
        comparison = restore.verify_restored(target, manifest)
    except BaseException:
        # The database is ours (created above) and half-restored: remove it so a retry
        # starts clean, and say so.
        try:
            drop_database(server, new_name)
        except OpsdrillError as exc:
            print(
                f"Restore failed, and dropping the partial database {new_name!r} failed too "
                f"({exc.message}): drop it by hand before retrying.",
                file=sys.stderr,
            )
        else:
            print(
                f"Restore failed; the partial database {new_name!r} was dropped.", file=sys.stderr
            )
        raise
    print(f"Restored {ref.id} into {new_name} in {result.seconds:.1f}s.")
    if not comparison.exact:
        print("VERIFICATION FAILED: the restored database differs from the manifest:")
        for line in comparison.mismatches:
            print(f"  {line}")
        print(f"The database {new_name!r} is kept for inspection; do not switch to it.")
        return 1
    print(
        f"Verified: row counts of all {len(manifest.tables)} tables and "
        f"{len(manifest.sequences)} sequences match the manifest exactly."
    )
    print(_next_step(where, new_name, live_dbname, live_dbname in existing))
    return 0


def _databases_named(server: Endpoint, names: set[str]) -> set[str]:
    """Which of ``names`` exist on ``server``."""
    with server.connect(autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)", [sorted(names)]
        ).fetchall()
    return {str(row[0]) for row in rows}


def _next_step(where: str, new_name: str, live_dbname: str, live_here: bool) -> str:
    """What to do with the verified database: only the steps that apply on that server."""
    if new_name == live_dbname:
        return f"Point the application at {where}/{new_name}."
    if live_here:
        return (
            "Once the application checks out against it, swap names, e.g.:\n"
            f"  ALTER DATABASE {live_dbname} RENAME TO {live_dbname}_old;\n"
            f"  ALTER DATABASE {new_name} RENAME TO {live_dbname};"
        )
    return (
        f"There is no database {live_dbname!r} on {where}: point the application at "
        f"{where}/{new_name}, or give it the live name first:\n"
        f"  ALTER DATABASE {new_name} RENAME TO {live_dbname};"
    )
