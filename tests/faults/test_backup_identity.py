"""One backup, one object (issue 11): every run gets its own id and keys, never overwrites
a key, and only one run backs up a database at a time, across hosts."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opsdrill.backups import catalog, locks
from opsdrill.backups.catalog import BackupRef
from tests.conftest import ROOT, Env, Stack, derive, opsdrill
from tests.faults.test_uploads import stalled_backup

ID = re.compile(r"^backup (?P<id>crm-(?P<ts>\d{8}T\d{6}Z)\S*): ", re.M)


def assert_manifest_vouches_for_its_object(env: Env, ref: BackupRef) -> None:
    """The stored manifest names this very object and its exact bytes (re-read)."""
    s3, store = env.s3()
    manifest = catalog.read_manifest(s3, store, ref)
    assert manifest.id == ref.id and manifest.object["key"] == ref.data_key
    assert ref.data_key is not None
    response = s3.get_object(store.bucket, ref.data_key)
    try:
        body = response.read()
    finally:
        response.close()
        response.release_conn()
    assert len(body) == manifest.object["size"], ref.id
    assert hashlib.sha256(body).hexdigest() == manifest.object["sha256"], ref.id


def test_two_backups_in_the_same_second_are_two_backups(env: Env) -> None:
    """The same start second (``now``, exactly): before, the second run took the first
    one's id and keys and replaced its object and manifest."""
    t = datetime.now(UTC).replace(microsecond=0)
    first = env.backup(now=t)
    second = env.backup(now=t)
    assert first.id != second.id
    assert first.object["key"] != second.object["key"]
    refs = env.refs()
    assert sorted(r.id for r in refs) == sorted([first.id, second.id])
    for ref in refs:
        assert ref.complete and ref.taken_at == t
        assert_manifest_vouches_for_its_object(env, ref)


def test_two_secrets_bundles_in_the_same_second_are_two_bundles(env: Env) -> None:
    """Bundles are laid out as backups are, and get the same nonce in their ids."""
    from opsdrill.secrets.bundle import backup_bundle, list_bundles, read_manifest

    t = datetime.now(UTC).replace(microsecond=0)
    first = backup_bundle(env.inv, "app", now=t)
    second = backup_bundle(env.inv, "app", now=t)
    assert first.id != second.id and first.object["key"] != second.object["key"]
    refs = list_bundles(env.inv, "app")
    assert sorted(r.id for r in refs) == sorted([first.id, second.id])
    for ref in refs:
        assert ref.complete and read_manifest(env.inv, "app", ref).id == ref.id


def test_two_hosts_backing_up_crm_into_one_bucket_at_once(stack: Stack, tmp_path: Path) -> None:
    """Two inventories (two hosts) that each back up a database they call ``crm`` into the
    same bucket and prefix, started together (real CLI, two processes): they share no lock
    (two databases), so only the ids keep them apart. Retried until both runs started in
    the same second, which is when the ids used to collide."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = derive(stack, tmp_path / "a", own_database=True)
    b = derive(stack, tmp_path / "b", own_database=True)
    prefix = a.data["stores"]["offsite"]["prefix"]
    b.rewrite(lambda d: d["stores"]["offsite"].update(prefix=prefix))
    ids: list[str] = []
    for _ in range(6):
        time.sleep(1.02 - time.time() % 1)  # start just after a second begins
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "opsdrill", "backup", "-i", str(env.path)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for env in (a, b)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        for proc, (_, err) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, err[-3000:]
        found = [ID.search(out) for out, _ in outs]
        assert all(found), outs
        ids += [m["id"] for m in found if m]
        if len({m["ts"] for m in found if m}) == 1:
            break
    else:
        raise AssertionError(f"no two runs started in the same second in 6 tries: {ids}")
    assert len(set(ids)) == len(ids), f"two runs got the same id: {ids}"
    refs = a.refs()
    assert sorted(r.id for r in refs) == sorted(ids)
    for ref in refs:
        assert ref.complete
        assert_manifest_vouches_for_its_object(a, ref)


def test_the_lock_session_is_named_with_host_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder's name fits PostgreSQL's 63 bytes with its pid, whatever the host name."""
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 80 + ".example.net")
    name = locks.application_name("backup", "crm")
    assert name.startswith("opsdrill backup crm (host hhh") and name.endswith(
        f" pid {os.getpid()})"
    )
    assert len(name.encode()) == locks.NAMEDATALEN
    assert locks.lock_key("backup", "crm") == locks.lock_key("backup", "crm")
    assert locks.lock_key("backup", "crm") != locks.lock_key("backup", "crm2")


def test_second_backup_of_a_database_exits_75_naming_the_holder(
    stack: Stack, tmp_path: Path
) -> None:
    """Two processes back up one database: the second does nothing, exits 75 and says who
    holds the lock (its application_name, address and since when). The lock is
    PostgreSQL's (an advisory lock on the live server), so it holds across hosts."""
    env = derive(stack, tmp_path, own_database=True)
    with stalled_backup(env, tmp_path) as first:
        metrics_file = tmp_path / "backup.prom"
        second = opsdrill("backup", "-i", str(env.path), "--metrics-file", str(metrics_file))
        assert second.returncode == 75, (second.returncode, second.stderr[-3000:])
        # skipped, not failed: the run holding the lock records the outcome
        assert not metrics_file.exists()
        host = socket.gethostname().split(".")[0]
        holder = f"'opsdrill backup crm (host {host}"
        assert holder in second.stderr and f"pid {first.pid})'" in second.stderr, second.stderr
        assert "from 127.0.0.1" in second.stderr and " since " in second.stderr
        assert "another run holds the backup lock of databases.crm" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert second.stdout == ""
    assert env.refs() == []  # neither stored anything: the first was interrupted
