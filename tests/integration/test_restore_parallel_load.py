"""A spooled restore (restore_jobs > 1) loads the data over several connections while the
object still arrives, shares the data out by size, leaves the largest table to the final
pg_restore -j unless the download is what the restore waits for, and stops every stage
when one loader fails, naming it and leaving nothing behind (issue 16).

The library is called in-process against the local stack's real servers: the download
is slowed down (small chunks, a pause each) so that "while the object still arrives"
can be observed from the sandbox's pg_stat_activity, and loaders are held back or made
to fail by a pg_restore wrapper.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opsdrill.backups import parallel_load, restore
from opsdrill.backups.catalog import BackupRef
from opsdrill.backups.manifest import Manifest
from opsdrill.backups.sandbox_guard import sandbox_endpoint
from opsdrill.backups.scratch import create_database, drop_database
from opsdrill.config.inventory import Store
from opsdrill.errors import OperationFailed
from opsdrill.pg import Endpoint
from opsdrill.pgtools import PgTools
from tests.conftest import Env

RESTORE_STAGES = {"pg_restore", "gpg", "zstd", "head", "tee", "sh"}
STREAM_SECONDS = 6.0
GB = 2**30  # how long the slowed-down download of the test's backup lasts

# ---------------------------------------------------------------------------- split_data

TOC = b"""\
;
; Archive created at 2026-12-02 12:05:11 UTC
;
3531; 2615 16386 SCHEMA - Sales Ops opsdrill
3535; 1259 16427 TABLE crm contacts opsdrill
3550; 0 16488 TABLE DATA Sales Ops Order Lines opsdrill
3548; 0 16482 TABLE DATA Sales Ops deals opsdrill
3553; 0 16504 TABLE DATA audit activity_2024_01 opsdrill
3540; 0 16452 TABLE DATA crm attachments opsdrill
3537; 0 16435 TABLE DATA crm contacts opsdrill
3779; 0 0 SEQUENCE SET Sales Ops Order Lines_id_seq opsdrill
3760; 0 0 BLOBS - BLOBS \n\
3559; 0 40660 MATERIALIZED VIEW DATA billing monthly_revenue opsdrill
3600; 1259 16500 INDEX crm contacts_email_idx opsdrill
"""
SIZES = {16488: 7, 16482: 5, 16504: 18, 16452: 100, 16435: 58}
DATA = [b"3550;", b"3548;", b"3553;", b"3540;", b"3537;", b"3760;"]


def _ids(lines: list[bytes]) -> list[bytes]:
    return [line.split(b" ", 1)[0] for line in lines]


def _data(plan: parallel_load.Plan) -> list[list[bytes]]:
    return [[i for i in _ids(lines) if i in DATA] for lines in plan.loaders]


def _every_line_once(plan: parallel_load.Plan) -> None:
    every = [line for line in TOC.splitlines() if line[:1].isdigit()]
    final = plan.final().splitlines()
    dealt = [line for lines in plan.loaders for line in lines] + final
    assert sorted(dealt) == sorted(every)
    for lines in [*plan.loaders, final]:  # each in the archive's order
        assert lines == [line for line in every if line in lines]


def test_the_data_is_dealt_out_by_size_each_list_in_archive_order() -> None:
    plan = parallel_load.split_data(TOC, 2, parallel_load.Weights(SIZES, 12))
    # attachments (100 of 200) is deferred to the final run, which loads it while it
    # builds the other tables' indexes; the rest is dealt out largest first
    assert _ids([line for _, line in plan.deferred]) == [b"3540;"]
    assert _data(plan) == [[b"3537;"], [b"3550;", b"3548;", b"3553;", b"3760;"]]
    _every_line_once(plan)
    # sequence values, post-data: the final run's
    assert {b"3540;", b"3779;", b"3559;", b"3600;"} <= set(_ids(plan.final().splitlines()))


def test_without_sizes_the_items_alternate_and_none_is_deferred() -> None:
    plan = parallel_load.split_data(TOC, 2, parallel_load.Weights({}, None))
    assert plan.deferred == []
    assert _data(plan) == [[b"3550;", b"3553;", b"3537;"], [b"3548;", b"3540;", b"3760;"]]
    _every_line_once(plan)
    # more jobs than data items: no loader without data
    many = parallel_load.split_data(TOC, 16, parallel_load.Weights(SIZES, 12))
    assert len(many.loaders) == 5 and all(len(lines) == 1 for lines in many.loaders)


def test_a_table_larger_than_all_others_together_loads_as_it_arrives() -> None:
    sizes = {16488: 7, 16482: 5, 16504: 18, 16452: 100}  # contacts has another OID now
    plan = parallel_load.split_data(TOC, 2, parallel_load.Weights(sizes, None))
    # contacts and the large objects weigh the median (12): attachments is 100 of 154
    assert plan.deferred == []
    assert _data(plan) == [[b"3540;"], [b"3550;", b"3548;", b"3553;", b"3537;", b"3760;"]]
    _every_line_once(plan)


# ---------------------------------------------------------------------------- the stack


@pytest.fixture
def scratch_target(env: Env) -> Iterator[tuple[Endpoint, str]]:
    sandbox, _ = sandbox_endpoint(env.inv, "crm")
    name = f"test_parallel_{uuid.uuid4().hex[:8]}"
    create_database(sandbox, name)
    try:
        yield sandbox, name
    finally:
        drop_database(sandbox, name)


def _backup(env: Env) -> tuple[Manifest, BackupRef]:
    manifest = env.backup()
    (ref,) = [r for r in env.refs() if r.id == manifest.id]
    return manifest, ref


def _restore_crm(
    env: Env, scratch_target: tuple[Endpoint, str], manifest: Manifest, ref: BackupRef, **kw: Any
) -> None:
    """``crm``'s backup ``ref`` restored into the scratch database, owners not kept."""
    sandbox, name = scratch_target
    restore.restore_into(
        env.inv, "crm", ref, manifest, sandbox.with_dbname(name), keep_owners=False, **kw
    )


def _stages_left() -> list[str]:
    """The restore's processes still running as children of this one (the local stack's
    servers are children too: not counted)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm, fields = raw.split(" (", 1)[1].rsplit(") ", 1)
        state, ppid = fields.split()[:2]
        if int(ppid) == os.getpid() and state != "Z" and comm in RESTORE_STAGES:
            found.append(comm)
    return found


def _wrapped_tools(env: Env, manifest: Manifest, tmp_path: Path, case: str) -> PgTools:
    """The backup's pg_restore behind a shell wrapper: ``case`` is a ``case "$arg" in``
    branch run for each argument (the real one is ``$REAL``)."""
    real = restore.restore_tools(env.inv, "crm", manifest)
    assert real.bindir is not None
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "pg_restore"
    wrapper.write_text(
        f"#!/bin/sh\nREAL={real.bindir / 'pg_restore'}\n"
        f'for arg in "$@"; do case "$arg" in\n{case}\nesac; done\nexec "$REAL" "$@"\n'
    )
    wrapper.chmod(0o755)
    return PgTools(real.major, "a test wrapper", "pg_restore", bindir=bindir)


def _contacts_largest(env: Env) -> dict[int, int]:
    """Sizes that make crm.contacts (indexes, foreign keys both ways) the largest table,
    but far from most of the data: the one split_data defers."""
    with env.stack.live_conn() as conn:
        tables = conn.execute("SELECT oid::bigint FROM pg_class WHERE relkind IN ('r', 'm')")
        oids = [oid for (oid,) in tables]
        (contacts,) = conn.execute("SELECT 'crm.contacts'::regclass::oid::bigint").fetchone() or (
            0,
        )
    return {int(oid): 3 * GB if oid == contacts else GB for oid in oids}


def _slow_download(monkeypatch: pytest.MonkeyPatch, manifest: Manifest) -> dict[str, float]:
    """The download in small chunks, paced to last STREAM_SECONDS; ``["end"]`` is when
    its last chunk was handed over."""
    arrived: dict[str, float] = {}
    real = restore._from_store
    chunk_size = 8 * 1024
    pause = STREAM_SECONDS / max(1, manifest.object["size"] // chunk_size)

    def slow(chunks: Iterator[bytes], store_name: str, store: Store) -> Iterator[bytes]:
        for chunk in real(chunks, store_name, store):
            time.sleep(pause)
            yield chunk
        arrived["end"] = time.monotonic()

    monkeypatch.setattr(restore, "CHUNK", chunk_size)
    monkeypatch.setattr(restore, "_from_store", slow)
    return arrived


def test_the_data_loads_over_two_connections_while_the_object_still_arrives(
    env: Env, scratch_target: tuple[Endpoint, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, ref = _backup(env)
    sandbox, name = scratch_target
    arrived = _slow_download(monkeypatch, manifest)
    copies: list[tuple[float, int]] = []  # (when, backend pid) of each COPY seen running
    stop = threading.Event()

    def watch() -> None:
        with sandbox.connect(autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                    "AND state = 'active' AND query LIKE 'COPY %%'",
                    (name,),
                ).fetchall()
                copies.extend((time.monotonic(), pid) for (pid,) in rows)
                time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _restore_crm(env, scratch_target, manifest, ref, jobs=2)
    finally:
        stop.set()
        watcher.join(10)
    assert restore.verify_restored(sandbox.with_dbname(name), manifest).exact
    early = {pid for when, pid in copies if when < arrived["end"]}
    assert len(early) >= 2, (copies, arrived)  # two loaders at work before the last byte


@pytest.mark.parametrize("arriving", [True, False], ids=["mid-download", "after-download"])
def test_a_failing_loader_is_named_and_every_other_stage_stops(
    env: Env,
    scratch_target: tuple[Endpoint, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arriving: bool,
) -> None:
    """The second loader dies after reading part of its stream, as one that loses its
    connection would, while the object still arrives or once it is all in: the restore
    fails naming it, with its own words; the first loader, the decompressor and the
    decryption are stopped, and the spool, the lists and the GnuPG home are gone."""
    manifest, ref = _backup(env)
    arrived = _slow_download(monkeypatch, manifest) if arriving else {}
    tools = _wrapped_tools(
        env,
        manifest,
        tmp_path,
        "--use-list=*/data-2.list)\n  head -c 65536 >/dev/null\n"
        '  echo "pg_restore: error: injected: the connection to the server was lost" >&2\n'
        "  exit 1;;",
    )
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_tmp))
    with pytest.raises(OperationFailed) as info:
        _restore_crm(env, scratch_target, manifest, ref, jobs=2, tools=tools)
    assert info.value.stage == "pg_restore (data 2/2)", info.value
    # slowed down, the failure came first; the object was still read to its end, as the
    # verdict on its integrity needs
    assert ("end" in arrived) == arriving
    assert "injected: the connection to the server was lost" in info.value.message
    assert _stages_left() == []
    assert list(scratch_tmp.iterdir()) == []


def _record_deferred(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[int]]:
    """The loaders started (by stage name), and how many items were left to the final
    run once they were done."""
    started: list[str] = []
    left: list[int] = []
    start, finish = parallel_load.Loaders._start, parallel_load.Loaders.finish

    def recording_start(self: parallel_load.Loaders, name: str, *args: Any, **kw: Any) -> Any:
        started.append(name)
        return start(self, name, *args, **kw)

    def recording_finish(self: parallel_load.Loaders) -> None:
        finish(self)
        left.append(len(self.plan.deferred))

    monkeypatch.setattr(parallel_load.Loaders, "_start", recording_start)
    monkeypatch.setattr(parallel_load.Loaders, "finish", recording_finish)
    return started, left


def test_the_largest_table_loads_in_the_final_run_when_the_download_is_ahead(
    env: Env, scratch_target: tuple[Endpoint, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loaders are slower than the download (held 2 s here): the largest table
    waits for the final pg_restore -j, which loads it while it builds the other tables'
    indexes and foreign keys, and its own after it; the restore is exact."""
    manifest, ref = _backup(env)
    sandbox, name = scratch_target
    tools = _wrapped_tools(
        env,
        manifest,
        tmp_path,
        '--use-list=*/data-[0-9]*.list) "$REAL" "$@"; rc=$?; sleep 2; exit $rc;;',
    )
    started, left = _record_deferred(monkeypatch)
    _restore_crm(
        env, scratch_target, manifest, ref, jobs=2, tools=tools, sizes=_contacts_largest(env)
    )
    assert left == [1] and "pg_restore (data, largest table)" not in started
    assert restore.verify_restored(sandbox.with_dbname(name), manifest).exact


def test_the_largest_table_loads_as_it_arrives_when_the_download_is_behind(
    env: Env, scratch_target: tuple[Endpoint, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader done while the object still arrives: waiting for the download would
    only delay the largest table, so it gets a loader of its own at once."""
    manifest, ref = _backup(env)
    sandbox, name = scratch_target
    _slow_download(monkeypatch, manifest)
    started, left = _record_deferred(monkeypatch)
    _restore_crm(env, scratch_target, manifest, ref, jobs=2, sizes=_contacts_largest(env))
    assert left == [0] and "pg_restore (data, largest table)" in started
    assert restore.verify_restored(sandbox.with_dbname(name), manifest).exact


def test_a_restore_with_more_jobs_than_tables_restores_exactly(
    env: Env, scratch_target: tuple[Endpoint, str]
) -> None:
    manifest, ref = _backup(env)
    sandbox, name = scratch_target
    _restore_crm(env, scratch_target, manifest, ref, jobs=64, sizes=_contacts_largest(env))
    assert restore.verify_restored(sandbox.with_dbname(name), manifest).exact
