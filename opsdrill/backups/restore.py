"""``opsdrill restore``: fetch, verify, decrypt, decompress, pg_restore; and the drill.

The object streams from S3 through Python (hashing it) into ``gpg | zstd``. With 1 job,
zstd feeds one ``pg_restore`` and nothing touches local disk. With ``restore_jobs`` N > 1,
zstd writes the decompressed dump into a spool file (0600, in the run's private
directory) and the data loads over N connections while the object still arrives: a
thread per ``pg_restore`` copies the growing spool into its stdin (``Spool``, in
``opsdrill.backups.parallel_load`` with the loaders). The table
of contents (``pg_restore -l``) and the schema (pre-data) come from the spool's head;
then N ``pg_restore --section=data -L list_i`` restore their share of the table data,
dealt out by size (``split_data``), each skipping the rest of the stream. A final
``pg_restore -j N`` on the complete spool, which it needs seekable, restores the rest:
the sequence values, the post-data section (indexes, constraints) and, when sizes are
known, the largest table, which it loads while it builds the others' indexes. The sha256
is compared with the manifest before a restore is declared good, and before any stage's
failure is named: a corrupt object explains a failing stage better than the stage does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from opsdrill import pgtools, workspace
from opsdrill.backups import catalog
from opsdrill.backups.catalog import BackupRef
from opsdrill.backups.manifest import Comparison, Manifest, compare
from opsdrill.backups.parallel_load import Loaders, Spool, Weights
from opsdrill.backups.pgstats import collect_stats
from opsdrill.config.inventory import Inventory, Store
from opsdrill.errors import (
    ConfigError,
    OperationFailed,
)
from opsdrill.gpg import GpgHome, import_drill_key
from opsdrill.pg import Endpoint
from opsdrill.pipeline import Pipeline, Stage
from opsdrill.progress import Progress
from opsdrill.s3 import S3_ERRORS, client, store_call, unreachable

CHUNK = 1024 * 1024
DECOMPRESS = {"zstd": ["zstd", "-d", "-q", "-c"], "gzip": ["gzip", "-d", "-c"]}
AGENT_CONF = "s2k-count 65536\n"  # the restore's throwaway GnuPG home: see _import_drill_key
RESTORE_WAIT_SECONDS = 24 * 3600


@dataclass
class RestoreResult:
    backup_id: str
    target: str
    bytes_fetched: int
    seconds: float


def pick_backup(inv: Inventory, name: str, backup_id: str | None) -> tuple[BackupRef, Manifest]:
    store_name, store = inv.store_for(name)
    s3 = client(inv, store)
    refs = store_call(store_name, store, catalog.list_backups, s3, store, name)
    if backup_id:
        matches = [r for r in refs if r.id == backup_id]
        if not matches:
            raise ConfigError(f"no backup {backup_id!r} for {name} in store {store_name}")
        ref = matches[0]
        if not ref.complete:
            raise OperationFailed("select", f"backup {backup_id} is incomplete (no manifest)")
    else:
        found = catalog.latest_complete(refs)
        if found is None:
            raise OperationFailed("select", f"no complete backup of {name} in store {store_name}")
        ref = found
    return ref, store_call(store_name, store, catalog.read_manifest, s3, store, ref)


def restore_tools(inv: Inventory, name: str, manifest: Manifest) -> pgtools.PgTools:
    """pg_restore of the backup's major or newer: the larger of its server's major and
    the major of the pg_dump that wrote the archive (a pg_restore cannot read an archive
    of a newer pg_dump). Chosen before anything is created (ConfigError, exit 2)."""
    server = pgtools.major_of(manifest.server.get("version_num"))
    archive = pgtools.major_of_version(str(manifest.tools.get("pg_dump", "")))
    if archive is not None and (server is None or archive > server):
        why = f"the pg_dump that wrote backup {manifest.id} ({manifest.tools['pg_dump']})"
        wanted: int | None = archive
    else:
        why, wanted = f"the server of backup {manifest.id}", server
    return pgtools.for_database(inv, name, wanted, "pg_restore", why=why)


def restore_into(
    inv: Inventory,
    name: str,
    ref: BackupRef,
    manifest: Manifest,
    target: Endpoint,
    *,
    jobs: int,
    keep_owners: bool,
    progress: Progress | None = None,
    tools: pgtools.PgTools | None = None,
    sizes: Mapping[int, int] | None = None,
) -> RestoreResult:
    """Restore one backup into ``target`` (an existing, empty database) with ``tools``
    (by default: ``restore_tools``). ``sizes``: bytes per table OID of the backed-up
    server (a drill passes the live tables' sizes); only used to share the data out
    evenly between the ``jobs`` loaders."""
    tools = tools or restore_tools(inv, name, manifest)
    try:
        return _restore_into(
            inv, name, ref, manifest, target, jobs, keep_owners, progress, tools, sizes or {}
        )
    finally:
        tools.close()


def _restore_into(
    inv: Inventory,
    name: str,
    ref: BackupRef,
    manifest: Manifest,
    target: Endpoint,
    jobs: int,
    keep_owners: bool,
    progress: Progress | None,
    tools: pgtools.PgTools,
    sizes: Mapping[int, int],
) -> RestoreResult:
    store_name, store = inv.store_for(name)
    s3 = client(inv, store)
    progress = progress or Progress(f"restore {ref.id}")
    started = time.monotonic()
    # The run's private directory (0700) holds the GnuPG home and the spool (0600); the
    # spool, a plaintext dump, goes as soon as pg_restore is done with it.
    with workspace.run("restore") as ws, GpgHome() as home:
        spool = ws.new_file(f"spool-{ref.id}.dump") if jobs > 1 else None
        try:
            stages, pass_r, options = _stages(
                inv, manifest, target, home, keep_owners, spool, tools
            )
            if spool is None:
                fetched = _stream_object(
                    s3, (store_name, store), ref, manifest, stages, progress, pass_r
                )
            else:
                weights = Weights(sizes, manifest.large_objects.get("bytes"))
                loaders = Loaders(Spool(spool), ws, tools, target, options, jobs, weights)
                try:
                    with spool.open("wb") as sink:
                        fetched = _stream_object(
                            s3,
                            (store_name, store),
                            ref,
                            manifest,
                            stages,
                            progress,
                            pass_r,
                            sink=sink,
                            loaders=loaders,
                        )
                    progress.set_stage(f"pg_restore data over {jobs} connections")
                    loaders.finish()
                finally:
                    loaders.close()
                # the rest: the deferred largest table, sequence values, indexes and
                # constraints, with pg_restore's own scheduling, from the whole spool
                plan = loaders.plan
                final = ws.new_file("final.list")
                final.write_bytes(plan.final())
                what = "indexes and constraints"
                if plan.deferred:
                    what = f"largest table, {what}"
                progress.set_stage(f"pg_restore -j{jobs} {what}")
                env = target.libpq_env()
                pipe = Pipeline(
                    [
                        Stage(
                            f"pg_restore ({what})",
                            [
                                *tools.argv("pg_restore", env, files=(spool, final)),
                                *options,
                                f"--jobs={jobs}",
                                "--section=data",
                                "--section=post-data",
                                f"--use-list={final}",
                                str(spool),
                            ],
                            env=env,
                        )
                    ]
                )
                try:
                    pipe.wait(timeout=RESTORE_WAIT_SECONDS)
                finally:
                    pipe.close()
        except OperationFailed as exc:
            full = _full_disk(exc, spool, name)
            if full is None:
                raise
            raise full from None
        finally:
            if spool is not None:
                spool.unlink(missing_ok=True)
        progress.done()
    return RestoreResult(ref.id, target.where, fetched, time.monotonic() - started)


def _stages(
    inv: Inventory,
    manifest: Manifest,
    target: Endpoint,
    home: GpgHome,
    keep_owners: bool,
    spool: Path | None,
    tools: pgtools.PgTools,
) -> tuple[list[Stage], int | None, list[str]]:
    """decrypt | decompress [| pg_restore]; the passphrase pipe; pg_restore's options.
    With a spool, the decompressor writes it and ``Loaders`` restore from it."""
    stages: list[Stage] = []
    pass_r: int | None = None
    if manifest.object.get("encrypted"):
        pass_r = _import_drill_key(inv, home)
        stages.append(Stage("decrypt (gpg)", home.decrypt_argv(pass_r), pass_fds=(pass_r,)))
    compression = manifest.object["compression"]
    stages.append(Stage(f"decompress ({compression})", DECOMPRESS[compression]))
    options = [
        "--exit-on-error",
        "--no-password",
        f"--dbname={target.dbname}",
    ]
    if not keep_owners:
        options += ["--no-owner", "--no-privileges"]
    if spool is None:
        env = target.libpq_env()
        restore_argv = [*tools.argv("pg_restore", env, stdin=True), *options]
        stages.append(Stage("pg_restore", restore_argv, env=env))
    return stages, pass_r, options


def _full_disk(exc: OperationFailed, spool: Path | None, name: str) -> OperationFailed | None:
    """A stage that ran out of room for the spool, said with where and what to do."""
    if spool is None or "no space left on device" not in exc.message.lower():
        return None
    return OperationFailed(
        exc.stage,
        f"{exc.message.removeprefix(exc.stage + ': ')}: the restore spool {spool} (in "
        f"TMPDIR={tempfile.gettempdir()}) is on a full filesystem ({_filesystem(spool)}) "
        "(fix: free space there, set TMPDIR to a filesystem with room for the decompressed "
        f"dump, or set databases.{name}.restore_jobs = 1 to restore without a spool)",
    )


def _filesystem(path: Path) -> str:
    """The mount point ``path`` is on, with its free space."""
    mount = path.resolve()
    with contextlib.suppress(OSError):
        dev = os.stat(mount).st_dev
        while mount != mount.parent and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
        st = os.statvfs(path)
        free, size = st.f_bavail * st.f_frsize / 2**20, st.f_blocks * st.f_frsize / 2**20
        return f"{mount}: {free:.1f} MiB free of {size:.1f} MiB"
    return str(mount)


def _import_drill_key(inv: Inventory, home: GpgHome) -> int:
    """Import the drill key and prove its passphrase before anything is downloaded (a
    wrong one is ``CredentialsRejected``, exit 2); return a pipe holding it for gpg.

    gpg-agent re-protects an imported secret key with a passphrase KDF it calibrates for
    a long-lived keyring: measured here, 1.2 CPU-s on the proof and 0.3 to 1 s more when
    the decryption unlocks it again, all before the first byte flows. This home lives
    for one run in the run's 0700 directory, and whoever can read it can read the
    passphrase's variable too: the minimal count (``AGENT_CONF``) guards it as well."""
    with contextlib.suppress(OSError):  # only slower without it
        (home.path / "gpg-agent.conf").write_text(AGENT_CONF)
    _, _, passphrase = import_drill_key(home, inv)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, passphrase.encode() + b"\n")  # far below the pipe buffer size
    os.close(write_fd)
    return read_fd


def _stream_object(
    s3: Any,
    where: tuple[str, Store],
    ref: BackupRef,
    manifest: Manifest,
    stages: list[Stage],
    progress: Progress,
    pass_r: int | None,
    *,
    sink: IO[bytes] | None = None,
    loaders: Loaders | None = None,
) -> int:
    """Download the object into the stages (the last one writing ``sink``, or its own
    pg_restore), hashing it. With ``loaders``: when a stage or a loader fails, the stages
    and loaders stop at once, but the rest of the object is still read and hashed, so
    that a corrupt or truncated object is named rather than the stage it derailed."""
    import hashlib

    assert ref.data_key is not None
    store_name, store = where
    digest = hashlib.sha256()
    size = 0
    pipe = Pipeline(
        stages, stdin=subprocess.PIPE, stdout=sink if sink is not None else subprocess.DEVNULL
    )
    if pass_r is not None:
        os.close(pass_r)
    halted = False
    try:
        response = store_call(store_name, store, s3.get_object, store.bucket, ref.data_key)
        feed = pipe.procs[0].stdin
        assert feed is not None
        feeding = True
        try:
            for chunk in _from_store(response.stream(CHUNK), store_name, store):
                digest.update(chunk)
                size += len(chunk)
                progress.add(len(chunk))
                if loaders is not None and feeding and loaders.failed.is_set():
                    halted, feeding = True, False
                    pipe.kill()
                if not feeding:
                    continue
                try:
                    feed.write(chunk)
                except BrokenPipeError:
                    if loaders is None:
                        break  # a stage died; pipe.wait() below names it
                    feeding = False  # read on: the object's integrity decides the verdict
        finally:
            response.close()
            response.release_conn()
            with contextlib.suppress(BrokenPipeError):
                feed.close()
        integrity = _integrity_error(manifest, size, digest.hexdigest())
        if halted:
            assert loaders is not None and loaders.error is not None
            if integrity:
                raise OperationFailed("verify", integrity) from loaders.error
            raise loaders.error
        try:
            pipe.wait(timeout=RESTORE_WAIT_SECONDS)
        except OperationFailed as exc:
            if integrity:  # a corrupt object explains the stage failure better
                raise OperationFailed("verify", integrity) from exc
            if exc.stage.startswith("decrypt") and "secret key" in exc.message.lower():
                # The passphrase was proven on import: the backup is not for this key.
                raise OperationFailed(
                    exc.stage,
                    f"{exc.message.split(': ', 1)[-1]} (the backup was encrypted to recipients "
                    f"{', '.join(manifest.object.get('recipients') or []) or 'unknown'} and "
                    "the drill key in gpg.drill_private_key_file is none of them)",
                ) from exc
            raise
        if integrity:
            raise OperationFailed("verify", integrity)
    finally:
        pipe.close()
    return size


def _from_store(chunks: Iterator[bytes], store_name: str, store: Store) -> Iterator[bytes]:
    """The download's chunks; a store that goes away mid-download is ``unreachable`` (exit
    2), not a fault of the object. Errors of the consumer (a dead stage) are not caught."""
    try:
        yield from chunks
    except S3_ERRORS as exc:
        raise unreachable(store_name, store, exc) from None


def _integrity_error(manifest: Manifest, size: int, sha256: str) -> str | None:
    want_size, want_sha = manifest.object["size"], manifest.object["sha256"]
    if size != want_size:
        return f"object is {size} bytes, manifest says {want_size} (truncated or replaced)"
    if sha256 != want_sha:
        return f"object sha256 {sha256[:16]}... differs from manifest {want_sha[:16]}..."
    return None


def verify_restored(target: Endpoint, manifest: Manifest) -> Comparison:
    """Count (and hash, if the manifest has hashes) the restored database; compare."""
    hashes = any("content_hash" in t for t in manifest.tables.values())
    with target.connect(autocommit=True) as conn:
        restored = collect_stats(conn, hashes, column_extremes=True)
    return compare(manifest, restored)
