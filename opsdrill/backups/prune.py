"""``opsdrill prune``: delete exactly what the retention policy says, nothing else.

Before anything is deleted prune establishes three facts, each of which it refuses to guess:
what is stored (the listing), which of it is *good* (every manifest read back and matched to
its object: a bad manifest must not take a good backup's slot), and what time it is (the
host clock, checked against the store's ``Date`` header: a host clock a week ahead would
otherwise age every backup out of the policy at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from minio import Minio
from minio.error import S3Error

from opsdrill.backups import catalog
from opsdrill.backups.catalog import BackupRef
from opsdrill.backups.retention import Decision, RetentionPolicy, plan
from opsdrill.config.inventory import Inventory, Store
from opsdrill.errors import RefusedError
from opsdrill.s3 import S3_ERRORS, client, store_call, unreachable

# How far the host clock and the store's may disagree before prune refuses. NTP keeps
# clocks within milliseconds, so minutes mean a broken clock; retention works in hour and
# day slots, and 5 minutes is also the skew retention already tolerates for backups dated
# slightly ahead (opsdrill.backups.retention). HTTP's Date header has 1 s resolution: far below.
CLOCK_TOLERANCE = timedelta(minutes=5)


def policy_for(inv: Inventory) -> RetentionPolicy:
    r = inv.model.retention
    return RetentionPolicy(hourly_days=r.hourly_days, daily_days=r.daily_days, min_keep=r.min_keep)


@dataclass(frozen=True)
class Clocks:
    """The host's time and the store's, read together (the store's from one response)."""

    host: datetime
    store: datetime

    @property
    def skew(self) -> timedelta:
        return abs(self.host - self.store)

    def as_evidence(self) -> dict[str, str]:
        return {
            "host": _stamp(self.host),
            "store": _stamp(self.store),
            "skew_seconds": f"{self.skew.total_seconds():.0f}",
            "tolerance_seconds": f"{CLOCK_TOLERANCE.total_seconds():.0f}",
        }


def _stamp(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def _date_header(headers: Any) -> datetime | None:
    """The ``Date`` of an HTTP response as an aware UTC datetime, or None if absent/garbled."""
    value = headers.get("Date") if headers is not None else None
    if not value:
        return None
    try:
        return parsedate_to_datetime(str(value)).astimezone(UTC)
    except (TypeError, ValueError):
        return None


def store_clock(
    s3: Minio, store_name: str, store: Store, key: str, now: datetime | None = None
) -> Clocks:
    """The store's time from the ``Date`` of a HEAD on ``key`` (a stored object, so the
    request is cheap and certain to succeed), and the host's (``now``, or the clock right
    after the answer). A store that sends no usable Date is refused: time cannot be judged."""
    stat = store_call(store_name, store, s3.stat_object, store.bucket, key)
    host = now or datetime.now(UTC)
    server = _date_header(stat.metadata)
    if server is None:
        raise RefusedError(
            f"store {store_name} ({store.endpoint}) sent no usable Date header, so this "
            "host's clock cannot be checked against it; refusing to judge backup ages by an "
            "unchecked clock"
        )
    return Clocks(host, server)


class ClockSkew(RefusedError):
    """The host's clock and the store's disagree: ages cannot be judged (exit 2, broken)."""

    def __init__(self, message: str, clocks: Clocks) -> None:
        super().__init__(message)
        self.clocks = clocks


def refuse_skew(
    clocks: Clocks,
    store_name: str,
    store: Store,
    what: str = "prune",
    outcome: str = "nothing was deleted",
) -> None:
    """ClockSkew naming both times when the clocks disagree by more than the tolerance."""
    if clocks.skew <= CLOCK_TOLERANCE:
        return
    mins, secs = divmod(int(clocks.skew.total_seconds()), 60)
    apart = f"{mins // 60} h {mins % 60} min" if mins >= 60 else f"{mins} min {secs} s"
    ahead = "ahead of" if clocks.host > clocks.store else "behind"
    raise ClockSkew(
        f"refusing to {what}: this host's clock says {_stamp(clocks.host)} but store "
        f"{store_name} ({store.endpoint}) says {_stamp(clocks.store)}: the host is "
        f"{apart} {ahead} the store (tolerance "
        f"{CLOCK_TOLERANCE.total_seconds() / 60:g} min). Backup ages are judged by the "
        f"clock, and a wrong one misjudges them all; {outcome} (fix: synchronise this "
        "host's clock, e.g. `timedatectl set-ntp true`, or the store's)",
        clocks,
    )


def _list(s3: Minio, store_name: str, store: Store, name: str) -> list[BackupRef]:
    """The listing; a store that rejects our requests as too far from its own time (S3's
    RequestTimeTooSkewed, past ~15 min) is the clock refusal, not "unreachable"."""
    try:
        return catalog.list_backups(s3, store, name)
    except S3Error as exc:
        if exc.code == "RequestTimeTooSkewed":
            server = _date_header(getattr(exc.response, "headers", None))
            if server is not None:
                refuse_skew(Clocks(datetime.now(UTC), server), store_name, store)
        raise unreachable(store_name, store, exc) from None
    except S3_ERRORS as exc:
        raise unreachable(store_name, store, exc) from None


def examine(
    s3: Minio,
    store_name: str,
    store: Store,
    name: str,
    now: datetime | None = None,
    what: str = "prune",
    outcome: str = "nothing was deleted",
) -> tuple[list[BackupRef], Clocks | None]:
    """What is stored for ``name``, each complete backup's manifest checked (``problem`` set
    on bad ones), and the clocks (None when nothing is stored: there is no age to judge).

    Reads only. Clocks further apart than CLOCK_TOLERANCE raise ``ClockSkew`` (saying
    ``what`` was refused, and its ``outcome``) before any manifest is read; store errors are
    the store's ``unreachable`` ones.
    """
    refs = _list(s3, store_name, store, name)
    if not refs:
        return refs, None
    newest = refs[-1]
    key = newest.manifest_key or newest.data_key
    assert key is not None
    clocks = store_clock(s3, store_name, store, key, now)
    refuse_skew(clocks, store_name, store, what, outcome)
    store_call(store_name, store, catalog.verify_manifests, s3, store, refs)
    return refs, clocks


def prune(
    inv: Inventory, name: str, *, dry_run: bool, now: datetime | None = None
) -> list[Decision[BackupRef]]:
    """Plan (and unless ``dry_run`` apply) the retention policy for one database.

    ``now`` is the host clock (tests travel in time with it); it is checked against the
    store's clock like the real one, and a disagreement is a ``RefusedError`` (exit 2),
    dry run or not, before anything is decided.

    A store that cannot be listed, or that stops answering or refuses a deletion, is the
    store's ``unreachable`` error (exit 2): the prune stops there, and what is left is
    deleted by the next run. Nothing is deleted before the listing, the clock check and
    every manifest read succeeded.
    """
    store_name, store = inv.store_for(name)
    s3 = client(inv, store)
    refs, clocks = examine(s3, store_name, store, name, now, "plan a prune" if dry_run else "prune")
    if clocks is None:
        return []
    decisions = plan(refs, clocks.host, policy_for(inv))
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
