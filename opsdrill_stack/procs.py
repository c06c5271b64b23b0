"""Process plumbing for the local stack: free ports, readiness waits, stopping by PID."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    """A port free right now on 127.0.0.1. Callers retry on a lost race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, hint: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + (f" ({hint})" if hint else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def pid_alive(pid: int) -> bool:
    """Running. A zombie is not: a daemon stopped from another process than the one that
    started it stays a zombie until PID 1 reaps it, and waiting for that cost seconds."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def stop_pid(pid: int, timeout: float = 10.0, group: bool = True) -> None:
    """SIGTERM (to the process group by default), SIGKILL after ``timeout``; returns as
    soon as the process has exited, zombie or not. Only ever for PIDs the stack started."""
    if not pid or not pid_alive(pid):
        return
    kill = os.killpg if group else os.kill
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                return
            time.sleep(0.02)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def running_as_root() -> bool:
    return os.geteuid() == 0


def as_service_user(argv: Sequence[str], user: str) -> list[str]:
    """PostgreSQL refuses to run as root: drop to ``user`` when we are root."""
    if running_as_root():
        return ["runuser", "-u", user, "--", *argv]
    return list(argv)


def chown_to(path: Path, user: str) -> None:
    if running_as_root():
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def run(argv: Sequence[str], what: str, timeout: float = 120, **kw: object) -> str:
    """Run a setup command; on failure raise with its output (setup commands carry no secrets)."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,  # type: ignore[call-overload]
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return str(proc.stdout)


def find_binary(name: str, packages: str) -> str:
    """A daemon or tool's path; sbin too, which a non-login PATH (cron, CI) often lacks."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise RuntimeError(f"{name} not found (fix: apt-get install {packages})")
    return found
