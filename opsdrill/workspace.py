"""Leave nothing behind: one private directory per run, cleanup on signals, and the sweep of
what a killed run left.

Every run keeps its temporary files (GnuPG homes, the restore spool) in ONE directory under
TMPDIR, ``opsdrill-<operation>-<pid>-<random>``: mode 0700, files 0600, with ``owner.json``
(pid, the process's start, operation, host) so that a later run can tell whose it is. The
CLI turns SIGTERM and SIGHUP into the same exception as Ctrl-C (``Interrupted``), so every
``finally`` and context manager cleans up as it does for Ctrl-C; cleanup itself runs
shielded from a second signal. A SIGKILLed run cannot clean up: the next run of the same
operation removes its directory and stops its gpg-agent, one stderr line per thing removed
(the drill does the same for its scratch databases, restore.py, with ``Owner``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

PREFIX = "opsdrill-"
OWNER_FILE = "owner.json"
_NAME = re.compile(r"^opsdrill-(?P<op>[a-z_]+)-(?P<pid>\d+)-[a-z0-9_]{8}$")
# gpg-agent puts its sockets in the GnuPG home (when /run/user/UID does not exist); a
# socket path holds at most 107 bytes and the longest name is "/S.gpg-agent.browser".
MAX_GNUPG_HOME = 80
SHORT_ROOT = Path("/tmp")  # where a GnuPG home goes when TMPDIR is too deep for its sockets
AGENT_EXIT_SECONDS = 5.0

Say = Callable[[str], None]


def say_on_stderr(line: str) -> None:
    with contextlib.suppress(OSError):  # a terminal gone with SIGHUP: cleanup goes on
        print(f"opsdrill: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ who a run is


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/PID/stat, None if there is
    no such process. The start time tells a reused pid from the original. Hand-written:
    /proc is all this needs, and psutil would be a dependency for two fields."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None
    fields = raw.rsplit(b")", 1)[1].split()  # after "(comm)", which may hold spaces
    return fields[0].decode(), int(fields[19])


_HAVE_PROC = Path("/proc/self/stat").exists()


@dataclass
class Owner:
    """The process a directory or scratch database belongs to."""

    operation: str
    host: str
    pid: int
    pid_started: int | None  # /proc start ticks; None where there is no /proc
    started: str  # ISO 8601, UTC
    gnupg_homes: list[str] = field(default_factory=list)  # those outside the directory

    @classmethod
    def of_this_process(cls, operation: str) -> Owner:
        stat = _proc_stat(os.getpid()) if _HAVE_PROC else None
        return cls(
            operation,
            socket.gethostname(),
            os.getpid(),
            None if stat is None else stat[1],
            datetime.now(UTC).replace(microsecond=0).isoformat(),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Owner | None:
        try:
            data = json.loads(raw)
            owner = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError):
            return None
        fine = isinstance(owner.pid, int) and isinstance(owner.host, str)
        if not fine or not isinstance(owner.pid_started, int | None):
            return None  # not ours, or damaged: never judged dead on its word
        return owner

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        return (
            f"an earlier {self.operation} run (pid {self.pid} on {self.host}, "
            f"started {self.started}), no longer running"
        )

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def provably_dead(self) -> bool:
        """True only when this host's process is gone (or a zombie, or its pid reused): a
        process of another host, or one that may still run, is never taken for dead."""
        if not self.on_this_host():
            return False
        if not _HAVE_PROC:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
            return False
        stat = _proc_stat(self.pid)
        if stat is None:
            return True
        state, ticks = stat
        return state == "Z" or (self.pid_started is not None and ticks != self.pid_started)


# ------------------------------------------------------------------ gpg-agents


def agent_pids(home: Path) -> list[int]:
    """gpg-agent processes serving the GnuPG home ``home`` (its ``--homedir`` argument)."""
    want = os.fsencode(home)
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if os.path.basename(argv[0]) != b"gpg-agent" or b"--homedir" not in argv:
                continue
            at = argv.index(b"--homedir") + 1
            if at < len(argv) and argv[at] == want:
                found.append(int(entry.name))
    return found


def stop_agents(home: Path) -> list[int]:
    """Stop the gpg-agent of ``home`` (it caches the drill key's passphrase); return the
    pids that were running. gpgconf asks it to exit; one that does not within a few
    seconds, or whose socket is gone, is killed by its pid."""
    running = agent_pids(home)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    deadline = time.monotonic() + AGENT_EXIT_SECONDS
    while (left := agent_pids(home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return running


# ------------------------------------------------------------------ the run's directory


class Workspace:
    """One run's private directory, created on first use and removed by ``close()``."""

    def __init__(self, operation: str) -> None:
        self.operation = operation
        self.owner = Owner.of_this_process(operation)
        self.cleaned: list[str] = []  # what this run removed that killed runs had left
        self._path: Path | None = None
        self._homes: list[Path] = []

    @property
    def path(self) -> Path:
        if self._path is None:
            base = tempfile.gettempdir()
            prefix = f"{PREFIX}{self.operation}-{self.owner.pid}-"
            self._path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))  # 0700
            self._write_owner()
        return self._path

    def _write_owner(self) -> None:
        tmp = self.path / f".{OWNER_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.owner.to_json())
        os.replace(tmp, self.path / OWNER_FILE)

    def new_file(self, name: str) -> Path:
        """An empty file only this user can read (0600 whatever the umask)."""
        path = self.path / name
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return path

    def gnupg_home(self) -> Path:
        """A new private GnuPG home: inside the directory when the path leaves room for
        gpg-agent's sockets, else a short one under /tmp, recorded in owner.json first so
        that a killed run's is found too."""
        n = len(self._homes)
        home = self.path / f"gnupg-{n}"
        if len(os.fsencode(home)) > MAX_GNUPG_HOME:
            home = SHORT_ROOT / f"odg-{self.path.name.rsplit('-', 1)[1]}-{n}"
            self.owner.gnupg_homes.append(str(home))
            self._write_owner()
        home.mkdir(mode=0o700)
        home.chmod(0o700)
        self._homes.append(home)
        return home

    def release_gnupg_home(self, home: Path) -> None:
        """Stop the home's agent and remove it (GpgHome.close)."""
        with shielded():
            stop_agents(home)
            shutil.rmtree(home, ignore_errors=True)
            if home in self._homes:
                self._homes.remove(home)

    def close(self) -> None:
        with shielded():
            for home in list(self._homes):
                self.release_gnupg_home(home)
            if self._path is not None:
                shutil.rmtree(self._path, ignore_errors=True)


def sweep(operation: str, say: Say = say_on_stderr) -> list[str]:
    """Remove what killed runs of ``operation`` left in TMPDIR (their directory, the agents
    and GnuPG homes in owner.json), if their process is provably gone; one line each."""
    done: list[str] = []
    base = Path(tempfile.gettempdir())
    for entry in sorted(base.glob(f"{PREFIX}{operation}-*")):
        match = _NAME.match(entry.name)
        try:
            st = entry.lstat()
        except OSError:
            continue
        if match is None or match["op"] != operation or not entry.is_dir():
            continue
        if entry.is_symlink() or st.st_uid != os.getuid():
            continue
        try:
            owner = Owner.from_json((entry / OWNER_FILE).read_bytes())
        except OSError:
            owner = None
        if owner is None:  # killed before it wrote owner.json: the name says the pid
            owner = Owner(operation, socket.gethostname(), int(match["pid"]), None, "?")
        if not owner.provably_dead():
            continue
        who = owner.describe()
        homes = [Path(h) for h in owner.gnupg_homes] + sorted(entry.glob("gnupg-*"))
        for home in homes:
            for pid in stop_agents(home):
                done.append(f"stopped gpg-agent pid {pid} (GnuPG home {home}) left by {who}")
            if not home.is_relative_to(entry) and home.exists():
                shutil.rmtree(home, ignore_errors=True)
                done.append(f"removed GnuPG home {home} left by {who}")
        shutil.rmtree(entry, ignore_errors=True)
        done.append(f"removed temporary directory {entry} left by {who}")
    for line in done:
        say(line)
    return done


_current: Workspace | None = None


def current() -> Workspace | None:
    return _current


@contextlib.contextmanager
def run(operation: str, say: Say = say_on_stderr, *, share: bool = True) -> Iterator[Workspace]:
    """The run's workspace: the one already open (the CLI opens it for the whole command),
    or a new one for ``operation``, after sweeping what killed runs of it left. With
    ``share=False`` (a GnuPG home outside any run) the new one is not made the current."""
    global _current
    if _current is not None and share:
        yield _current
        return
    ws = Workspace(operation)
    ws.cleaned = sweep(operation, say)
    if share:
        _current = ws
    try:
        yield ws
    finally:
        if share:
            _current = None
        ws.close()


# ------------------------------------------------------------------ signals


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: raised in the main thread so that every ``finally``
    runs, exactly as for Ctrl-C; the CLI exits 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: int | None = None
_pending: int | None = None
_shield = 0
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received, _pending
    if _received is not None:  # a second signal must not cut the cleanup short
        # os.write, not print: print() from a handler that interrupted a print() raises
        with contextlib.suppress(OSError):
            os.write(2, f"opsdrill: {signal.Signals(signum).name}: still cleaning up\n".encode())
        return
    _received = signum
    if _shield:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that a signal must not interrupt halfway: the signal is raised after it."""
    global _shield, _pending
    _shield += 1
    try:
        yield
    finally:
        _shield -= 1
        if not _shield and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` inside; the previous handlers come
    back afterwards. Only the main thread can install handlers: elsewhere, a no-op."""
    global _received, _pending
    previous: dict[int, Any] = {}
    _received = _pending = None
    with contextlib.suppress(ValueError):
        for sig in HANDLED:
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
