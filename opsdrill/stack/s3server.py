"""An S3 server for the local stack: moto in its own process.

No MinIO server binary can be installed here; moto speaks the same S3 API that the minio
SDK uses against real MinIO, so the code under test is the production code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from opsdrill.stack.procs import free_port, pid_alive, port_open, stop_pid, wait_for


@dataclass
class S3Server:
    name: str
    base: Path
    port: int = 0
    pid: int = 0

    @property
    def logfile(self) -> Path:
        return self.base / f"{self.name}.log"

    def start(self, attempts: int = 3) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            self.port = free_port()
            with self.logfile.open("ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
                )
            self.pid = proc.pid

            def ready(proc: subprocess.Popen[bytes] = proc) -> bool:
                return port_open(self.port) or proc.poll() is not None

            try:
                wait_for(ready, 30, "moto")
            except TimeoutError:
                stop_pid(self.pid)
                raise
            if proc.poll() is None:
                return
        raise RuntimeError(f"S3 server {self.name} did not start; see {self.logfile}")

    def stop(self) -> None:
        if self.pid:
            stop_pid(self.pid, timeout=5)

    def status(self) -> str:
        return "running" if self.pid and pid_alive(self.pid) else "stopped"
