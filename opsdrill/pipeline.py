"""A chain of processes connected by OS pipes (``pg_dump | zstd | gpg``).

Bytes flow kernel-to-kernel between stages; Python only reads the last stage's output
(hashing it on the way to S3), so memory stays flat whatever the size. The reader refuses
to report end-of-stream until every stage has exited 0: a consumer such as a multipart
upload therefore sees an exception instead of a clean EOF, and aborts, when any stage
failed. That is what keeps a broken backup from ever looking complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import select
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from opsdrill.errors import ConfigError, OperationFailed
from opsdrill.redact import redact

STAGE_WAIT_SECONDS = 120
# How long the main thread may sit in one blocking read of a pipeline before it runs the
# Python signal handlers (see HashingReader.read).
SIGNAL_CHECK_SECONDS = 0.5
# Linux pipes default to 64 KiB; 1 MiB (the unprivileged maximum) lets each stage write in
# big chunks and cuts context switches, which matters when every core is already busy.
PIPE_BYTES = 1024 * 1024
# What is kept of each stage's stderr: its last words are the ones that explain a failure.
STDERR_TAIL = 8192
# Children create private files (the restore spool, gpg's keyrings): a plaintext dump must
# never be readable by other users, whatever umask cron or systemd started us with.
CHILD_UMASK = 0o077


def _widen(pipe: Any) -> None:
    """Best effort: a smaller pipe is only slower, never wrong."""
    if pipe is not None and hasattr(pipe, "fileno"):
        with contextlib.suppress(OSError, ValueError):
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


class _StderrTail:
    """A stage's stderr, drained from a pipe by a thread that keeps the last STDERR_TAIL
    bytes. Nothing touches the disk, so a full disk is reported in the tool's own words
    instead of vanishing with its capture file; memory stays bounded whatever a tool
    writes, and a chatty tool never blocks on a full pipe."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._drain, name=f"opsdrill-stderr-{name}", daemon=True
        )
        self._thread.start()

    def _drain(self) -> None:
        try:
            while chunk := os.read(self._fd, 65536):
                with self._lock:
                    self._buf += chunk
                    if len(self._buf) > 2 * STDERR_TAIL:
                        del self._buf[:-STDERR_TAIL]
        except OSError:
            pass
        finally:
            os.close(self._fd)

    def text(self, wait: float) -> str:
        """What was written, once the writer closed its end (or ``wait`` seconds passed:
        a daemon the tool started may hold the pipe open)."""
        self._thread.join(wait)
        with self._lock:
            return bytes(self._buf[-STDERR_TAIL:]).decode(errors="replace")


@dataclass
class Stage:
    name: str
    argv: list[str]
    env: dict[str, str] | None = field(default=None, repr=False)
    pass_fds: tuple[int, ...] = ()
    # exit codes that still mean success (e.g. none); anything else fails the stage
    ok_codes: tuple[int, ...] = (0,)


class Pipeline:
    """Start stages; ``stdin`` feeds the first (bytes source or file object), stdout is ours."""

    def __init__(
        self,
        stages: Sequence[Stage],
        stdin: int | IO[bytes] | None = None,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
    ) -> None:
        self.stages = list(stages)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._errs: list[_StderrTail] = []
        prev: Any = stdin if stdin is not None else subprocess.DEVNULL
        try:
            for i, stage in enumerate(self.stages):
                last = i == len(self.stages) - 1
                err_r, err_w = os.pipe()
                try:
                    proc = subprocess.Popen(
                        stage.argv,
                        stdin=prev,
                        stdout=stdout if last else subprocess.PIPE,
                        stderr=err_w,
                        env=stage.env,
                        pass_fds=stage.pass_fds,
                        start_new_session=True,
                        umask=CHILD_UMASK,
                    )
                except BaseException:
                    os.close(err_r)
                    raise
                finally:
                    os.close(err_w)  # the child holds it: EOF when the stage is done
                self._errs.append(_StderrTail(err_r, stage.name))
                if i > 0 and prev is not None and hasattr(prev, "close"):
                    prev.close()  # the child holds it now; keep no copy so EOF propagates
                if i == 0:
                    _widen(proc.stdin)
                _widen(proc.stdout)
                prev = proc.stdout
                self.procs.append(proc)
        except FileNotFoundError:
            self.kill()
            # a tool that is not installed is this host's setup, not the data: exit 2
            raise ConfigError(
                f"{stage.name}: {stage.argv[0]} is not installed or not on PATH "
                "(fix: install it; scripts/bootstrap-system.sh lists the packages)"
            ) from None
        except OSError as exc:
            self.kill()
            raise OperationFailed(
                stage.name, f"cannot start {stage.argv[0]}: {exc.strerror}"
            ) from None

    @property
    def stdout(self) -> IO[bytes]:
        out = self.procs[-1].stdout
        assert out is not None
        return out

    def stderr_of(self, index: int, limit: int = 2000) -> str:
        finished = self.procs[index].poll() is not None
        text = self._errs[index].text(wait=2.0 if finished else 0.0).strip()
        return redact(text[-limit:])

    def wait(self, timeout: float = STAGE_WAIT_SECONDS) -> None:
        """Wait for every stage; raise OperationFailed naming the first stage that failed."""
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.check()

    def check(self) -> None:
        """Raise for the stage that caused a failure, not the ones it took down with it.

        When gpg dies, zstd and pg_dump then fail writing into a closed pipe; those are
        victims (SIGPIPE or "Broken pipe"), and naming them would send the operator to the
        wrong stage. The culprit is the first failed stage that is not a victim.
        """
        failed = []
        for i, (stage, proc) in enumerate(zip(self.stages, self.procs, strict=True)):
            code = proc.poll()
            if code is None or code not in stage.ok_codes:
                failed.append((i, stage, proc, code))
        if not failed:
            return

        def victim(i: int, code: int | None) -> bool:
            sigpipe = code in (-signal.SIGPIPE, 128 + signal.SIGPIPE)  # killed, or via a shell
            return sigpipe or "broken pipe" in self.stderr_of(i).lower()

        culprits = [f for f in failed if not victim(f[0], f[3])] or failed[-1:]
        i, stage, proc, code = culprits[0]
        detail = self.stderr_of(i) or "no error output"
        status = "did not finish" if code is None else f"exited {code}"
        raise OperationFailed(stage.name, f"{stage.argv[0]} {status}: {detail}")

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, 9)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        for proc in self.procs:
            if proc.stdout:
                proc.stdout.close()


class HashingReader(io.RawIOBase):
    """Reads a pipeline's output, hashing and counting; EOF only once every stage succeeded."""

    def __init__(
        self,
        pipeline: Pipeline,
        on_bytes: Callable[[int], None] | None = None,
        before_eof: Callable[[], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.on_bytes = on_bytes
        self.before_eof = before_eof
        self.finished = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._next_chunk(size if size and size > 0 else 1024 * 1024)
        if chunk:
            self.sha256.update(chunk)
            self.size += len(chunk)
            if self.on_bytes:
                self.on_bytes(len(chunk))
            return chunk
        if not self.finished:
            self.pipeline.wait()
            if self.before_eof:
                self.before_eof()
            self.finished = True
        return b""

    def _next_chunk(self, size: int) -> bytes:
        """Up to ``size`` bytes as soon as any are there, waiting at most
        SIGNAL_CHECK_SECONDS at a time. A SIGTERM may be delivered to any thread of the
        process (the upload's part workers, the stderr drains): the main thread, stuck in
        one read() of a stalled stage, would then never run the handler that turns it into
        ``Interrupted``, and the run would hang instead of cleaning up. Between waits the
        interpreter runs pending handlers."""
        fd = self.pipeline.stdout.fileno()
        while not select.select([fd], [], [], SIGNAL_CHECK_SECONDS)[0]:
            pass
        return os.read(fd, size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
