"""Handlers: inventory validation."""

from __future__ import annotations

import argparse
import sys

from opsdrill.config.inventory import Inventory, load


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
                home.check_decrypts(inv, list(ids))
    if args.scope == "backup" and not args.offline:
        _preflight(inv)
    _warn_insecure_tls(inv)
    print(
        f"{inv.path}: OK for {args.scope}: inventory {m.name!r} ({m.environment}): "
        f"{len(m.databases)} database(s), {len(m.stores)} store(s)"
    )
    return 0


def _warn_insecure_tls(inv: Inventory) -> None:
    """``verify = false`` towards another host is legal but never silent: the checks pass
    while anyone on the path could pose as the server and read the password."""
    from opsdrill.config.probes import insecure_tls

    for key, host, loopback in insecure_tls(inv.model.probes, inv.model.queues):
        if loopback:
            continue
        print(
            f"warning: {key} = false for {host}: TLS without certificate checks, so anyone "
            f"on the path can pose as {host} and read the password, and every check of it "
            f"passes all the same (fix: set {key.rpartition('.')[0]}.ca_file to the CA that "
            "issued its certificate and remove verify = false)",
            file=sys.stderr,
        )


def _preflight(inv: Inventory) -> None:
    """Each database's backup role can read what pg_dump reads; every problem at once."""
    from opsdrill.backups.preflight import check_privileges
    from opsdrill.errors import PrivilegesMissing
    from opsdrill.pg import database_endpoint

    problems = []
    for name in inv.model.databases:
        endpoint = database_endpoint(inv, name)
        with endpoint.connect(autocommit=True) as conn:
            found = check_privileges(conn)
        examined = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in found.examined.items())
        if found.ok:
            print(f"databases.{name}: role {found.role} can read all pg_dump reads ({examined})")
        else:
            problems.append(
                f"databases.{name} ({endpoint.where}): role {found.role}: {found.summary()}"
            )
    if problems:
        raise PrivilegesMissing("backup pre-flight: " + "\n".join(problems))
