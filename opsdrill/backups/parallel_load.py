"""The data section of a restore over N connections while the dump still arrives (see
``opsdrill.backups.restore``): the growing spool (``Spool``) that followers copy into each
loader's stdin, the table data dealt out by size (``split_data``) and the loaders that
restore their share and are stopped together when one fails (``Loaders``)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from opsdrill import pgtools
from opsdrill.pg import Endpoint
from opsdrill.pipeline import Pipeline, Stage
from opsdrill.workspace import Workspace

# A follower copies the spool into a loader's pipe in pieces of this size; when it has
# caught up with the writer it looks again after a pause that doubles up to the maximum.
FOLLOW_BYTES = 1024 * 1024
FOLLOW_PAUSE_MAX = 0.05
POLL_SECONDS = 0.02  # how often the loaders' exit codes are looked at
# Loaders all waiting for the download this long: it, not they, sets the pace (Loaders).
STARVED_SECONDS = 0.25


class Spool:
    """The decompressed dump the last stage is writing, followed by readers: each gets a
    thread that copies the file into a pipe as it grows (``os.sendfile``: the bytes go
    from the page cache to the pipe without passing through Python). A follower sends
    EOF only once the writer finished and the object was verified (``end(True)``); after
    a failure it stops without, so no reader ever takes a cut-short dump for a whole one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ended = threading.Event()
        self._complete = False
        self._threads: list[threading.Thread] = []

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def end(self, complete: bool) -> None:
        if not self._ended.is_set():
            self._complete = complete
            self._ended.set()

    def follow(self, sink: IO[bytes]) -> _Follower:
        follower = _Follower()
        thread = threading.Thread(
            target=self._copy, args=(sink, follower), name="opsdrill-spool-follower", daemon=True
        )
        thread.start()
        self._threads.append(thread)
        return follower

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _copy(self, sink: IO[bytes], follower: _Follower) -> None:
        out = sink.fileno()
        fd = os.open(self.path, os.O_RDONLY)
        offset, pause, finished = 0, 0.001, False
        try:
            while True:
                ended = self._ended.is_set()  # before the size: then the size is final
                if ended and not self._complete:
                    return
                size = os.fstat(fd).st_size
                if offset < size:
                    sent = _send(out, fd, offset, min(size - offset, FOLLOW_BYTES))
                    if sent:
                        offset, pause = offset + sent, 0.001
                        follower.waiting_since = None
                        continue
                if ended:
                    finished = True
                    return
                if follower.waiting_since is None:
                    follower.waiting_since = time.monotonic()
                self._ended.wait(pause)
                pause = min(pause * 2, FOLLOW_PAUSE_MAX)
        except OSError:  # EPIPE: the reader needs no more (or was stopped)
            finished = True
        finally:
            os.close(fd)
            if finished:  # else the reader is killed first: no EOF that looks complete
                with contextlib.suppress(OSError):
                    sink.close()


@dataclass
class _Follower:
    """Since when a follower has been waiting for the writer (None: it is not): a reader
    that keeps up with the download is waiting for it, not the other way round."""

    waiting_since: float | None = None


def _send(out: int, fd: int, offset: int, count: int) -> int:
    """Copy ``count`` bytes of ``fd`` at ``offset`` into ``out``; a kernel without
    sendfile into a pipe gets a plain read and write."""
    try:
        return os.sendfile(out, fd, offset, count)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    return os.write(out, os.pread(fd, count, offset))


# One line of ``pg_restore -l``: "dumpId; tableoid oid desc namespace tag owner".
_TOC_LINE = re.compile(rb"^(\d+); (\d+) (\d+) (.*)$")


@dataclass
class Weights:
    """What the data items weigh: table data by its table's OID (``sizes``), the large
    objects by the manifest's total; unknown tables weigh the median of the known."""

    sizes: Mapping[int, int]
    large_objects: int | None


@dataclass
class Plan:
    """Who restores what of ``pg_restore -l``'s lines (each line exactly once)."""

    loaders: list[list[bytes]]  # one list per streamed loader: table data, large objects
    deferred: list[tuple[int, bytes]]  # the largest data item (see split_data), by position
    rest: list[tuple[int, bytes]]  # everything else, by position: the final run's

    def final(self) -> bytes:
        """The final run's list, in archive order: what is deferred, and the rest."""
        return b"".join(line + b"\n" for _, line in sorted(self.deferred + self.rest))


def split_data(toc: bytes, jobs: int, weights: Weights) -> Plan:
    """Deal the data items of ``pg_restore -l`` output out to at most ``jobs`` streamed
    loaders, largest first onto the lightest, each list in archive order (a stream cannot
    be read out of order).

    The largest item is deferred when its size is known and it is not most of the data:
    the final ``pg_restore -j`` then loads it while it builds the other tables' indexes
    and constraints, as a restore from a local file does (measured: 0.3 to 1.4 s off a
    6 s drill of the 512 MB demo). A table larger than all the others together is loaded
    as it arrives instead: the others would wait for it either way. Every other line
    (sequence values, any data item of a kind not known here, the post-data section)
    goes to the final run, which restores the data and post-data sections of its list:
    nothing is restored twice or lost."""
    weighed: list[tuple[int, int | None, bytes]] = []
    rest: list[tuple[int, bytes]] = []
    blobs: list[tuple[int, bytes]] = []  # one item, or (PostgreSQL 17) one per batch
    for pos, line in enumerate(toc.splitlines()):
        found = _TOC_LINE.match(line)
        if found is None:
            continue  # a comment or a blank line
        kind = found[4]
        if kind.startswith(b"TABLE DATA "):
            weighed.append((pos, weights.sizes.get(int(found[3])), line))
        elif kind.startswith((b"BLOBS ", b"LARGE OBJECTS ")):
            blobs.append((pos, line))
        else:
            rest.append((pos, line))
    each = None if weights.large_objects is None else weights.large_objects // max(1, len(blobs))
    weighed += [(pos, each, line) for pos, line in blobs]
    known = [w for _, w, _ in weighed if w is not None]
    default = int(statistics.median(known)) if known else 1
    order = sorted(
        ((pos, default if w is None else w, w is not None, line) for pos, w, line in weighed),
        key=lambda item: (-item[1], item[0]),
    )
    deferred: list[tuple[int, bytes]] = []
    if len(order) > 1 and order[0][2] and order[0][1] * 2 <= sum(w for _, w, _, _ in order):
        pos, _, _, line = order.pop(0)
        deferred.append((pos, line))
    lists: list[list[tuple[int, bytes]]] = [[] for _ in range(jobs)]
    loads = [0] * jobs
    for pos, weight, _, line in order:
        i = min(range(jobs), key=lambda j: (loads[j], j))
        loads[i] += weight
        lists[i].append((pos, line))
    return Plan([[line for _, line in sorted(items)] for items in lists if items], deferred, rest)


class _Stopped(Exception):
    """The loaders were closed while starting or waiting: nothing to report."""


class Loaders:
    """The pg_restore runs of a spooled restore, started by a thread of their own while
    the main thread downloads: the table of contents and the schema from the head of the
    spool, then one data loader per list. The first failure kills the others, sets
    ``failed`` and is kept (``error``) for the main thread to raise once the object's
    integrity is known."""

    def __init__(
        self,
        spool: Spool,
        ws: Workspace,
        tools: pgtools.PgTools,
        target: Endpoint,
        options: list[str],
        jobs: int,
        weights: Weights,
    ) -> None:
        self.spool = spool
        self.failed = threading.Event()
        self.error: BaseException | None = None
        self._ws, self._tools, self._target = ws, tools, target
        self._options, self._jobs, self._weights = options, jobs, weights
        self.plan = Plan([], [], [])
        self._pipes: list[Pipeline] = []
        self._followers: dict[Pipeline, _Follower] = {}
        self._loading: list[Pipeline] = []  # the data loaders
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opsdrill-loaders", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """The object is verified: let the loaders read to its end, wait for them, and
        raise the first failure."""
        self.spool.end(True)
        while not self._done.wait(1.0):
            pass
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop whatever still runs (every exit path: a failure, a signal)."""
        with self._lock:
            self._stopping.set()
            pipes = list(self._pipes)
        self.spool.end(False)
        for pipe in pipes:
            pipe.close()
            for proc in pipe.procs:
                if proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
        self._thread.join(30)
        self.spool.join(10)

    def _run(self) -> None:
        try:
            toc = self._ws.new_file("toc.list")
            with toc.open("wb") as fh:
                lister = self._start("pg_restore (table of contents)", ["--list"], fh)
            schema = self._start("pg_restore (schema)", [*self._options, "--section=pre-data"])
            self._wait([lister, schema])
            self.plan = split_data(toc.read_bytes(), self._jobs, self._weights)
            count = len(self.plan.loaders)
            loaders = [
                self._load(f"pg_restore (data {i}/{count})", lines, f"data-{i}.list")
                for i, lines in enumerate(self.plan.loaders, 1)
            ]
            self._wait(loaders, self._stream_deferred)
        except _Stopped:
            pass
        except BaseException as exc:  # kept for the main thread, which names it
            self.error = exc
            self.failed.set()
            with self._lock:
                pipes = list(self._pipes)
            for pipe in pipes:
                pipe.kill()
        finally:
            self._done.set()

    def _stream_deferred(self) -> Pipeline | None:
        """The loaders keep up with the object as it arrives (each done, or waiting for
        the writer for STARVED_SECONDS): the download is what the restore waits for, so
        the deferred item loads as it arrives, in a loader of its own, rather than after
        the download."""
        if not self.plan.deferred or self.spool.ended:
            return None
        now = time.monotonic()
        for pipe in self._loading:
            if pipe.procs[0].poll() is None:
                since = self._followers[pipe].waiting_since
                if since is None or now - since < STARVED_SECONDS:
                    return None
        lines, self.plan.deferred = [line for _, line in self.plan.deferred], []
        return self._load("pg_restore (data, largest table)", lines, "data-largest.list")

    def _load(self, name: str, lines: list[bytes], list_name: str) -> Pipeline:
        path = self._ws.new_file(list_name)
        path.write_bytes(b"\n".join(lines) + b"\n")
        args = [*self._options, "--section=data", f"--use-list={path}"]
        pipe = self._start(name, args, files=(path,))
        self._loading.append(pipe)
        return pipe

    def _start(
        self,
        name: str,
        args: list[str],
        stdout: int | IO[bytes] = subprocess.DEVNULL,
        files: tuple[Path, ...] = (),
    ) -> Pipeline:
        env = self._target.libpq_env()
        argv = [*self._tools.argv("pg_restore", env, stdin=True, files=files), *args]
        with self._lock:
            if self._stopping.is_set():
                raise _Stopped
            pipe = Pipeline([Stage(name, argv, env=env)], stdin=subprocess.PIPE, stdout=stdout)
            self._pipes.append(pipe)
        sink = pipe.procs[0].stdin
        assert sink is not None
        self._followers[pipe] = self.spool.follow(sink)
        return pipe

    def _wait(
        self, pipes: list[Pipeline], more: Callable[[], Pipeline | None] | None = None
    ) -> None:
        """Until each has exited 0; the first that did not is raised (``Pipeline.check``
        names it with its last words). ``more``, asked at every look, may start one more
        to wait for."""
        pipes = list(pipes)
        while True:
            running = False
            for pipe in pipes:
                code = pipe.procs[0].poll()
                if code is None:
                    running = True
                elif code not in pipe.stages[0].ok_codes:
                    if self._stopping.is_set():
                        raise _Stopped  # killed by close(): not a failure of its own
                    pipe.check()
            if more is not None and (started := more()) is not None:
                pipes.append(started)
                continue
            if not running:
                return
            if self._stopping.wait(POLL_SECONDS):
                raise _Stopped
