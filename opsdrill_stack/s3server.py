"""An S3 server for the local stack: moto in its own process.

No MinIO server binary can be installed here; moto speaks the same S3 API that the minio
SDK uses against real MinIO, so the code under test is the production code path.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from opsdrill_stack.daemon import Daemon
from opsdrill_stack.procs import free_port, port_open


@dataclass
class S3Server(Daemon):
    label: ClassVar[str] = "S3 server"
    start_timeout: ClassVar[float] = 30.0

    @property
    def logfile(self) -> Path:  # one per server, by name: two share a parent directory
        return self.base / f"{self.name}.log"

    def start(self, attempts: int = 3) -> None:
        """Serve on a free port; a lost race for it (moto exits) is retried."""
        for _ in range(attempts):
            self.port = free_port()
            proc = self.spawn(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
            )
            if self.wait(proc, lambda: port_open(self.port)):
                return
        raise RuntimeError(f"S3 server {self.name} did not start; see {self.logfile}")

    def version(self) -> str:
        from importlib.metadata import version

        return "moto " + version("moto")
