"""Prune never loses the last good backups (issue 11): the real CLI against the local stack.

A month without backups, bad manifests beside good backups, a host clock off from the
store's, and a dry run that must change nothing, metrics included. Histories are planted
as server-side copies of one real backup (tests/helpers/history.py); times are whole hours and
days away from the real clock, so a test that crosses an hour boundary judges the same.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from opsdrill.backups.prune import prune
from opsdrill.errors import RefusedError
from tests.conftest import ROOT, Env, opsdrill, run_pytest
from tests.helpers.history import (
    corrupt_manifest,
    empty_manifest,
    plant_at,
    plant_history,
    size_mismatch_manifest,
)
from tests.helpers.registry import proves

CLI = (sys.executable, "-m", "opsdrill")
MIN_KEEP = "kept: one of the 3 newest good backups (min_keep)"
BAD = {
    "corrupt": (corrupt_manifest, "manifest is not valid: not JSON"),
    "empty": (empty_manifest, "manifest is not valid: it is empty"),
    "size mismatch": (size_mismatch_manifest, "bytes, the stored object has"),
}


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def ids(env: Env) -> list[str]:
    return [r.id for r in env.refs()]


def object_keys(env: Env) -> list[str]:
    s3, store = env.s3()
    return sorted(o.object_name for o in s3.list_objects(store.bucket, prefix="", recursive=True))


def run_prune(env: Env, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = opsdrill("prune", "-i", str(env.path), *extra)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


def lines_for(stdout: str) -> dict[str, str]:
    """Backup id -> its keep/delete line of ``prune`` output."""
    out = {}
    for line in stdout.splitlines():
        _, _, rest = line.partition(" crm-")
        if rest:
            out["crm-" + rest.split(":", 1)[0]] = line
    return out


def test_backups_stopped_a_month_ago_prune_keeps_the_newest_three(env: Env) -> None:
    stopped = _hour(datetime.now(UTC)) - timedelta(days=40)
    env.backup(now=stopped)
    planted = plant_at(env, [stopped + timedelta(hours=h) for h in range(1, 6)])
    every = ids(env)
    assert len(every) == 6
    newest = planted[-3:]

    dry = run_prune(env, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = lines_for(dry.stdout)
    for backup_id in newest:
        assert lines[backup_id].startswith("keep"), lines[backup_id]
        assert MIN_KEEP in lines[backup_id], lines[backup_id]
    for backup_id in every[:3]:
        assert lines[backup_id].startswith("would delete"), lines[backup_id]
    assert "crm: 3 kept (3 good), 3 would be deleted (dry run: nothing changed)" in dry.stdout
    assert ids(env) == every

    real = run_prune(env)
    assert real.returncode == 0, real.stderr
    assert ids(env) == newest
    assert all(r.complete for r in env.refs())
    # Idempotent: the next prune keeps them too.
    assert run_prune(env).returncode == 0
    assert ids(env) == newest


def test_bad_manifests_never_cost_a_good_backup_its_hour_or_day(env: Env) -> None:
    """Each bad manifest is the newest backup of its hour (or day): the good one there
    must survive, and the bad ones are kept for a human while in the daily tier."""
    env.rewrite(lambda d: d["retention"].update(min_keep=1))  # only the slots at work
    now = datetime.now(UTC)
    hours = [_hour(now) - timedelta(hours=h) for h in (1, 2, 3)]
    goods = [env.backup(now=hours[0] + timedelta(minutes=5)).id]
    goods += plant_at(env, [h + timedelta(minutes=5) for h in hours[1:]])
    day = _hour(now).replace(hour=0) - timedelta(days=10)  # daily tier only
    goods += plant_at(env, [day + timedelta(hours=6)])
    bads: dict[str, str] = {}
    for (body, said), hour in zip(BAD.values(), hours, strict=True):
        (bad,) = plant_at(env, [hour + timedelta(minutes=40)], body)
        bads[bad] = said
    (bad,) = plant_at(env, [day + timedelta(hours=20)], corrupt_manifest)
    bads[bad] = BAD["corrupt"][1]

    dry = run_prune(env, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = lines_for(dry.stdout)
    for backup_id in goods:
        assert lines[backup_id].startswith("keep"), lines[backup_id]
    for backup_id, said in bads.items():
        assert lines[backup_id].startswith("keep"), lines[backup_id]
        assert "not a good backup (" in lines[backup_id] and said in lines[backup_id]
        assert "fills no slot" in lines[backup_id]
    assert run_prune(env).returncode == 0
    left = set(ids(env))
    assert set(goods) <= left, f"good backups deleted: {set(goods) - left}"
    assert set(bads) <= left


def test_min_keep_counts_only_good_backups(env: Env) -> None:
    """Backups stopped 40 days ago and the last three had bad manifests: the three newest
    GOOD ones are what survives."""
    stopped = _hour(datetime.now(UTC)) - timedelta(days=40)
    env.backup(now=stopped)
    goods = ids(env) + plant_at(env, [stopped + timedelta(hours=h) for h in (1, 2, 3)])
    bads = [
        plant_at(env, [stopped + timedelta(hours=4 + i)], body)[0]
        for i, (body, _) in enumerate(BAD.values())
    ]
    dry = run_prune(env, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = lines_for(dry.stdout)
    for backup_id in goods[-3:]:
        assert MIN_KEEP in lines[backup_id], lines[backup_id]
    for backup_id in bads:
        assert lines[backup_id].startswith("would delete"), lines[backup_id]
        assert "not a good backup (" in lines[backup_id]
    assert run_prune(env).returncode == 0
    assert ids(env) == goods[-3:]


def test_bad_manifest_beside_a_good_backup_keeps_the_retention_check_green(env: Env) -> None:
    """Prune and the retention check judge bad manifests alike: after prune kept the good
    backup of an hour whose newest manifest is corrupt, the check has nothing to flag."""
    now = datetime.now(UTC)
    env.backup(now=now)
    slot = _hour(now) - timedelta(hours=30)  # ended > 26 h ago: "kept past policy" territory
    plant_history(env, now, days=9, skip_hours={slot})
    (good,) = plant_at(env, [slot + timedelta(minutes=5)])
    (bad,) = plant_at(env, [slot + timedelta(minutes=40)], corrupt_manifest)
    proc = run_prune(env)
    assert proc.returncode == 0, proc.stderr
    assert {good, bad} <= set(ids(env))
    run = env.run_checks("check_pg_retention.py")
    run.assert_passes("pg.backup.retention")
    assert "clocks" in _attachments(run.by_check("pg.backup.retention"))


def _attachments(result: dict[str, Any]) -> list[str]:
    steps: list[dict[str, Any]] = [result, *result.get("steps", [])]
    return [a["name"] for step in steps for a in step.get("attachments", [])]


# --- the host clock against the store's ----------------------------------------------------


@pytest.fixture
def faketime() -> str:
    path = shutil.which("faketime")
    assert path, "faketime is missing: run scripts/bootstrap-system.sh (Debian package faketime)"
    return path


def _history_with_something_to_delete(env: Env) -> list[str]:
    now = datetime.now(UTC)
    env.backup(now=now)
    plant_at(env, [now - timedelta(days=40)])  # past the policy, not among the newest 3
    plant_at(env, [now - timedelta(hours=h) for h in (1, 2, 3)])
    return object_keys(env)


@pytest.mark.parametrize(("offset", "direction"), [("+2h", "ahead of"), ("-10m", "behind")])
def test_host_clock_off_from_the_store_refuses_prune(
    env: Env, faketime: str, offset: str, direction: str
) -> None:
    before = _history_with_something_to_delete(env)
    for dry_run in ((), ("--dry-run",)):
        proc = subprocess.run(
            [faketime, "-f", offset, *CLI, "prune", "-i", str(env.path), *dry_run],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        err = proc.stderr
        assert "this host's clock says" in err and "but store offsite" in err, err
        assert f"{direction} the store" in err and "timedatectl set-ntp" in err, err
        said = re.search(r"clock says (\S+Z) but store offsite \(.*?\) says (\S+Z):", err)
        assert said, err
        host, store = (
            datetime.strptime(t, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) for t in said.groups()
        )
        expected = timedelta(hours=2) if offset == "+2h" else -timedelta(minutes=10)
        assert abs((host - store) - expected) < timedelta(minutes=1), err
        assert abs(store - datetime.now(UTC)) < timedelta(minutes=1), err
        assert proc.stdout == ""  # not even a plan
    assert object_keys(env) == before


def test_library_prune_judges_an_injected_clock_against_the_store(env: Env) -> None:
    before = _history_with_something_to_delete(env)
    with pytest.raises(RefusedError, match=r"this host's clock says .* but store offsite"):
        prune(env.inv, "crm", dry_run=False, now=datetime.now(UTC) + timedelta(days=1))
    assert object_keys(env) == before
    # Within the tolerance the same history is pruned: the 40-day-old one goes.
    decisions = prune(env.inv, "crm", dry_run=False, now=datetime.now(UTC) + timedelta(minutes=2))
    assert [d.keep for d in decisions].count(False) == 1
    assert len(object_keys(env)) == len(before) - 2


@proves(broken=["pg.backup.retention"])
def test_host_clock_off_from_the_store_breaks_the_retention_check(env: Env, faketime: str) -> None:
    env.backup()
    results = env.path.parent / f"allure-{uuid.uuid4().hex[:6]}"
    argv = [faketime, "-f", "+2h", sys.executable, "-m", "pytest"]
    argv += [str(ROOT / "opsdrill_checks" / "check_pg_retention.py"), "--inventory", str(env.path)]
    argv += ["-p", "no:cacheprovider", "-v", "-ra", "--alluredir", str(results), "-o", "addopts="]
    run = run_pytest(argv, results)
    run.assert_outcome("pg.backup.retention", "broken", exit_code=2)
    msg = run.assert_broken(
        "pg.backup.retention", "refusing to judge retention", "this host's clock says"
    )
    assert "ahead of the store" in msg and "the stored backups were not judged" in msg


# --- a dry run changes nothing ---------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True])
def test_dry_run_deletes_nothing_and_writes_no_metrics(
    env: Env, tmp_path: Path, existing: bool
) -> None:
    before = _history_with_something_to_delete(env)
    metrics = tmp_path / "textfile" / "opsdrill-prune.prom"
    if existing:  # a real run recorded itself; then another backup past the policy
        assert run_prune(env, "--metrics-file", str(metrics)).returncode == 0
        plant_at(env, [datetime.now(UTC) - timedelta(days=41)])
        before = object_keys(env)
    recorded = metrics.read_bytes() if existing else None
    dry = run_prune(env, "--dry-run", "--metrics-file", str(metrics))
    assert dry.returncode == 0, dry.stderr
    assert "would delete" in dry.stdout
    assert object_keys(env) == before
    if existing:
        assert metrics.read_bytes() == recorded
    else:
        assert not metrics.exists()
        assert not metrics.with_name(metrics.name + ".lock").exists()
    assert "--dry-run: nothing is written to" in dry.stderr


def test_store_rejecting_a_skewed_request_is_the_clock_refusal() -> None:
    """Real S3 and MinIO reject requests signed more than ~15 min off their own clock
    (RequestTimeTooSkewed) before prune could compare clocks itself; moto does not check,
    so this unit test fakes the store's answer (a boundary) and runs the real handling."""
    from email.utils import format_datetime

    import urllib3
    from minio.error import S3Error

    from opsdrill.backups.prune import ClockSkew, _list
    from opsdrill.config.inventory import Store

    server = datetime.now(UTC) - timedelta(hours=1)
    answer = urllib3.HTTPResponse(
        body=b"", status=403, headers={"Date": format_datetime(server, usegmt=True)}
    )

    class Rejecting:
        def list_objects(self, *args: object, **kwargs: object) -> object:
            raise S3Error(answer, "RequestTimeTooSkewed", "too large", "/b", "r", "h")

    store = Store(
        endpoint="s3.example.net:9000", bucket="backups", access_key_env="A", secret_key_env="S"
    )
    with pytest.raises(ClockSkew) as caught:
        _list(Rejecting(), "offsite", store, "crm")  # type: ignore[arg-type]
    assert "but store offsite (s3.example.net:9000) says" in caught.value.message
    assert f"{server:%Y-%m-%dT%H:%M:%S}Z" in caught.value.message
    assert "1 h 0 min ahead of the store" in caught.value.message
    assert caught.value.exit_code == 2
