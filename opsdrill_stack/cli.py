"""``opsdrill stack up|down|status``: the local stack from the opsdrill command line.

Registered as an ``opsdrill.commands`` entry point (``opsdrill_stack/pyproject.toml``), so
``opsdrill`` offers it wherever the stack is installed (``make setup`` in a checkout)
while the library never imports the stack. The stack itself is imported only when the
command runs: ``opsdrill --help`` stays as quick as before.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_STACK_DIR = ".opsdrill-stack"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    # Its servers run as other users (postgres): not in a private run directory or umask.
    st.set_defaults(func=cmd_stack, run_private=False)


def cmd_stack(args: argparse.Namespace) -> int:
    from opsdrill_stack.local import LocalStack, prime

    stack = LocalStack(Path(args.dir).resolve(), size_mb=getattr(args, "size_mb", 8))
    if args.stack_command == "up":
        path = stack.up()
        print(f"local stack up: inventory {path}")
        if args.backup:
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
