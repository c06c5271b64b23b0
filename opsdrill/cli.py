"""Command line: the operations an operator runs from cron or during an outage.

Exit codes: 0 success; 1 an operation or verification failed; 2 the configuration is
wrong, a target could not be reached, or a safety guard refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import urllib3
from minio.error import S3Error

from opsdrill import __version__
from opsdrill.errors import ConfigError, OpsdrillError
from opsdrill.inventory import Inventory, load
from opsdrill.secrets import redact

DEFAULT_STACK_DIR = ".opsdrill-stack"
EPILOG = """\
Exit codes:
  0  success
  1  an operation or a verification failed (the failing stage is named)
  2  configuration wrong, a target unreachable, or a safety guard refused

Runbook: docs/runbooks/backup-and-restore.md"""


def _inventory(args: argparse.Namespace, scope: str = "all") -> Inventory:
    return load(args.inventory, scope=scope)


def _databases(inv: Inventory, only: str | None) -> list[str]:
    if only:
        inv.database(only)
        return [only]
    names = list(inv.model.databases)
    if not names:
        raise ConfigError(f"{inv.path}: no [databases.*] defined")
    return names


def cmd_inventory_check(args: argparse.Namespace) -> int:
    from opsdrill.gpg import GpgHome

    inv = load(args.file, scope=args.scope)
    m = inv.model
    if m.gpg is not None:
        # Deeper than loading: the recipients must be in the key file, and the drill key
        # must decrypt what they encrypt, or the first backup/drill fails at 3 a.m.
        with GpgHome() as home:
            home.import_keys(inv.resolve_path(m.gpg.public_keys_file), what="gpg.public_keys_file")
            ids = home.encryption_key_ids(m.gpg.recipients)
            if args.scope == "all" and m.gpg.drill_private_key_file:
                passphrase = (
                    inv.secret(m.gpg.drill_passphrase_env) if m.gpg.drill_passphrase_env else ""
                )
                home.check_decrypts(
                    inv.resolve_path(m.gpg.drill_private_key_file), passphrase, list(ids)
                )
    print(
        f"{inv.path}: OK for {args.scope}: inventory {m.name!r} ({m.environment}): "
        f"{len(m.databases)} database(s), {len(m.stores)} store(s)"
    )
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from opsdrill.stack import LocalStack

    stack = LocalStack(Path(args.dir).resolve(), size_mb=getattr(args, "size_mb", 8))
    if args.stack_command == "up":
        path = stack.up()
        print(f"local stack up: inventory {path}")
        if args.backup:
            from opsdrill.stack import prime

            for line in prime(path):
                print(line)
        return 0
    if args.stack_command == "down":
        stack.down()
        print(f"local stack in {stack.base} stopped and removed")
        return 0
    status = stack.status()
    if not status:
        print(f"no local stack in {stack.base}")
        return 1
    for name, state in status.items():
        print(f"{name}: {state}")
    return 0 if all(s == "running" for s in status.values()) else 1


def cmd_backup(args: argparse.Namespace) -> int:
    from opsdrill.backup import run_backup

    inv = _inventory(args, scope="backup")
    for name in _databases(inv, args.database):
        manifest = run_backup(inv, name)
        print(
            f"backup {manifest.id}: {manifest.object['size']} bytes, "
            f"sha256 {manifest.object['sha256'][:16]}..., "
            f"{sum(t['rows'] for t in manifest.tables.values())} rows in "
            f"{len(manifest.tables)} tables, {manifest.duration_seconds:.1f}s "
            f"-> {manifest.object['key']}"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from opsdrill import catalog
    from opsdrill.s3 import client

    inv = _inventory(args, scope="store")
    for name in _databases(inv, args.database):
        _, store = inv.store_for(name)
        for ref in catalog.list_backups(client(inv, store), store, name):
            state = "complete" if ref.complete else "INCOMPLETE (no manifest)"
            print(f"{ref.id}  {ref.taken_at:%Y-%m-%d %H:%M:%SZ}  {ref.size:>12}  {state}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from opsdrill.prune import prune

    inv = _inventory(args, scope="store")
    for name in _databases(inv, args.database):
        for decision in prune(inv, name, dry_run=args.dry_run):
            verb = "keep  " if decision.keep else ("would delete" if args.dry_run else "delete")
            print(f"{verb} {decision.backup.id}: {decision.reason}")
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    from opsdrill.mirror import run_mirror

    inv = _inventory(args, scope="store")
    names = [args.mirror] if args.mirror else list(inv.model.mirrors)
    if not names:
        raise ConfigError(f"{inv.path}: no [mirrors.*] defined")
    failed = False
    for name in names:
        inv.mirror(name)
        summary = run_mirror(inv, name, workers=args.workers)
        print(summary.line())
        for error in summary.errors[:50]:
            print(f"  error: {error}", file=sys.stderr)
        if len(summary.errors) > 50:
            print(f"  ... {len(summary.errors) - 50} more errors", file=sys.stderr)
        failed = failed or not summary.ok
    return 1 if failed else 0


def cmd_mirror_restore(args: argparse.Namespace) -> int:
    from opsdrill.mirror import restore_mirror

    inv = _inventory(args, scope="store")
    inv.mirror(args.mirror)
    inv.store(args.to_store)
    as_of = datetime.fromisoformat(args.as_of) if args.as_of else None
    if as_of is not None and as_of.tzinfo is None:
        raise ConfigError("--as-of needs a timezone, e.g. 2026-11-27T14:00:00+00:00")
    summary = restore_mirror(inv, args.mirror, to_store=args.to_store, as_of=as_of)
    print(summary.line())
    for error in summary.errors[:50]:
        print(f"  error: {error}", file=sys.stderr)
    return 0 if summary.ok else 1


def cmd_secrets(args: argparse.Namespace) -> int:
    from opsdrill import envbundle

    if args.secrets_command == "backup":
        inv = _inventory(args, scope="backup")
        names = [args.bundle] if args.bundle else list(inv.model.secrets)
        if not names:
            raise ConfigError(f"{inv.path}: no [secrets.*] defined")
        for name in names:
            inv.bundle(name)
            manifest = envbundle.backup_bundle(inv, name)
            keys = ", ".join(
                f"{k} {envbundle.short(v)}"
                for k, v in sorted(manifest.keys.items())
                if k in inv.bundle(name).fingerprint_keys
            )
            print(
                f"secrets {manifest.id}: {len(manifest.keys)} keys encrypted to "
                f"{len(manifest.object['recipients'])} recipient(s)"
                + (f"; {keys}" if keys else "")
                + f" -> {manifest.object['key']}"
            )
        return 0
    inv = _inventory(args, scope="all" if args.secrets_command == "restore" else "store")
    inv.bundle(args.bundle)
    refs = [r for r in envbundle.list_bundles(inv, args.bundle) if r.complete]
    if args.secrets_command == "list":
        for ref in refs:
            print(f"{ref.id}  {ref.taken_at:%Y-%m-%d %H:%M:%SZ}")
        return 0
    chosen = [r for r in refs if r.id == args.id] if args.id else refs[-1:]
    if not chosen:
        raise ConfigError(f"no complete secrets bundle {args.id or ''} for {args.bundle}")
    raw = envbundle.decrypt_bundle_raw(inv, args.bundle, chosen[0])
    target = Path(args.to)
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists; refusing to overwrite it (fix: --force)")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    os.chmod(target, 0o600)
    restored_keys = len(envbundle.parse_env_bytes(raw, str(target)))
    print(f"restored {restored_keys} keys from {chosen[0].id} into {target} (mode 0600)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from opsdrill import restore

    inv = _inventory(args)
    if args.drill:
        report = restore.drill(inv, args.database, backup_id=args.backup, live_required=False)
        print(drill_summary(report))
        return 0 if report.ok else 1
    return restore_interactive(inv, args)


def drill_summary(report: object) -> str:
    from opsdrill.restore import DrillReport

    assert isinstance(report, DrillReport)
    lines = [
        f"drill {report.database}: backup {report.backup_id} restored into sandbox "
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
    from opsdrill import restore
    from opsdrill.pg import Endpoint

    db = inv.database(args.database)
    ref, manifest = restore.pick_backup(inv, args.database, args.backup)
    password_env = args.into_password_env or db.password_env
    password = inv.secret(password_env) if password_env else None
    # --into names a server; its dbname is only the maintenance database we connect to.
    server = Endpoint.from_dsn("restore target", args.into, password)
    live_dbname = Endpoint.from_dsn("live", db.dsn, None).dbname
    new_name = args.new_name or f"{live_dbname}_restored_{datetime.now(UTC):%Y%m%d%H%M%S}"
    print(
        f"Backup:   {ref.id} (taken {manifest.taken_at}, {manifest.object['size']} bytes, "
        f"{sum(t['rows'] for t in manifest.tables.values())} rows)"
    )
    print(f"Target:   new database {new_name!r} on {server.where.rsplit('/', 1)[0]}")
    print("Existing databases are not touched; swap names yourself once verified.")
    if args.confirm is not None:
        if args.confirm != args.database:
            raise ConfigError(
                f"--confirm {args.confirm!r} does not match --database {args.database!r}"
            )
    elif not sys.stdin.isatty():
        raise ConfigError(
            "refusing a production restore without a terminal "
            f"(fix: run interactively, or pass --confirm {args.database})"
        )
    else:
        typed = input(f"Type the database name ({args.database}) to proceed: ").strip()
        if typed != args.database:
            print("Not confirmed; nothing was changed.")
            return 1
    restore.create_database(server, new_name)
    target = server.with_dbname(new_name)
    try:
        result = restore.restore_into(
            inv,
            args.database,
            ref,
            manifest,
            target,
            jobs=db.restore_jobs,
            keep_owners=not args.no_owner,
        )
        comparison = restore.verify_restored(target, manifest)
    except OpsdrillError:
        # The database is ours (created above) and half-restored: remove it so a retry
        # starts clean, and say so.
        restore.drop_database(server, new_name)
        print(f"Restore failed; the partial database {new_name!r} was dropped.", file=sys.stderr)
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
    if new_name == live_dbname:
        print(f"Point the application at {server.where.rsplit('/', 1)[0]}/{new_name}.")
    else:
        print(
            "Once the application checks out against it, swap names, e.g.:\n"
            f"  ALTER DATABASE {live_dbname} RENAME TO {live_dbname}_old;\n"
            f"  ALTER DATABASE {new_name} RENAME TO {live_dbname};"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opsdrill",
        description="Back up PostgreSQL, the files bucket and the application's secrets "
        "off-site; prune, restore, and prove it works.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"opsdrill {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    inv = sub.add_parser("inventory", help="inspect an inventory file")
    inv_sub = inv.add_subparsers(dest="inventory_command", required=True)
    chk = inv_sub.add_parser("check", help="validate an inventory without touching any target")
    chk.add_argument("file")
    chk.add_argument(
        "--for",
        dest="scope",
        choices=["all", "backup", "store"],
        default="all",
        help="which secrets and key files must be present: all (restore, checks), backup "
        "(a backup host: no drill key needed), store (list, prune)",
    )
    chk.set_defaults(func=cmd_inventory_check)

    st = sub.add_parser("stack", help="the local stack: real servers on 127.0.0.1")
    st_sub = st.add_subparsers(dest="stack_command", required=True)
    up = st_sub.add_parser("up", help="start servers, write DIR/inventory.toml, return")
    up.add_argument("--dir", default=DEFAULT_STACK_DIR)
    up.add_argument("--size-mb", type=int, default=8, help="demo CRM database size")
    up.add_argument(
        "--backup",
        action="store_true",
        help="run every operation once: backup, mirror, secrets bundle",
    )
    down = st_sub.add_parser("down", help="stop the servers by PID and remove DIR")
    down.add_argument("--dir", default=DEFAULT_STACK_DIR)
    status = st_sub.add_parser("status", help="show which servers run")
    status.add_argument("--dir", default=DEFAULT_STACK_DIR)
    st.set_defaults(func=cmd_stack)

    def with_inventory(sp: argparse.ArgumentParser, db_required: bool = False) -> None:
        sp.add_argument("--inventory", "-i", required=True, help="inventory TOML file")
        sp.add_argument(
            "--database",
            "-d",
            required=db_required,
            help="database name in the inventory"
            + ("" if db_required else " (default: all of them)"),
        )

    b = sub.add_parser("backup", help="pg_dump | compress | gpg -> S3, with a manifest")
    with_inventory(b)
    b.set_defaults(func=cmd_backup)

    ls = sub.add_parser("list", help="list backups in the off-site store")
    with_inventory(ls)
    ls.set_defaults(func=cmd_list)

    pr = sub.add_parser("prune", help="apply the retention policy (hourly + daily tiers)")
    with_inventory(pr)
    pr.add_argument("--dry-run", action="store_true", help="print keep/delete with reasons")
    pr.set_defaults(func=cmd_prune)

    mi = sub.add_parser("mirror", help="copy new/changed files from the live bucket off-site")
    mi.add_argument("--inventory", "-i", required=True, help="inventory TOML file")
    mi.add_argument("--mirror", "-m", help="mirror name in the inventory (default: all)")
    mi.add_argument("--workers", type=int, help="parallel copies (default: the inventory's)")
    mi.set_defaults(func=cmd_mirror)

    mr = sub.add_parser(
        "mirror-restore",
        help="copy the off-site files into a fresh bucket, as of now or a point in time",
    )
    mr.add_argument("--inventory", "-i", required=True, help="inventory TOML file")
    mr.add_argument("--mirror", "-m", required=True, help="mirror name in the inventory")
    mr.add_argument(
        "--to-store",
        required=True,
        help="inventory store to copy into (its bucket/prefix must be empty)",
    )
    mr.add_argument(
        "--as-of",
        metavar="ISO8601",
        help="restore the versions current at this time (default: now)",
    )
    mr.set_defaults(func=cmd_mirror_restore)

    se = sub.add_parser("secrets", help="the application's .env (ENCRYPTION_KEY) off-site")
    se_sub = se.add_subparsers(dest="secrets_command", required=True)
    sb = se_sub.add_parser(
        "backup", help="encrypt the env and upload it with a fingerprint manifest"
    )
    sb.add_argument("--inventory", "-i", required=True)
    sb.add_argument("--bundle", "-b", help="bundle name in the inventory (default: all)")
    sl = se_sub.add_parser("list", help="list stored bundles")
    sl.add_argument("--inventory", "-i", required=True)
    sl.add_argument("--bundle", "-b", required=True)
    sr = se_sub.add_parser("restore", help="decrypt a bundle into an env file (mode 0600)")
    sr.add_argument("--inventory", "-i", required=True)
    sr.add_argument("--bundle", "-b", required=True)
    sr.add_argument("--to", required=True, metavar="PATH", help="env file to write")
    sr.add_argument("--id", help="bundle id (default: newest)")
    sr.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    se.set_defaults(func=cmd_secrets)

    rs = sub.add_parser("restore", help="restore a backup: --drill into the sandbox, or --into")
    with_inventory(rs, db_required=True)
    mode = rs.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--drill",
        action="store_true",
        help="restore into the sandbox, verify against the manifest, drop it",
    )
    mode.add_argument(
        "--into",
        metavar="DSN",
        help="server to restore onto, e.g. postgresql://admin@db:5432/postgres; a NEW "
        "database is created there and existing ones are left untouched",
    )
    rs.add_argument("--backup", metavar="ID", help="backup id (default: newest complete)")
    rs.add_argument(
        "--into-password-env",
        metavar="VAR",
        help="env var with the target's password (default: the database's)",
    )
    rs.add_argument("--new-name", help="name of the database to create (default: DB_restored_TS)")
    rs.add_argument(
        "--confirm", metavar="DB", help="non-interactive confirmation: must equal --database"
    )
    rs.add_argument(
        "--no-owner",
        action="store_true",
        help="do not restore ownership (roles missing on the target)",
    )
    rs.set_defaults(func=cmd_restore)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except OpsdrillError as exc:
        print(f"opsdrill: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (S3Error, urllib3.exceptions.HTTPError) as exc:
        detail = f"{exc.code}: {exc.message}" if isinstance(exc, S3Error) else type(exc).__name__
        print(
            f"opsdrill: error: S3 store unreachable or refused: {redact(detail)}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("opsdrill: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last line of defence: never print a secret in a traceback
        print(f"opsdrill: unexpected {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        if os.environ.get("OPSDRILL_DEBUG"):
            raise
        return 1


def _json(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())
