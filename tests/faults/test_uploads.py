"""Leave nothing behind on the store (issue 11): a failed backup aborts its multipart
upload, the next backup of the database sweeps what a killed one left, and
``pg.backup.dangling_uploads`` flags uploads left open for more than a day.

The CLI tests stall a real backup mid-upload with a stand-in ``gpg`` (the last stage of the
pipeline) that writes more than one part of random bytes and then hangs: a multipart upload
is then open on the (real, moto) store for as long as the test needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import inspect
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from minio import Minio

from opsdrill.backups import catalog
from tests.conftest import ROOT, Env, Stack, derive, opsdrill
from tests.helpers.faults import CuttingProxy
from tests.helpers.registry import proves

DANGLING = "pg.backup.dangling_uploads"
MiB = 1024 * 1024
# More than one part (opsdrill.s3.PART_SIZE, 16 MiB): the upload is a multipart one.
STALL_BYTES = 20 * MiB

STAND_IN_GPG = """#!/bin/sh
# gpg, except that --encrypt writes {size} random bytes and then {then}.
for arg in "$@"; do
  if [ "$arg" = "--encrypt" ]; then
    echo $$ > {pidfile}
    head -c {size} /dev/urandom
    {action}
  fi
done
exec {real} "$@"
"""
HANG = ("hangs (its pid in the pid file)", "exec sleep 600")
FAIL = ("fails", 'echo "gpg: simulated failure: disk quota exceeded" >&2; exit 2')
END = ("ends well (reading its input, so no stage fails)", "cat >/dev/null; exit 0")


def stand_in_gpg(tmp_path: Path, mode: tuple[str, str]) -> tuple[dict[str, str], Path]:
    """An environment whose PATH finds the stand-in gpg first, and its pid file."""
    real = shutil.which("gpg")
    assert real, "gpg is missing"
    bindir = tmp_path / f"fakebin-{mode[1].split()[0]}"
    bindir.mkdir()
    pidfile = tmp_path / "gpg.pid"
    script = bindir / "gpg"
    script.write_text(
        STAND_IN_GPG.format(
            size=STALL_BYTES, then=mode[0], pidfile=pidfile, action=mode[1], real=real
        )
    )
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, pidfile


def open_uploads(env: Env, prefix: str | None = None) -> list[Any]:
    """The store's open multipart uploads under ``prefix`` (the database's by default),
    read with the SDK directly, independently of opsdrill.backups.uploads."""
    s3, store = env.s3()
    where = catalog.db_prefix(store, "crm") if prefix is None else prefix
    return list(s3._list_multipart_uploads(store.bucket, prefix=where).uploads)


@contextlib.contextmanager
def stalled_backup(env: Env, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """``opsdrill backup`` (the real CLI) stuck mid-upload: yields the process once its
    multipart upload is open. Afterwards the process, if still running, and the hanging
    stand-in gpg are killed (the other stages then end on a broken pipe)."""
    run_env, pidfile = stand_in_gpg(tmp_path, HANG)
    proc = subprocess.Popen(
        [sys.executable, "-m", "opsdrill", "backup", "-i", str(env.path)],
        cwd=ROOT,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not open_uploads(env):
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise AssertionError(f"backup ended (exit {proc.returncode}) before:\n{err}")
            assert time.monotonic() < deadline, "no multipart upload opened within 180 s"
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=60)
        _stop_stand_in(pidfile)


def _stop_stand_in(pidfile: Path) -> None:
    """Kill the hanging stand-in gpg (``sleep``, started by our backup) if it still runs."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pidfile.read_text().strip())
        if b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ every failure path


@pytest.mark.parametrize("fault", ["SIGINT", "SIGTERM", "a stage fails mid-upload"])
def test_a_failed_backup_leaves_no_upload_open(stack: Stack, tmp_path: Path, fault: str) -> None:
    """minio's put_object aborts its upload on an ``Exception`` only: an interrupt (and the
    exception the CLI raises for SIGTERM) left it open, with its parts, for ever."""
    env = derive(stack, tmp_path, own_database=True)
    if fault.startswith("SIG"):
        signum = signal.Signals[fault]
        with stalled_backup(env, tmp_path) as proc:
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, err[-3000:]
    else:
        run_env, _ = stand_in_gpg(tmp_path, FAIL)
        done = opsdrill("backup", "-i", str(env.path), env=run_env)
        assert done.returncode == 1, done.stderr[-3000:]
        assert "encrypt (gpg)" in done.stderr and "simulated failure" in done.stderr
    assert open_uploads(env) == [], "the failed run left its multipart upload open"
    assert env.refs() == []


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """A signal to one thread of another process (tgkill(2); Python has no call for it)."""
    number = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)
    if number is None:
        pytest.skip(f"tgkill's syscall number on {os.uname().machine} is not known here")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


def test_sigterm_delivered_to_a_worker_thread_still_cleans_up(stack: Stack, tmp_path: Path) -> None:
    """The kernel gives a process-directed signal to any thread that does not block it:
    when that was a part-upload or stderr-drain thread, the main thread sat on in its read
    of the stalled pipeline and the run hung instead of exiting 143 (seen about once in
    ten runs). Sent here to a worker thread on purpose."""
    env = derive(stack, tmp_path, own_database=True)
    with stalled_backup(env, tmp_path) as proc:
        workers = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
        assert workers, "the backup runs no thread besides its main one"
        _tgkill(proc.pid, workers[-1], signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert open_uploads(env) == [], "the interrupted run left its multipart upload open"


# ------------------------------------------------------ a killed run: swept by the next


@proves(failed=[DANGLING])
def test_killed_backup_is_flagged_then_swept_by_the_next_backup(
    stack: Stack, tmp_path: Path
) -> None:
    """kill -9 mid-upload: the upload stays open (nothing can abort it), the check flags
    it, and the next backup, which PostgreSQL lets take the lock the killed run held (its
    session ended with it), aborts it and says so."""
    env = derive(stack, tmp_path, own_database=True)
    dbname = env.data["databases"]["crm"]["dsn"].rsplit("/", 1)[1]
    with stalled_backup(env, tmp_path) as first:
        with stack.live_conn(dbname) as conn:
            held = conn.execute(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                "USING (pid) WHERE l.locktype = 'advisory' AND l.granted"
            ).fetchall()
        assert [r[0] for r in held if r[0].startswith("opsdrill backup crm")], held
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    left = open_uploads(env)
    assert len(left) == 1, left
    key = left[0].object_name

    run = env.run_checks("check_pg_uploads.py")
    run.assert_outcome(DANGLING, "failed", exit_code=1)
    run.assert_fails(DANGLING, key, "the next backup of crm aborts")

    nxt = opsdrill("backup", "-i", str(env.path))
    assert nxt.returncode == 0, nxt.stderr[-3000:]  # the lock died with the killed run
    assert "aborted 1 stale multipart upload" in nxt.stderr, nxt.stderr
    assert key in nxt.stderr
    assert "swept 1 stale upload" in nxt.stdout, nxt.stdout
    assert open_uploads(env) == []
    env.run_checks("check_pg_uploads.py").assert_passes(DANGLING)


def test_store_dropped_mid_upload_leaves_an_upload_the_next_backup_sweeps(
    stack: Stack, tmp_path: Path
) -> None:
    """The store goes away mid-upload: the abort cannot reach it either, so the upload
    stays open; the run says so, and the next backup removes it."""
    env = derive(stack, tmp_path, own_database=True)
    endpoint = env.data["stores"]["offsite"]["endpoint"]
    run_env, _ = stand_in_gpg(tmp_path, END)
    # cut in the second part: after the upload was created, before it could complete
    proxy = CuttingProxy(int(endpoint.rsplit(":", 1)[1]), cut_after=18 * MiB)
    try:
        env.rewrite(
            lambda d: d["stores"]["offsite"].update(
                endpoint=f"127.0.0.1:{proxy.port}", timeout_seconds=5.0
            )
        )
        cut = opsdrill("backup", "-i", str(env.path), env=run_env)
    finally:
        proxy.close()
        env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint=endpoint))
    assert cut.returncode == 2, cut.stderr[-3000:]
    assert "could not abort the multipart upload of" in cut.stderr, cut.stderr
    assert "the next backup of this database removes it" in cut.stderr
    left = open_uploads(env)
    assert len(left) == 1, left
    nxt = opsdrill("backup", "-i", str(env.path))
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    assert "aborted 1 stale multipart upload" in nxt.stderr and left[0].object_name in nxt.stderr
    assert open_uploads(env) == []


@proves(broken=[DANGLING])
def test_dangling_uploads_check_is_broken_when_the_store_is_unreachable(
    env: Env, tmp_path: Path
) -> None:
    from opsdrill_stack.procs import free_port

    env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint=f"127.0.0.1:{free_port()}"))
    run = env.run_checks("check_pg_uploads.py")
    run.assert_outcome(DANGLING, "broken", exit_code=2)
    run.assert_broken(DANGLING, "stores.offsite.endpoint")


def test_the_sweep_aborts_only_this_databases_stale_uploads(env: Env) -> None:
    """Only uploads of this database's backup keys, under its own prefix, are ours to
    abort; another database's (``crm2/`` shares the ``crm`` prefix as a string), or a file
    someone else uploads under the prefix, is left alone."""
    s3, store = env.s3()
    mine = catalog.db_prefix(store, "crm")
    other = catalog.db_prefix(store, "crm2")
    stale = f"{mine}2024/01/01/crm-20240101T000000Z.dump.zst.gpg"
    foreign = [
        f"{mine}notes/big.bin",
        f"{other}2024/01/01/crm2-20240101T000000Z.dump.zst.gpg",
    ]
    planted = {k: _plant_upload(s3, store.bucket, k) for k in [stale, *foreign]}
    try:
        done = opsdrill("backup", "-i", str(env.path))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "aborted 1 stale multipart upload" in done.stderr and stale in done.stderr
        assert f"left 1 upload under {mine} that is not a backup of crm" in done.stderr
        remaining = {u.object_name for u in open_uploads(env, store.prefix.strip("/") + "/")}
        assert remaining == set(foreign)
    finally:
        for key, upload_id in planted.items():
            with contextlib.suppress(Exception):
                s3._abort_multipart_upload(store.bucket, key, upload_id)


def _plant_upload(s3: Minio, bucket: str, key: str) -> str:
    upload_id = s3._create_multipart_upload(bucket, key, {})
    s3._upload_part(bucket, key, b"x" * 1024, None, upload_id, 1)
    return str(upload_id)


# --------------------------------------------------------------- the library, on moto


def test_put_new_never_overwrites(env: Env) -> None:
    from opsdrill.backups.uploads import KeyExists, put_new
    from opsdrill.errors import RefusedError

    s3, store = env.s3()
    key = f"{catalog.db_prefix(store, 'crm')}new/object.json"
    put_new(s3, store.bucket, key, b"first", "application/json")
    put_new(s3, store.bucket, key, b"first", "application/json")  # a retried PUT: ours
    with pytest.raises(KeyExists) as err:
        put_new(s3, store.bucket, key, b"second", "application/json")
    assert isinstance(err.value, RefusedError) and err.value.exit_code == 2
    assert key in err.value.message and "not overwritten" in err.value.message
    response = s3.get_object(store.bucket, key)
    try:
        assert response.read() == b"first"
    finally:
        response.close()
        response.release_conn()


def test_multipart_upload_completes_once_and_never_over_an_existing_key(env: Env) -> None:
    from opsdrill.backups.uploads import KeyExists, upload_stream

    s3, store = env.s3()
    key = f"{catalog.db_prefix(store, 'crm')}new/object.dump"
    body = os.urandom(11 * MiB)
    notes: list[str] = []
    upload_stream(
        s3, store.bucket, key, io.BytesIO(body), part_size=5 * MiB, parallel=2, note=notes.append
    )
    stored = s3.stat_object(store.bucket, key)
    assert stored.size == len(body) and str(stored.etag).endswith("-3")  # three parts
    with pytest.raises(KeyExists):
        upload_stream(s3, store.bucket, key, io.BytesIO(body[::-1]), part_size=5 * MiB, parallel=2)
    assert open_uploads(env) == []  # the refused upload was aborted, not left open
    response = s3.get_object(store.bucket, key)
    try:
        assert hashlib.sha256(response.read()).digest() == hashlib.sha256(body).digest()
    finally:
        response.close()
        response.release_conn()
    assert notes == []


def test_dangling_means_older_than_the_threshold(env: Env) -> None:
    """moto reports every upload as initiated on 2010-11-10, so a planted upload is old
    there; the age rule itself is tested on explicit dates."""
    from opsdrill.backups.uploads import OpenUpload, list_open, older_than

    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    fresh = OpenUpload("p/crm/a", "1", now - timedelta(hours=23))
    old = OpenUpload("p/crm/b", "2", now - timedelta(hours=25))
    unknown = OpenUpload("p/crm/c", "3", None)  # no date: reported, never assumed fresh
    assert older_than([fresh, old, unknown], timedelta(days=1), now) == [old, unknown]
    assert older_than([fresh, old], timedelta(0), now) == [fresh, old]

    s3, store = env.s3()
    key = f"{catalog.db_prefix(store, 'crm')}2024/01/01/crm-20240101T000000Z.dump"
    upload_id = _plant_upload(s3, store.bucket, key)
    try:
        found = list_open(s3, store.bucket, catalog.db_prefix(store, "crm"))
        assert [(u.key, u.upload_id) for u in found] == [(key, upload_id)]
        assert found[0].initiated is not None and found[0].initiated.tzinfo is not None
    finally:
        s3._abort_multipart_upload(store.bucket, key, upload_id)


def test_minio_private_calls_we_rely_on_are_there() -> None:
    """opsdrill.backups.uploads drives multipart uploads with the minio client's own request
    methods (no public API lists uploads or makes a write conditional): a minio upgrade
    that changes them must fail here, not in a backup."""
    want = {
        "_create_multipart_upload": ["bucket_name", "object_name", "headers"],
        "_upload_part": [
            "bucket_name",
            "object_name",
            "data",
            "headers",
            "upload_id",
            "part_number",
        ],
        "_abort_multipart_upload": ["bucket_name", "object_name", "upload_id"],
        "_complete_multipart_upload": ["bucket_name", "object_name", "upload_id", "parts"],
        "_put_object": ["bucket_name", "object_name", "data", "headers", "query_params"],
        "_execute": ["method", "bucket_name", "object_name", "body", "headers", "query_params"],
    }
    for name, params in want.items():
        found = list(inspect.signature(getattr(Minio, name)).parameters)[1:]
        assert found[: len(params)] == params, (name, found)


def test_old_and_new_ids_parse_and_sort_chronologically() -> None:
    t = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)

    def obj(name: str) -> SimpleNamespace:
        return SimpleNamespace(object_name=f"p/crm/2024/05/06/{name}", size=1, last_modified=t)

    names = [
        "crm-20240506T070810Z-00aa11.manifest.json",
        "crm-20240506T070810Z-00aa11.dump.zst.gpg",
        "crm-20240506T070809Z.dump.zst.gpg",  # the old form: still read
        "crm-20240506T070809Z.manifest.json",
        "crm-20240506T070809Z-ffee22.dump.gz",  # same second as the old one
        "crm-20240506T070809Z-ffee22.manifest.json",
        "crm-20240506T070809Z-zz.dump",  # not an id of ours
        "crm2-20240506T070809Z-abcdef.dump",  # another database
    ]
    refs = catalog.parse_objects("crm", [obj(n) for n in names])
    assert [r.id for r in refs] == [
        "crm-20240506T070809Z",
        "crm-20240506T070809Z-ffee22",
        "crm-20240506T070810Z-00aa11",
    ]
    assert all(r.complete for r in refs)
    assert refs[0].taken_at == t and refs[2].taken_at == t + timedelta(seconds=1)
    new = catalog.backup_id("crm", t, catalog.new_nonce())
    assert new.startswith("crm-20240506T070809Z-") and new != catalog.backup_id("crm", t)
    assert catalog.backup_id("crm", t) == "crm-20240506T070809Z"
