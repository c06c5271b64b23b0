"""Handlers: the files mirror and the secrets bundle."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from opsdrill import metrics
from opsdrill.cli.common import inventory_for
from opsdrill.errors import ConfigError

if TYPE_CHECKING:
    from opsdrill.files.copying import MirrorSummary


def cmd_mirror(args: argparse.Namespace) -> int:
    from opsdrill.files.mirror import run_mirror

    inv = inventory_for(args, scope="store")
    names = [args.mirror] if args.mirror else list(inv.model.mirrors)
    if not names:
        raise ConfigError(f"{inv.path}: no [mirrors.*] defined")
    codes = []
    for name in names:
        inv.mirror(name)
        summary = run_mirror(inv, name, workers=args.workers)
        metrics.add_bytes(summary.bytes_copied)
        codes.append(report(summary))
    return worst(codes)


def cmd_mirror_restore(args: argparse.Namespace) -> int:
    from opsdrill.files.restore import restore_mirror

    inv = inventory_for(args, scope="store")
    inv.mirror(args.mirror)
    inv.store(args.to_store)
    as_of = datetime.fromisoformat(args.as_of) if args.as_of else None
    if as_of is not None and as_of.tzinfo is None:
        raise ConfigError("--as-of needs a timezone, e.g. 2026-11-27T14:00:00+00:00")
    summary = restore_mirror(inv, args.mirror, to_store=args.to_store, as_of=as_of)
    return report(summary)


def report(summary: MirrorSummary) -> int:
    """Print a mirror or restore summary and its errors; return its exit code."""
    print(summary.line())
    for error in summary.errors[:50]:
        print(f"  error: {error}", file=sys.stderr)
    if len(summary.errors) > 50:
        print(f"  ... {len(summary.errors) - 50} more errors", file=sys.stderr)
    if summary.unreachable:
        print(f"opsdrill: error: {summary.unreachable}", file=sys.stderr)
    return summary.exit_code


def worst(codes: list[int]) -> int:
    """Several runs in one command: a failure (1) outranks "could not do the job" (2), as
    in a check run; 0 only when every one succeeded."""
    return 1 if 1 in codes else max(codes, default=0)


def cmd_secrets(args: argparse.Namespace) -> int:
    from opsdrill.secrets import bundle

    if args.secrets_command == "backup":
        inv = inventory_for(args, scope="backup")
        names = [args.bundle] if args.bundle else list(inv.model.secrets)
        if not names:
            raise ConfigError(f"{inv.path}: no [secrets.*] defined")
        for name in names:
            inv.bundle(name)
            manifest = bundle.backup_bundle(inv, name)
            metrics.add_bytes(int(manifest.object.get("size", 0)))
            keys = ", ".join(
                f"{k} {bundle.short(v)}"
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
    inv = inventory_for(args, scope="all" if args.secrets_command == "restore" else "store")
    inv.bundle(args.bundle)
    refs = [r for r in bundle.list_bundles(inv, args.bundle) if r.complete]
    if args.secrets_command == "list":
        for ref in refs:
            print(f"{ref.id}  {ref.taken_at:%Y-%m-%d %H:%M:%SZ}")
        return 0
    chosen = [r for r in refs if r.id == args.id] if args.id else refs[-1:]
    if not chosen:
        raise ConfigError(f"no complete secrets bundle {args.id or ''} for {args.bundle}")
    raw = bundle.decrypt_bundle_raw(inv, args.bundle, chosen[0])
    target = Path(args.to)
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists; refusing to overwrite it (fix: --force)")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    os.chmod(target, 0o600)
    restored_keys = len(bundle.parse_env_bytes(raw, str(target)))
    print(f"restored {restored_keys} keys from {chosen[0].id} into {target} (mode 0600)")
    return 0
