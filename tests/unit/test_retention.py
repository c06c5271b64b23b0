"""Retention rules under time travel: a fixed clock over weeks of hourly backups.

Nothing here touches storage or the real clock; every test builds a history of fake backups and
asks plan()/audit() what they make of it at a chosen ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from opsdrill.backups.retention import Finding, RetentionPolicy, audit, plan

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
NOW = datetime(2026, 11, 28, 13, 30, tzinfo=UTC)


@dataclass(frozen=True)
class FakeBackup:
    taken_at: datetime
    complete: bool = True
    problem: str | None = None


def at(text: str) -> datetime:
    """'2026-11-27 14:05' -> aware UTC datetime, to keep tests readable."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def hourly_history(start: datetime, end: datetime, minute: int = 5) -> list[FakeBackup]:
    """One complete backup per hour at ``minute`` past, from start's hour while <= end."""
    moment = start.replace(minute=minute, second=0, microsecond=0)
    out = []
    while moment <= end:
        out.append(FakeBackup(moment))
        moment += HOUR
    return out


def prune(
    backups: list[FakeBackup], now: datetime, policy: RetentionPolicy | None = None
) -> list[FakeBackup]:
    """Apply plan()'s deletes, as the daily prune job would."""
    return [d.backup for d in plan(backups, now, policy or RetentionPolicy()) if d.keep]


def kinds(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.kind, f.slot) for f in findings]


@pytest.fixture
def steady() -> list[FakeBackup]:
    """40 days of hourly backups up to the fixed clock, already pruned once."""
    return prune(hourly_history(NOW - 40 * DAY, NOW), NOW)


# --- steady state -------------------------------------------------------------------------------


def test_steady_state_keeps_exactly_what_policy_requires() -> None:
    history = hourly_history(at("2026-10-19 00:00"), NOW)  # 40 days + 13.5 h, last at 13:05
    before = audit(history, NOW)
    assert before, "an unpruned 40-day history must be reported"
    assert {f.kind for f in before} == {"kept_past_policy"}

    kept = prune(history, NOW)

    # Hourly tier: 168 slots, 2026-11-21T14:00Z .. 2026-11-28T13:00Z, one backup each.
    # Daily tier: 30 dates, 2026-10-30 .. 2026-11-28; the newest backups of 2026-11-21 (23:05)
    # through 2026-11-28 (13:05) already sit in the hourly tier, so 30 - 8 = 22 extra dailies.
    assert len(kept) == 7 * 24 + (30 - 8) == 190
    assert audit(kept, NOW) == []
    assert min(b.taken_at for b in kept) == at("2026-10-30 23:05")
    # Pruning is idempotent: the kept set is all "keep".
    assert all(d.keep for d in plan(kept, NOW))


def test_steady_state_reasons_name_the_rule() -> None:
    history = hourly_history(at("2026-10-19 00:00"), NOW)
    reasons = {d.backup.taken_at: d.reason for d in plan(history, NOW)}
    assert reasons[at("2026-11-27 14:05")] == (
        "newest in hour slot 2026-11-27T14:00Z (hourly tier, 7 days)"
    )
    assert reasons[at("2026-11-10 23:05")] == "newest of day 2026-11-10 (daily tier, 30 days)"
    assert reasons[at("2026-11-10 22:05")] == (
        "superseded by a newer backup of day 2026-11-10 (outside hourly tier)"
    )
    assert reasons[at("2026-10-29 23:05")].startswith("older than 30 days")


def test_custom_policy_counts() -> None:
    policy = RetentionPolicy(hourly_days=1, daily_days=3)
    kept = prune(hourly_history(NOW - 10 * DAY, NOW), NOW, policy)
    # 24 hourly slots from 2026-11-27T14:00Z, plus the daily keeper of 2026-11-26 only.
    assert len(kept) == 24 + 1
    assert audit(kept, NOW, policy) == []


def test_daily_prune_over_45_days_keeps_audit_clean_every_hour() -> None:
    start = at("2026-10-01 00:00")
    stored: list[FakeBackup] = []
    for hour in range(45 * 24):
        slot = start + hour * HOUR
        now = slot + timedelta(minutes=30)
        stored.append(FakeBackup(slot + timedelta(minutes=5)))
        if now.hour == 3:  # prune runs once a day, at 03:30
            stored = prune(stored, now)
        assert audit(stored, now) == [], f"audit failed at {now:%Y-%m-%dT%H:%MZ}"
    # Between prunes the bucket may hold up to a day of extra backups, never more.
    assert 7 * 24 + 22 <= len(stored) <= 7 * 24 + 23 + 24


# --- missing slots ------------------------------------------------------------------------------


def test_missing_hour_inside_hourly_tier_is_reported(steady: list[FakeBackup]) -> None:
    gap = [b for b in steady if b.taken_at != at("2026-11-27 14:05")]
    findings = audit(gap, NOW)
    assert kinds(findings) == [("missing_hour", "2026-11-27T14:00Z")]
    assert "2026-11-27T14:00Z" in findings[0].message
    assert "hourly tier" in findings[0].message


def test_missing_hour_outside_hourly_tier_is_only_a_day_question(
    steady: list[FakeBackup],
) -> None:
    # 2026-11-20 is only in the daily tier: its 23:05 backup is all that is required.
    assert audit(steady, NOW) == []
    assert [b.taken_at.date() for b in steady].count(date(2026, 11, 20)) == 1


def test_missing_day_in_daily_tier_is_reported(steady: list[FakeBackup]) -> None:
    gap = [b for b in steady if b.taken_at.date() != date(2026, 11, 10)]
    findings = audit(gap, NOW)
    assert kinds(findings) == [("missing_day", "2026-11-10")]
    assert "2026-11-10" in findings[0].message
    assert "daily tier" in findings[0].message


def test_day_partly_in_hourly_tier_is_checked_hour_by_hour(steady: list[FakeBackup]) -> None:
    # The hourly tier starts at 2026-11-21T14:00Z, so that date is not a missing_day question.
    gap = [b for b in steady if b.taken_at.date() != date(2026, 11, 21)]
    assert kinds(audit(gap, NOW)) == [
        ("missing_hour", f"2026-11-21T{hour:02d}:00Z") for hour in range(14, 24)
    ]


def test_day_is_satisfied_by_any_complete_backup_of_that_date(steady: list[FakeBackup]) -> None:
    moved = [b for b in steady if b.taken_at != at("2026-11-10 23:05")]
    moved.append(FakeBackup(at("2026-11-10 00:05")))
    assert audit(moved, NOW) == []


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # 13:00 is the current slot; 12:00 is still inside the 90 min grace.
        (at("2026-11-28 13:20"), []),
        # Exactly slot start + grace: 12:00 is now required; the current slot still is not.
        (at("2026-11-28 13:30"), [("missing_hour", "2026-11-28T12:00Z")]),
        (at("2026-11-28 13:59"), [("missing_hour", "2026-11-28T12:00Z")]),
    ],
)
def test_current_slot_and_slot_within_grace_are_not_required(
    now: datetime, expected: list[tuple[str, str]]
) -> None:
    history = hourly_history(at("2026-11-28 00:00"), at("2026-11-28 11:59"))
    assert kinds(audit(history, now)) == expected


def test_brand_new_system_has_no_findings() -> None:
    history = hourly_history(NOW - 3 * HOUR, NOW)  # 10:05, 11:05, 12:05, 13:05
    assert len(history) == 4
    assert audit(history, NOW) == []
    assert all(d.keep for d in plan(history, NOW))


def test_brand_new_system_first_backup_slot_counts_but_later_gaps_do_not() -> None:
    only = [FakeBackup(at("2026-11-28 10:40"))]
    assert kinds(audit(only, NOW)) == [
        ("missing_hour", "2026-11-28T11:00Z"),
        ("missing_hour", "2026-11-28T12:00Z"),
    ]


def test_no_backups_is_one_finding() -> None:
    findings = audit([], NOW)
    assert kinds(findings) == [("no_backups", "")]
    assert plan([], NOW) == []


def test_only_incomplete_backups_is_no_backups() -> None:
    leftovers = [FakeBackup(NOW - 2 * HOUR, complete=False)]
    assert kinds(audit(leftovers, NOW)) == [("no_backups", "")]


# --- kept past policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("taken_at", "reported"),
    [
        # Left the daily tier at 2026-11-26T00:00Z / 2026-11-27T00:00Z: past the 26 h grace.
        (at("2026-10-27 23:05"), True),
        (at("2026-10-28 23:05"), True),
        # Left it at 2026-11-28T00:00Z: prune has until 2026-11-29T02:00Z.
        (at("2026-10-29 23:05"), False),
    ],
)
def test_old_daily_backup_not_pruned_is_kept_past_policy(
    steady: list[FakeBackup], taken_at: datetime, reported: bool
) -> None:
    stale = FakeBackup(taken_at)
    (decision,) = [d for d in plan([*steady, stale], NOW) if d.backup is stale]
    assert not decision.keep
    assert decision.reason.startswith("older than 30 days")

    findings = audit([*steady, stale], NOW)
    if reported:
        assert kinds(findings) == [("kept_past_policy", str(taken_at.date()))]
        assert f"{taken_at:%Y-%m-%dT%H:%M}" in findings[0].message
        assert "daily tier" in findings[0].message
    else:
        assert findings == []


def test_expired_hourly_backup_not_pruned_is_kept_past_policy(steady: list[FakeBackup]) -> None:
    # 2026-11-19 12:05 is not its day's newest; its slot left the hourly tier on 11-26 12:00.
    stale = FakeBackup(at("2026-11-19 12:05"))
    findings = audit([*steady, stale], NOW)
    assert kinds(findings) == [("kept_past_policy", "2026-11-19T12:00Z")]
    assert "hourly tier" in findings[0].message


def test_findings_are_sorted_by_kind_then_slot(steady: list[FakeBackup]) -> None:
    broken = [
        b
        for b in steady
        if b.taken_at.date() not in (date(2026, 11, 12), date(2026, 11, 5))
        and b.taken_at != at("2026-11-27 14:05")
    ]
    broken += [FakeBackup(at("2026-10-20 23:05")), FakeBackup(at("2026-10-01 23:05"))]
    assert kinds(audit(broken, NOW)) == [
        ("kept_past_policy", "2026-10-01"),
        ("kept_past_policy", "2026-10-20"),
        ("missing_day", "2026-11-05"),
        ("missing_day", "2026-11-12"),
        ("missing_hour", "2026-11-27T14:00Z"),
    ]


# --- incomplete backups -------------------------------------------------------------------------


def test_incomplete_backup_never_satisfies_an_hour(steady: list[FakeBackup]) -> None:
    swapped = [b for b in steady if b.taken_at != at("2026-11-27 14:05")]
    swapped.append(FakeBackup(at("2026-11-27 14:05"), complete=False))
    assert ("missing_hour", "2026-11-27T14:00Z") in kinds(audit(swapped, NOW))


def test_incomplete_backup_never_satisfies_a_day(steady: list[FakeBackup]) -> None:
    swapped = [b for b in steady if b.taken_at.date() != date(2026, 11, 10)]
    swapped.append(FakeBackup(at("2026-11-10 23:05"), complete=False))
    assert ("missing_day", "2026-11-10") in kinds(audit(swapped, NOW))


def test_incomplete_backup_does_not_displace_an_older_complete_one() -> None:
    good = FakeBackup(at("2026-11-28 12:05"))
    failed = FakeBackup(at("2026-11-28 12:40"), complete=False)
    decisions = {d.backup: d for d in plan([good, failed], NOW)}
    assert decisions[good].keep
    assert decisions[good].reason.startswith("newest in hour slot 2026-11-28T12:00Z")


@pytest.mark.parametrize(
    ("age", "keep", "reason", "reported"),
    [
        (2 * HOUR, True, "may still be uploading", False),
        (7 * HOUR, False, "incomplete (no manifest), older than 6h", False),
        (31 * HOUR, False, "incomplete (no manifest), older than 6h", False),
        (33 * HOUR, False, "incomplete (no manifest), older than 6h", True),
    ],
)
def test_incomplete_backup_is_deleted_after_grace(
    steady: list[FakeBackup], age: timedelta, keep: bool, reason: str, reported: bool
) -> None:
    leftover = FakeBackup(NOW - age, complete=False)
    (decision,) = [d for d in plan([*steady, leftover], NOW) if d.backup is leftover]
    assert decision.keep is keep
    assert reason in decision.reason
    findings = audit([*steady, leftover], NOW)
    assert [f.kind for f in findings] == (["kept_past_policy"] if reported else [])
    if reported:
        assert "Incomplete" in findings[0].message


# --- several backups per hour, clock skew, ordering ---------------------------------------------


def test_multiple_backups_in_one_hour_keep_only_the_newest() -> None:
    runs = [FakeBackup(at(f"2026-11-28 12:{m:02d}")) for m in (5, 45, 20)]
    decisions = plan(runs, NOW, RetentionPolicy(min_keep=1))
    assert [(d.backup.taken_at.minute, d.keep) for d in decisions] == [
        (45, True),
        (20, False),
        (5, False),
    ]
    assert decisions[1].reason == (
        "superseded by a newer backup in hour slot 2026-11-28T12:00Z (hourly tier)"
    )


def test_superseded_within_hour_is_kept_past_policy_a_day_after_the_slot_ends(
    steady: list[FakeBackup],
) -> None:
    extra = [FakeBackup(at("2026-11-27 10:01")), FakeBackup(at("2026-11-27 11:01"))]
    # 10:01 superseded by 10:05, slot ended 11:00, + 26 h = 2026-11-28T13:00Z < NOW.
    # 11:01 superseded by 11:05, slot ended 12:00, + 26 h = 2026-11-28T14:00Z > NOW.
    assert kinds(audit([*steady, *extra], NOW)) == [("kept_past_policy", "2026-11-27T10:00Z")]


def test_future_dated_backup_is_kept_and_not_audited(steady: list[FakeBackup]) -> None:
    future = FakeBackup(NOW + 2 * HOUR)
    (decision,) = [d for d in plan([*steady, future], NOW) if d.backup is future]
    assert decision.keep
    assert "clock skew" in decision.reason
    assert audit([*steady, future], NOW) == []
    assert kinds(audit([future], NOW)) == [("no_backups", "")]


def test_backup_a_few_minutes_ahead_counts_normally() -> None:
    now = at("2026-11-28 13:58")
    early = FakeBackup(at("2026-11-28 14:02"))  # within the 5 min skew tolerance
    (decision,) = plan([early], now)
    assert decision.keep
    assert decision.reason.startswith("newest in hour slot 2026-11-28T14:00Z")


def test_plan_returns_one_decision_per_backup_newest_first(steady: list[FakeBackup]) -> None:
    shuffled = steady[::2] + steady[1::2]
    decisions = plan(shuffled, NOW)
    assert len(decisions) == len(shuffled)
    times = [d.backup.taken_at for d in decisions]
    assert times == sorted(times, reverse=True)


def test_non_utc_aware_times_are_judged_in_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    # 14:05+02:00 is 12:05Z: it fills the 12:00Z slot.
    backup = FakeBackup(datetime(2026, 11, 28, 14, 5, tzinfo=plus_two))
    (decision,) = plan([backup], NOW)
    assert "2026-11-28T12:00Z" in decision.reason


# --- min_keep: the newest good backups survive whatever their age ------------------------------


def test_backups_stopped_a_month_ago_keep_the_newest_three() -> None:
    stopped = hourly_history(NOW - 45 * DAY, NOW - 35 * DAY)
    decisions = plan(stopped, NOW)
    kept = [d for d in decisions if d.keep]
    assert [d.backup for d in kept] == sorted(stopped, key=lambda b: b.taken_at)[-3:][::-1]
    for d in kept:
        assert d.reason.startswith("kept: one of the 3 newest good backups (min_keep)")
        assert "older than 30 days" in d.reason  # what the tiers alone would have done
    # The month-long gap is reported; what min_keep holds on to is not "kept past policy".
    findings = audit(prune(stopped, NOW), NOW)
    assert {f.kind for f in findings} == {"missing_day", "missing_hour"}


@pytest.mark.parametrize("min_keep", [1, 5])
def test_min_keep_is_configurable(min_keep: int) -> None:
    stopped = hourly_history(NOW - 45 * DAY, NOW - 40 * DAY)
    kept = prune(stopped, NOW, RetentionPolicy(min_keep=min_keep))
    assert len(kept) == min_keep


def test_min_keep_counts_only_good_backups() -> None:
    good = hourly_history(NOW - 45 * DAY, NOW - 44 * DAY)
    newer = [
        FakeBackup(NOW - 40 * DAY, problem="manifest is not valid: it is empty"),
        FakeBackup(NOW - 39 * DAY, problem="manifest says 9 bytes, the stored object has 7"),
        FakeBackup(NOW - 38 * DAY, problem="manifest is not valid: not JSON"),
        FakeBackup(NOW - 37 * DAY, complete=False),
    ]
    decisions = {d.backup: d for d in plan([*good, *newer], NOW)}
    newest_good = sorted(good, key=lambda b: b.taken_at)[-3:]
    assert {b for b, d in decisions.items() if d.keep} == set(newest_good)
    for bad in newer[:3]:
        assert not decisions[bad].keep
        assert decisions[bad].reason.startswith("not a good backup (manifest")
        assert "older than 30 days" in decisions[bad].reason


def test_min_keep_needs_no_reason_when_the_tiers_keep_them(steady: list[FakeBackup]) -> None:
    assert not any("min_keep" in d.reason for d in plan(steady, NOW))


def test_backup_released_from_min_keep_is_audited_from_its_release() -> None:
    old = hourly_history(NOW - 45 * DAY, NOW - 45 * DAY + 2 * HOUR)  # three, 45 days old
    restarted = [FakeBackup(NOW - timedelta(minutes=m)) for m in (50, 30, 10)]
    findings = audit([*old, *restarted], NOW)
    # The tiers let the old ones go 15 days ago, min_keep only when the third new backup
    # was taken 10 minutes ago: prune has until 26 h after that.
    assert "kept_past_policy" not in {f.kind for f in findings}
    later = audit([*old, *restarted], NOW + 27 * HOUR)
    assert [f.kind for f in later].count("kept_past_policy") == 3
    assert "released it from min_keep" in next(
        f.message for f in later if f.kind == "kept_past_policy"
    )


# --- bad manifests: never a slot keeper -------------------------------------------------------


@pytest.mark.parametrize(
    "problem",
    [
        "manifest is not valid: not JSON (Expecting value: line 1 column 1 (char 0))",
        "manifest is not valid: it is empty",
        "manifest says 123 bytes, the stored object has 99",
    ],
)
def test_bad_manifest_never_pushes_out_the_good_backup_of_its_hour(problem: str) -> None:
    policy = RetentionPolicy(min_keep=1)  # so that only the slot rules are at work
    good = FakeBackup(at("2026-11-28 12:05"))
    bad = FakeBackup(at("2026-11-28 12:40"), problem=problem)
    decisions = {d.backup: d for d in plan([good, bad], NOW, policy)}
    assert decisions[good].keep
    assert decisions[good].reason.startswith("newest in hour slot 2026-11-28T12:00Z")
    assert decisions[bad].keep  # inside the daily tier: kept for a human
    assert decisions[bad].reason.startswith(f"not a good backup ({problem}): fills no slot")
    assert audit([good, bad], NOW, policy) == []


def test_bad_manifest_never_pushes_out_the_good_backup_of_its_day(
    steady: list[FakeBackup],
) -> None:
    policy = RetentionPolicy(min_keep=1)
    history = [*steady, FakeBackup(at("2026-11-10 06:05"))]
    bad = FakeBackup(at("2026-11-10 23:40"), problem="manifest is not valid: it is empty")
    decisions = {d.backup.taken_at: d for d in plan([*history, bad], NOW, policy)}
    assert decisions[at("2026-11-10 23:05")].keep  # the day's newest good one
    assert not decisions[at("2026-11-10 06:05")].keep
    # The good one of the day survives even when the bad one is the day's only rival.
    alone = [b for b in steady if b.taken_at.date() != date(2026, 11, 10)]
    alone += [FakeBackup(at("2026-11-10 06:05")), bad]
    decisions = {d.backup.taken_at: d for d in plan(alone, NOW, policy)}
    assert decisions[at("2026-11-10 06:05")].keep
    assert decisions[at("2026-11-10 06:05")].reason == (
        "newest of day 2026-11-10 (daily tier, 30 days)"
    )


def test_bad_manifest_alone_leaves_its_slot_missing(steady: list[FakeBackup]) -> None:
    swapped = [b for b in steady if b.taken_at != at("2026-11-27 14:05")]
    swapped.append(FakeBackup(at("2026-11-27 14:05"), problem="manifest is not valid: x"))
    assert kinds(audit(swapped, NOW)) == [("missing_hour", "2026-11-27T14:00Z")]


def test_bad_backup_is_deleted_once_its_day_leaves_the_daily_tier(
    steady: list[FakeBackup],
) -> None:
    bad = FakeBackup(at("2026-10-28 12:00"), problem="manifest is not valid: it is empty")
    (decision,) = [d for d in plan([*steady, bad], NOW) if d.backup is bad]
    assert not decision.keep
    assert decision.reason.endswith("older than 30 days")
    # It left the daily tier at 2026-11-27T00:00Z; prune had until 2026-11-28T02:00Z.
    assert kinds(audit([*steady, bad], NOW)) == [("kept_past_policy", "2026-10-28")]


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hourly_days": 0}, "hourly_days"),
        ({"hourly_days": 8, "daily_days": 7}, "daily_days"),
        ({"backup_grace": timedelta(minutes=-1)}, "backup_grace"),
        ({"prune_grace": timedelta(hours=-1)}, "prune_grace"),
        ({"incomplete_grace": timedelta(seconds=-1)}, "incomplete_grace"),
        ({"min_keep": 0}, "min_keep"),
    ],
)
def test_invalid_policy_raises(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetentionPolicy(**kwargs)  # type: ignore[arg-type]


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan([FakeBackup(NOW)], NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="timezone-aware"):
        audit([FakeBackup(datetime(2026, 11, 28, 12, 5))], NOW)
