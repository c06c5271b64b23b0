"""A throwaway PostgreSQL cluster from Debian's binaries, owned by the ``postgres`` user."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from opsdrill.errors import ConfigError
from opsdrill_stack.daemon import Daemon
from opsdrill_stack.procs import as_service_user, chown_to, free_port, pid_alive, run, stop_pid

SERVICE_USER = "postgres"
SUPERUSER = "opsdrill"
# A throwaway cluster trades durability for speed; never used for real data.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    "shared_buffers": "128MB",
    "maintenance_work_mem": "256MB",
    "max_worker_processes": "8",
}


def pg_bindir() -> Path:
    """Newest installed PostgreSQL (Debian keeps each major under /usr/lib/postgresql/N).

    Probes for pg_dump, which the client package has too: a backup host needs no server.
    """
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_dump"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_dump")
    if which:
        return Path(which).parent
    raise ConfigError("PostgreSQL client tools not found (fix: apt-get install postgresql-client)")


def pgserver_bindir() -> Path:
    """The PostgreSQL 16 server and client binaries of the ``pgserver`` wheel (a dev
    dependency): a second major beside Debian's 15, runnable as they are. Found without
    importing pgserver (which would pull in its own server management)."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("the pgserver wheel is not installed (fix: pip install -e '.[dev]')")
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bindir / "postgres").exists():
        raise RuntimeError(f"pgserver has no {bindir / 'postgres'}")
    return bindir


@dataclass
class PgCluster(Daemon):
    """``bindir``: the server binaries to run ('' = Debian's newest, ``pg_bindir()``);
    initdb, pg_ctl and postgres run as the ``postgres`` user, so it must be able to
    reach them. Started by ``pg_ctl -w`` (which waits for it), not ``spawn``."""

    bindir: str = ""

    label: ClassVar[str] = "PostgreSQL"
    log_name: ClassVar[str] = "postgres.log"
    conf_name: ClassVar[str] = "data/postgresql.conf"
    stop_grace: ClassVar[float] = 30.0

    @property
    def bin(self) -> Path:
        return Path(self.bindir) if self.bindir else pg_bindir()

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def sockdir(self) -> Path:
        return self.base / "run"

    def init(self, password: str) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        for p in (self.base, self.sockdir):
            os.chmod(p, 0o755)
            chown_to(p, SERVICE_USER)
        pwfile = self.base / ".pw"
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        chown_to(pwfile, SERVICE_USER)
        try:
            run(
                as_service_user(
                    [
                        str(self.bin / "initdb"),
                        "-D",
                        str(self.datadir),
                        "-U",
                        SUPERUSER,
                        f"--pwfile={pwfile}",
                        "--auth-host=scram-sha-256",
                        "--auth-local=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                        "--no-sync",
                    ],
                    SERVICE_USER,
                ),
                f"initdb for {self.name}",
            )
        finally:
            pwfile.unlink()
        with self.conf.open("a") as fh:
            fh.write("\n# opsdrill local stack\n")
            for key, value in FAST_SETTINGS.items():
                fh.write(f"{key} = '{value}'\n")

    def start(self, attempts: int = 3) -> None:
        last: Exception | None = None
        for _ in range(attempts):
            self.port = free_port()
            opts = (
                f"-c port={self.port} -c listen_addresses=127.0.0.1 "
                f"-c unix_socket_directories={self.sockdir}"
            )
            try:
                run(
                    as_service_user(
                        [
                            str(self.bin / "pg_ctl"),
                            "-D",
                            str(self.datadir),
                            "-l",
                            str(self.logfile),
                            "-o",
                            opts,
                            "-w",
                            "-t",
                            "60",
                            "start",
                        ],
                        SERVICE_USER,
                    ),
                    f"starting PostgreSQL {self.name}",
                    stdin=subprocess.DEVNULL,
                )
            except RuntimeError as exc:  # most likely a lost race for the port
                last = exc
                continue
            self.pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            return
        tail = self.logfile.read_text()[-1500:] if self.logfile.exists() else ""
        raise RuntimeError(f"PostgreSQL {self.name} did not start: {last}\n{tail}")

    def stop(self) -> None:
        if self.pid and pid_alive(self.pid):
            # postmaster's "fast" shutdown on SIGINT; pg_ctl would need the service user.
            try:
                os.kill(self.pid, signal.SIGINT)
            except ProcessLookupError:
                return
            stop_pid(self.pid, timeout=self.stop_grace, group=False)

    def version(self) -> str:
        return run([str(self.bin / "postgres"), "--version"], "postgres --version").strip()
