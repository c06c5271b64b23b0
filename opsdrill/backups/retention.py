"""Retention: which off-site backups to keep, and what a stored set violates.

Prune (``plan``) and the verification suite (``audit``) must agree on one definition of what
the bucket should hold, or the drill either flags healthy buckets or misses lost backups; both
are therefore derived from the same slot rules. Pure logic: no I/O and no clock reads, so the
rules can be tested by time travel.

Rules (all times are timezone-aware; they are compared in UTC and naive ones raise ValueError):

* Hour slots are UTC hours (floored); day slots are UTC dates.
* A *good* backup is complete (data object and manifest both stored) and has no ``problem``
  (its manifest parses and names the stored object with its size; the caller reads it).
  Only good backups fill slots and count towards ``min_keep``.
* Hourly tier: the ``hourly_days * 24`` hour slots ending with the slot that contains ``now``.
  The newest good backup in each of them is kept.
* Daily tier: the ``daily_days`` UTC dates ending with today. The newest good backup of each
  is kept; when it is also an hourly keeper the hourly reason is the one reported.
* ``min_keep``: the ``min_keep`` newest good backups are kept whatever their age (restic's
  ``--keep-last``), so that backups that stopped for a month do not make prune empty the bucket.
* Every other good backup is deleted, with the reason: dated before the daily tier,
  superseded within its hour slot, or superseded within its day once outside the hourly tier.
* Incomplete backups (no manifest: a failed run's leftovers) never satisfy a slot. They are
  kept while younger than ``incomplete_grace`` (the run may still be uploading), then deleted.
* Bad backups (complete, with a ``problem``) never satisfy a slot either, so they cannot push
  out a good backup of their hour or day. They are kept for a human while their date is in the
  daily tier (the data object may still be restorable by hand), then deleted.
* Backups dated more than 5 minutes after ``now`` are kept (clock skew: a human should look)
  and ignored by the audit. Up to 5 minutes ahead they count normally (in the next slot too).

The audit is judged from the first complete backup on, so that a new system is not failing:

* ``missing_hour``: an hourly-tier slot at or after the first backup's slot, started at least
  ``backup_grace`` ago, holds no good backup.
* ``missing_day``: a date covered only by the daily tier (before the date of the hourly tier's
  first slot), on or after the first backup's date, holds no good backup.
* ``kept_past_policy``: a backup ``plan`` deletes has outlived its expiry by more than
  ``prune_grace`` (prune runs daily). A backup superseded in its hour expires when that slot
  ends; a keeper expires when the last tier that keeps it lets it go. Incomplete leftovers
  expire ``incomplete_grace`` after they were taken, bad backups when their date leaves the
  daily tier.
* ``no_backups``: no good backup is stored at all.
"""

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Generic, Protocol, TypeVar

_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
_CLOCK_SKEW = timedelta(minutes=5)


class Dated(Protocol):
    """What retention needs from a stored backup; storage details stay with the caller."""

    @property
    def taken_at(self) -> datetime: ...

    @property
    def complete(self) -> bool: ...

    @property
    def problem(self) -> str | None: ...


B = TypeVar("B", bound=Dated)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long backups are kept, plus the slack that keeps the audit from crying wolf."""

    hourly_days: int = 7
    daily_days: int = 30
    backup_grace: timedelta = timedelta(minutes=90)
    prune_grace: timedelta = timedelta(hours=26)
    incomplete_grace: timedelta = timedelta(hours=6)
    min_keep: int = 3

    def __post_init__(self) -> None:
        """Fail at load time: a bad policy would otherwise silently delete backups."""
        if self.hourly_days < 1:
            raise ValueError(f"hourly_days must be at least 1, got {self.hourly_days}")
        if self.min_keep < 1:
            raise ValueError(f"min_keep must be at least 1, got {self.min_keep}")
        if self.daily_days < self.hourly_days:
            raise ValueError(
                f"daily_days ({self.daily_days}) must be at least hourly_days "
                f"({self.hourly_days}): the daily tier has to outlast the hourly tier"
            )
        for name in ("backup_grace", "prune_grace", "incomplete_grace"):
            value: timedelta = getattr(self, name)
            if value < timedelta(0):
                raise ValueError(f"{name} must not be negative, got {value}")


@dataclass(frozen=True)
class Decision(Generic[B]):
    """Keep or delete one backup; the reason is shown to the operator, so it names the rule."""

    backup: B
    keep: bool
    reason: str


@dataclass(frozen=True)
class Finding:
    """One violation of the policy; ``slot`` is an hour slot, a date, or empty."""

    kind: str
    slot: str
    message: str


def _utc(moment: datetime, what: str) -> datetime:
    """Naive datetimes would be read as local time and shift every slot, so refuse them."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {moment.isoformat()}")
    return moment.astimezone(UTC)


def _slot(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _hour(slot: datetime) -> str:
    return f"{slot:%Y-%m-%dT%H:%MZ}"


def _stamp(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"


def _span(delta: timedelta) -> str:
    if delta % _HOUR:
        return f"{delta // timedelta(minutes=1)}min"
    return f"{delta // _HOUR}h"


class _Context:
    """Tier bounds and per-slot keepers for one ``now``, shared so plan and audit agree."""

    def __init__(self, backups: Sequence[Dated], now: datetime, policy: RetentionPolicy) -> None:
        self.policy = policy
        self.now = _utc(now, "now")
        self.times = [_utc(b.taken_at, "taken_at") for b in backups]
        self.complete = [b.complete for b in backups]
        self.problems = [b.problem if b.complete else None for b in backups]
        self.hourly_start = _slot(self.now) - (policy.hourly_days * 24 - 1) * _HOUR
        self.daily_start = self.now.date() - (policy.daily_days - 1) * _DAY
        # Slot -> index of its newest good backup. Indices, not objects: B need not hash.
        self.hour_keeper: dict[datetime, int] = {}
        self.day_keeper: dict[date, int] = {}
        present = sorted(self.present(), key=self.times.__getitem__)
        for i in present:
            self.hour_keeper[_slot(self.times[i])] = i
            self.day_keeper[self.times[i].date()] = i
        self.newest = set(present[-policy.min_keep :])
        self.present_times = [self.times[i] for i in present]

    def future(self, i: int) -> bool:
        return self.times[i] > self.now + _CLOCK_SKEW

    def good(self, i: int) -> bool:
        return self.complete[i] and self.problems[i] is None

    def present(self) -> list[int]:
        """Good backups the rules apply to (not dated in the future)."""
        return [i for i in range(len(self.times)) if self.good(i) and not self.future(i)]

    def decide(self, i: int) -> tuple[bool, str]:
        t, p = self.times[i], self.policy
        day = t.date()
        if self.future(i):
            return True, f"dated {_stamp(t)}, in the future (clock skew?): kept for a human"
        if not self.complete[i]:
            age = _span(p.incomplete_grace)
            if self.now - t > p.incomplete_grace:
                return False, f"incomplete (no manifest), older than {age}"
            return True, f"incomplete (no manifest), younger than {age}: may still be uploading"
        if not self.good(i):
            bad = f"not a good backup ({self.problems[i]}): fills no slot"
            if day >= self.daily_start:
                return True, f"{bad}; kept for a human while in the {p.daily_days}-day daily tier"
            return False, f"{bad}; older than {p.daily_days} days"
        keep, reason = self._by_tier(i)
        if not keep and i in self.newest:
            return True, (
                f"kept: one of the {p.min_keep} newest good backups (min_keep); "
                f"the tiers alone would delete it: {reason}"
            )
        return keep, reason

    def _by_tier(self, i: int) -> tuple[bool, str]:
        t, p = self.times[i], self.policy
        slot, day = _slot(t), t.date()
        in_hourly = slot >= self.hourly_start
        if in_hourly and self.hour_keeper[slot] == i:
            return True, f"newest in hour slot {_hour(slot)} (hourly tier, {p.hourly_days} days)"
        if day >= self.daily_start and self.day_keeper[day] == i:
            return True, f"newest of day {day} (daily tier, {p.daily_days} days)"
        if day < self.daily_start:
            return False, f"older than {p.daily_days} days (daily tier starts {self.daily_start})"
        if self.hour_keeper[slot] != i:
            where = "hourly tier" if in_hourly else "outside hourly tier"
            return False, f"superseded by a newer backup in hour slot {_hour(slot)} ({where})"
        return False, f"superseded by a newer backup of day {day} (outside hourly tier)"

    def expiry(self, i: int) -> tuple[datetime, str, str]:
        """When a deleted complete backup stopped being needed: (moment, slot, rule that let go)."""
        t, p = self.times[i], self.policy
        slot, day = _slot(t), t.date()
        daily_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + p.daily_days * _DAY
        if not self.good(i):
            return daily_end, str(day), f"as a bad backup of day {day} it left the daily tier"
        hourly_end = slot + p.hourly_days * _DAY
        if self.hour_keeper[slot] != i:
            moment, where = slot + _HOUR, _hour(slot)
            rule = f"it was superseded within hour slot {_hour(slot)}"
        elif self.day_keeper[day] == i and daily_end >= hourly_end:
            moment, where = daily_end, str(day)
            rule = f"as newest of day {day} it left the daily tier"
        else:
            moment, where = hourly_end, _hour(slot)
            rule = f"as newest in hour slot {_hour(slot)} it left the hourly tier"
        # min_keep held it until the min_keep-th newer good backup was taken.
        nth = bisect_right(self.present_times, t) + p.min_keep - 1
        if nth < len(self.present_times) and self.present_times[nth] > moment:
            moment = self.present_times[nth]
            rule = f"{p.min_keep} newer good backups released it from min_keep"
        return moment, where, rule


def plan(
    backups: Sequence[B], now: datetime, policy: RetentionPolicy = RetentionPolicy()
) -> list[Decision[B]]:
    """One Decision per input backup, sorted newest first (the order an operator reads)."""
    ctx = _Context(backups, now, policy)
    order = sorted(range(len(backups)), key=ctx.times.__getitem__, reverse=True)
    return [Decision(backups[i], *ctx.decide(i)) for i in order]


def audit(
    backups: Sequence[Dated], now: datetime, policy: RetentionPolicy = RetentionPolicy()
) -> list[Finding]:
    """What the stored set violates; empty means the bucket holds exactly what policy requires.

    Checked by the suite rather than trusted to prune, because a silently failing backup job
    or prune job is only noticed when a restore is needed.
    """
    ctx = _Context(backups, now, policy)
    findings: list[Finding] = []
    present = ctx.present()
    if not present:
        findings.append(Finding("no_backups", "", "No good backup is stored at all."))
    else:
        first = min(ctx.times[i] for i in present)
        hour = max(ctx.hourly_start, _slot(first))
        while hour + policy.backup_grace <= ctx.now:
            if hour not in ctx.hour_keeper:
                findings.append(
                    Finding(
                        "missing_hour",
                        _hour(hour),
                        f"No good backup in hour slot {_hour(hour)}: the "
                        f"{policy.hourly_days}-day hourly tier requires one every hour.",
                    )
                )
            hour += _HOUR
        day = max(ctx.daily_start, first.date())
        while day < ctx.hourly_start.date():
            if day not in ctx.day_keeper:
                findings.append(
                    Finding(
                        "missing_day",
                        str(day),
                        f"No good backup on {day}: the {policy.daily_days}-day daily tier "
                        "requires one every day.",
                    )
                )
            day += _DAY
    grace = _span(policy.prune_grace)
    for i, t in enumerate(ctx.times):
        if ctx.future(i) or ctx.decide(i)[0]:
            continue
        if ctx.complete[i]:
            expired, slot, rule = ctx.expiry(i)
            what = f"Backup taken {_stamp(t)} is still stored although {rule}"
        else:
            expired, slot = t + policy.incomplete_grace, _hour(_slot(t))
            what = (
                f"Incomplete backup (no manifest) taken {_stamp(t)} is still stored although "
                f"as a leftover older than {_span(policy.incomplete_grace)} it expired"
            )
        if expired + policy.prune_grace < ctx.now:
            message = f"{what} at {_stamp(expired)}; prune should have deleted it within {grace}."
            findings.append(Finding("kept_past_policy", slot, message))
    return sorted(findings, key=lambda f: (f.kind, f.slot, f.message))
