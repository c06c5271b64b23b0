"""``opsdrill prune``: delete exactly what the retention policy says, nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

from opsdrill import catalog
from opsdrill.catalog import BackupRef
from opsdrill.inventory import Inventory
from opsdrill.retention import Decision, RetentionPolicy, plan
from opsdrill.s3 import S3_ERRORS, client, store_call, unreachable


def policy_for(inv: Inventory) -> RetentionPolicy:
    r = inv.model.retention
    return RetentionPolicy(hourly_days=r.hourly_days, daily_days=r.daily_days)


def prune(
    inv: Inventory, name: str, *, dry_run: bool, now: datetime | None = None
) -> list[Decision[BackupRef]]:
    """Plan (and unless ``dry_run`` apply) the retention policy for one database.

    A store that cannot be listed, or that stops answering or refuses a deletion, is the
    store's ``unreachable`` error (exit 2): the prune stops there, and what is left is
    deleted by the next run. Nothing is deleted before the listing succeeded.
    """
    store_name, store = inv.store_for(name)
    s3 = client(inv, store)
    refs = store_call(store_name, store, catalog.list_backups, s3, store, name)
    decisions = plan(refs, now or datetime.now(UTC), policy_for(inv))
    if dry_run:
        return decisions
    deleted = 0
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
            except S3_ERRORS as exc:
                err = unreachable(store_name, store, exc)
                raise type(err)(
                    f"prune stopped at {key} after {deleted} deletions: {err.message} "
                    "(the rest is deleted by the next run)"
                ) from None
            deleted += 1
    return decisions
