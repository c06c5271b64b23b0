"""Command line: the operations an operator runs from cron or during an outage.

Exit codes: the same for every subcommand, one rule, in EXIT_CODES below (the text
--help shows, and the README, the runbook and the cron wrappers repeat word for word).

The library raises the error types of opsdrill.errors and main() turns them into these
codes: OperationFailed 1; ConfigError, TargetUnreachable (CredentialsRejected),
RefusedError 2; any other exception 2, printed redacted.

Other installed packages add subcommands through the ``opsdrill.commands`` entry point
group (the repository's local stack adds ``opsdrill stack``): the CLI finds them without
importing them by name, so the library never depends on what plugs into it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import urllib3
from minio.error import MinioException, S3Error

from opsdrill import __version__, metrics, workspace
from opsdrill.cli.files import cmd_mirror, cmd_mirror_restore, cmd_secrets
from opsdrill.cli.pg import cmd_backup, cmd_list, cmd_prune, cmd_restore
from opsdrill.cli.setup import cmd_inventory_check
from opsdrill.errors import LockHeld, OpsdrillError
from opsdrill.memory import return_large_buffers_to_os
from opsdrill.redact import redact

# Subcommands from other packages: each entry point of this group is a function taking the
# subparsers, adding its parser and setting its ``func`` (and ``run_private=False`` if it
# must run outside the private run directory and umask, as the stack's servers must).
COMMANDS_GROUP = "opsdrill.commands"
# What a subcommand documented in the repository is, when its package is not installed.
NOT_INSTALLED = {
    "stack": "the local stack is the opsdrill repository's development tool (package "
    "opsdrill_stack), not part of an opsdrill installation (fix: run it from a checkout "
    "after make setup, which installs it)",
}
# The one statement of the rule: README.md ("Exit codes"), the runbook's "Exit codes" and
# scripts/backup/run-locked.sh say the same in the same words (tests/faults/test_exit_codes.py).
EXIT_CODES = """\
Exit codes (the same for every subcommand):
  0    success.
  1    the operation ran and failed because of the data or the target: a stage failed
       (pg_dump, the compressor, gpg, a full disk), a backup object or manifest is corrupt,
       truncated or unreadable, a restore or drill does not match its manifest, or a
       backup is encrypted to recipients the drill key is not one of.
  2    opsdrill could not do its job: the configuration (inventory, command line) is
       wrong, a target is unreachable or timed out (also mid-transfer), opsdrill's own
       credentials were rejected (database password, S3 key pair, drill key passphrase), a
       required tool is missing, a safety guard refused, the operator did not confirm, or
       an unexpected internal error.
  75   skipped: another run holds the lock (a backup's per-database lock on the live server,
       which holds across hosts, or a cron wrapper's local lock per command); nothing was
       done, and the message names the holder.
  130  interrupted (SIGINT, Ctrl-C); 143 for SIGTERM and 129 for SIGHUP (128 + the
       signal). The run first removes what it started (its temporary files, its
       gpg-agent, the drill's scratch database); what a run killed outright (SIGKILL)
       left, the next run of the same operation removes and reports.
The error message names what to fix (the inventory key, the environment variable). A
mirror that could not copy some files exits 1 if any file was at fault, otherwise 2."""
EPILOG = f"""\
{EXIT_CODES}

Runbook: docs/runbooks/backup-and-restore.md"""


def with_metrics(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="also write the outcome as Prometheus text (node_exporter textfile collector); "
        "merged with what PATH holds, replaced atomically",
    )


def _operation(args: argparse.Namespace) -> tuple[str, str]:
    """Metric labels: what ran, and on which inventory target (or all of them)."""
    name = args.command
    if name == "secrets":
        name = f"secrets_{args.secrets_command}"
    elif name == "restore":
        name = "drill" if args.drill else "restore"
    target = next(
        (v for v in (getattr(args, k, None) for k in ("database", "mirror", "bundle")) if v),
        "all",
    )
    return name, target


def _run(args: argparse.Namespace) -> int:
    path = getattr(args, "metrics_file", None)
    if path and getattr(args, "dry_run", False):
        # A dry run changes nothing, the metrics included: recording it would move "last
        # success" of an operation that did not happen and silence the alert on it.
        print(f"opsdrill: --dry-run: nothing is written to {path}", file=sys.stderr)
        path = None
    if not path:
        return int(args.func(args))
    code = 1
    with metrics.recording(*_operation(args)) as run:
        try:
            code = int(args.func(args))
        except LockHeld:
            code = LockHeld.exit_code
            raise
        finally:
            # Skipped because another run holds the lock: that run records the outcome;
            # recording a failure here would page someone for a run that is going fine.
            if code != LockHeld.exit_code:
                metrics.write_operation(Path(path), run, ok=code == 0)
    return code


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``plugins=False`` leaves out the subcommands of other
    packages (finding them reads every installed distribution's metadata)."""
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
    chk = inv_sub.add_parser(
        "check",
        help="validate an inventory; --for backup also proves the backup role can read "
        "every table, sequence and large object (catalog queries only)",
    )
    chk.add_argument("file")
    chk.add_argument(
        "--for",
        dest="scope",
        choices=["all", "backup", "store"],
        default="all",
        help="which secrets and key files must be present: all (restore, checks), backup "
        "(a backup host: no drill key needed; also connects to each database to prove the "
        "backup role's privileges), store (list, prune)",
    )
    chk.add_argument(
        "--offline",
        action="store_true",
        help="touch no target: skip the privilege pre-flight of --for backup",
    )
    chk.set_defaults(func=cmd_inventory_check)

    def withinventory_for(sp: argparse.ArgumentParser, db_required: bool = False) -> None:
        sp.add_argument("--inventory", "-i", required=True, help="inventory TOML file")
        sp.add_argument(
            "--database",
            "-d",
            required=db_required,
            help="database name in the inventory"
            + ("" if db_required else " (default: all of them)"),
        )

    b = sub.add_parser("backup", help="pg_dump | compress | gpg -> S3, with a manifest")
    withinventory_for(b)
    with_metrics(b)
    b.set_defaults(func=cmd_backup)

    ls = sub.add_parser("list", help="list backups in the off-site store")
    withinventory_for(ls)
    ls.set_defaults(func=cmd_list)

    pr = sub.add_parser(
        "prune",
        help="apply the retention policy (hourly + daily tiers, the min_keep newest good "
        "backups always kept); refuses when this host's clock and the store's disagree",
    )
    withinventory_for(pr)
    pr.add_argument(
        "--dry-run",
        action="store_true",
        help="print keep/delete with reasons; deletes nothing and writes no metrics",
    )
    with_metrics(pr)
    pr.set_defaults(func=cmd_prune)

    mi = sub.add_parser("mirror", help="copy new/changed files from the live bucket off-site")
    mi.add_argument("--inventory", "-i", required=True, help="inventory TOML file")
    mi.add_argument("--mirror", "-m", help="mirror name in the inventory (default: all)")
    mi.add_argument("--workers", type=int, help="parallel copies (default: the inventory's)")
    with_metrics(mi)
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
    with_metrics(sb)
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
    withinventory_for(rs, db_required=True)
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
    with_metrics(rs)
    rs.set_defaults(func=cmd_restore)
    if plugins:
        from importlib.metadata import entry_points

        for command in entry_points(group=COMMANDS_GROUP):
            command.load()(sub)
    _exit_codes_in_every_help(p)
    return p


def _exit_codes_in_every_help(parser: argparse.ArgumentParser) -> None:
    """``opsdrill SUBCOMMAND --help`` ends with the same exit codes as ``opsdrill --help``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.epilog = EPILOG
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
                _exit_codes_in_every_help(sub)


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. SIGTERM and SIGHUP clean up exactly as Ctrl-C does (every
    ``finally`` runs: the spool, the GnuPG home and its agent, the scratch database), then
    exit 128 + the signal: 130 SIGINT, 143 SIGTERM, 129 SIGHUP."""
    words = list(sys.argv[1:] if argv is None else argv)
    # a built-in command (what cron runs) does not pay for the plug-in search; help and
    # anything else get the whole command line
    parser = build_parser(plugins=False)
    if not words or words[0] not in _commands(parser):
        parser = build_parser()
    if words and words[0] in NOT_INSTALLED and words[0] not in _commands(parser):
        print(f"opsdrill: error: {words[0]}: {NOT_INSTALLED[words[0]]}", file=sys.stderr)
        return 2
    args = parser.parse_args(words)
    return_large_buffers_to_os()
    # Every file an operation creates is this user's alone (umask 077: the spool holds a
    # plaintext dump, a GnuPG home the drill key), in one private directory for the run,
    # which the next run of the same operation removes if this one is killed. Not for a
    # command that says otherwise (`stack`, whose servers run as other users).
    private = getattr(args, "run_private", True)
    umask = os.umask(0o077) if private else None
    try:
        with (
            workspace.signals_interrupt(),
            workspace.run(_operation(args)[0]) if private else contextlib.nullcontext(),
        ):
            return _run(args)
    except OpsdrillError as exc:
        print(f"opsdrill: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (MinioException, urllib3.exceptions.HTTPError) as exc:
        # Safety net: the library turns store errors into s3.unreachable() ones naming the
        # store and its inventory keys; one that gets here is still not the data's fault.
        detail = f"{exc.code}: {exc.message}" if isinstance(exc, S3Error) else type(exc).__name__
        print(
            f"opsdrill: error: S3 store unreachable or refused: {redact(detail)} (fix: check "
            "the stores.* settings of the inventory; OPSDRILL_DEBUG=1 shows where)",
            file=sys.stderr,
        )
        if os.environ.get("OPSDRILL_DEBUG"):
            raise
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, workspace.Interrupted) else signal.SIGINT
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"opsdrill: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # last line of defence: never print a secret in a traceback
        # opsdrill's own fault, not the target's: exit 2 ("could not do its job"), not 1
        print(f"opsdrill: unexpected {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        if os.environ.get("OPSDRILL_DEBUG"):
            raise
        return 2
    finally:
        if umask is not None:
            os.umask(umask)


if __name__ == "__main__":
    sys.exit(main())
