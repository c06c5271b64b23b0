"""The lifecycle every server of the local stack shares, and the files they keep.

A ``Daemon`` is a process the stack started on 127.0.0.1: ``name``, ``base`` (its
directory), the ``port`` it listens on (0 for a unix socket) and the ``pid`` to stop. The
stack records those four in ``stack.json`` and rebuilds a daemon from them in any process
(``cls(name, base, port=..., pid=...)``), so ``opsdrill stack down`` from another shell
stops exactly what ``up`` started; anything else a daemon must find again (socket paths,
a second port) is in ``base/settings.json`` (``save_settings``: paths and ports, never a
secret).

A subclass writes its ``conf``, then ``spawn``s the process (its own session, so a stop
reaches its children; output appended to ``logfile``) and ``wait``s until its
readiness probe answers or the process exits: a timeout or an interrupt stops it, an exit
is an error carrying the log's tail (``exited``). ``stop`` sends SIGTERM to the process
group and SIGKILL after ``stop_grace``; ``status`` is running or stopped (a zombie is
stopped). ``version`` is what the report's environment shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from opsdrill_stack.procs import pid_alive, stop_pid, wait_for

SETTINGS_FILE = "settings.json"
SOCKET_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes with its NUL


@dataclass
class Daemon:
    name: str
    base: Path
    port: int = 0
    pid: int = 0

    # In messages: "Dovecot dovecot exited (code 89)".
    label: ClassVar[str] = "daemon"
    log_name: ClassVar[str] = "daemon.log"
    # Relative to base; "" for a daemon configured on its command line alone (moto).
    conf_name: ClassVar[str] = ""
    start_timeout: ClassVar[float] = 20.0
    stop_grace: ClassVar[float] = 5.0

    @property
    def logfile(self) -> Path:
        return self.base / self.log_name

    @property
    def conf(self) -> Path:
        """Its configuration file, written by ``start``."""
        if not self.conf_name:
            raise RuntimeError(f"{self.label} takes its settings on its command line")
        return self.base / self.conf_name

    def running_pid(self) -> int:
        """The PID to stop and report on (a daemon that restarts itself overrides it)."""
        return self.pid

    # -- lifecycle -----------------------------------------------------------------
    def spawn(
        self,
        argv: Sequence[str],
        *,
        output: Path | None = None,
        quiet: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session with stdin closed, stdout and stderr appended
        to ``output`` (default ``logfile``) or discarded (``quiet``: it writes its own
        log); records its PID."""
        self.base.mkdir(parents=True, exist_ok=True)
        if quiet:
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        else:
            with (output or self.logfile).open("ab") as log:
                proc = subprocess.Popen(
                    list(argv),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env=None if env is None else dict(env),
                    cwd=cwd,
                )
        self.pid = proc.pid
        return proc

    def wait(
        self,
        proc: subprocess.Popen[bytes],
        ready: Callable[[], bool],
        *,
        timeout: float | None = None,
        hint: str = "",
    ) -> bool:
        """Wait until ``ready()`` or the process exits: True once ready, False when it
        exited. A timeout or an interrupt stops it and raises: never left running."""
        try:
            wait_for(
                lambda: proc.poll() is not None or ready(),
                self.start_timeout if timeout is None else timeout,
                f"{self.label} {self.name}",
                hint=hint or f"see {self.logfile}",
            )
        except BaseException:
            self.stop()
            raise
        return proc.poll() is None

    def exited(self, proc: subprocess.Popen[bytes]) -> RuntimeError:
        return RuntimeError(
            f"{self.label} {self.name} exited (code {proc.returncode}){log_tail(self.logfile)}"
        )

    def run_until_ready(self, argv: Sequence[str], ready: Callable[[], bool], **spawn: Any) -> None:
        """``spawn`` then ``wait``; an exit before it is ready is an error."""
        proc = self.spawn(argv, **spawn)
        if not self.wait(proc, ready):
            raise self.exited(proc)

    def stop(self) -> None:
        pid = self.running_pid()
        if pid:
            stop_pid(pid, timeout=self.stop_grace)

    def status(self) -> str:
        pid = self.running_pid()
        return "running" if pid and pid_alive(pid) else "stopped"

    def version(self) -> str:
        raise NotImplementedError(f"{type(self).__name__}.version")

    def log_tail(self, lines: int = 8) -> str:
        return log_tail(self.logfile, lines)


def log_tail(path: Path, lines: int = 8) -> str:
    """The end of a daemon's log for an error message (our daemons never log secrets)."""
    if not path.exists():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n{path} (last lines):\n" + "\n".join(tail)


def write_private(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    """Create (or truncate) ``path`` with ``mode`` before any byte is written."""
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through O_CREAT
    return path


def socket_dir(base: Path, label: str, longest_name: int = 24) -> Path:
    """``base`` itself when every socket under it fits sockaddr_un, else a short directory
    under the system temp dir derived from ``base`` (so a daemon rebuilt from recorded
    state finds the same sockets). Daemons remove the fallback when they stop."""
    resolved = base.resolve()
    if len(str(resolved)) + 1 + longest_name <= SOCKET_PATH_MAX:
        return resolved
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"opsdrill-{label}-{digest}"


def save_settings(base: Path, settings: dict[str, Any]) -> None:
    """What a daemon needs to be driven from another process (paths, ports): no secrets."""
    (base / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))


def load_settings(base: Path) -> dict[str, Any]:
    path = base / SETTINGS_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
