"""Helpers shared by the command handlers."""

from __future__ import annotations

import argparse

from opsdrill.config.inventory import Inventory, load
from opsdrill.errors import ConfigError


def inventory_for(args: argparse.Namespace, scope: str = "all") -> Inventory:
    return load(args.inventory, scope=scope)


def databases_in(inv: Inventory, only: str | None) -> list[str]:
    if only:
        inv.database(only)
        return [only]
    names = list(inv.model.databases)
    if not names:
        raise ConfigError(f"{inv.path}: no [databases.*] defined")
    return names
