"""``opsdrill prune``: delete exactly what the retention policy says, nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

from opsdrill import catalog
from opsdrill.catalog import BackupRef
from opsdrill.errors import OperationFailed
from opsdrill.inventory import Inventory
from opsdrill.retention import Decision, RetentionPolicy, plan
from opsdrill.s3 import client


def policy_for(inv: Inventory) -> RetentionPolicy:
    r = inv.model.retention
    return RetentionPolicy(hourly_days=r.hourly_days, daily_days=r.daily_days)


def prune(
    inv: Inventory, name: str, *, dry_run: bool, now: datetime | None = None
) -> list[Decision[BackupRef]]:
    _, store = inv.store_for(name)
    s3 = client(inv, store)
    refs = catalog.list_backups(s3, store, name)
    decisions = plan(refs, now or datetime.now(UTC), policy_for(inv))
    if dry_run:
        return decisions
    failed = []
    for decision in decisions:
        if decision.keep:
            continue
        ref = decision.backup
        # Manifest first: an object without its manifest no longer counts as a backup,
        # so an interrupted prune never leaves a half-deleted backup that looks good.
        for key in (ref.manifest_key, ref.data_key):
            if key is None:
                continue
            try:
                s3.remove_object(store.bucket, key)
            except Exception as exc:
                failed.append(f"{key}: {type(exc).__name__}")
    if failed:
        raise OperationFailed("prune", f"{len(failed)} deletions failed: {'; '.join(failed[:5])}")
    return decisions
