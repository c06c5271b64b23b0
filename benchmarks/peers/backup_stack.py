"""What bench_backup.py's peers share: the off-site S3 server, reset between phases, and
the row-count verification every restore path runs.

moto keeps every uploaded byte in memory and never gives it back (and gets slower as it
grows), so each tool's phase starts against a freshly started server on the same port
with the same empty buckets: every tool meets the same moto. The restarted process is
recorded in the stack's state, so ``LocalStack.down()`` stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from minio import Minio
from minio.commonconfig import ENABLED
from minio.versioningconfig import VersioningConfig

from opsdrill.backups.pgstats import collect_stats
from opsdrill_stack.local import BUCKET, STATE_FILE, LocalStack
from opsdrill_stack.procs import pid_alive, port_open, stop_pid

# rclone rcat fails on moto after a complete upload into an unversioned bucket (notes).
RUNBOOK_BUCKET = "runbook-offsite"
PGBACKREST_BUCKET = "pgbackrest-offsite"


def cpu_seconds(pid: int) -> float:
    """CPU time of a process plus its reaped children (a postmaster's exited backends)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def record_pid(stack: LocalStack, component: str, pid: int) -> None:
    """A component restarted by the benchmark: ``stack down`` must stop the new process."""
    stack.state["components"][component]["pid"] = pid
    (stack.base / STATE_FILE).write_text(json.dumps(stack.state, indent=2))


class OffsiteS3:
    """The stack's off-site moto, restartable on its own port."""

    def __init__(self, stack: LocalStack, access_key: str, secret_key: str) -> None:
        self.stack = stack
        self.access_key = access_key
        self.secret_key = secret_key
        info = stack.state["components"]["s3_offsite"]
        self.port: int = info["port"]
        self.base = Path(info["base"])
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return int(self.stack.state["components"]["s3_offsite"]["pid"])

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def client(self) -> Minio:
        return Minio(
            f"127.0.0.1:{self.port}",
            self.access_key,
            self.secret_key,
            secure=False,
            region="us-east-1",
        )

    def restart(self) -> float:
        """Stop moto, start a fresh one on the same port, create the empty buckets every
        tool uses; returns the seconds it took (not part of any measurement)."""
        started = time.perf_counter()
        stop_pid(self.pid, timeout=10)
        if self._proc is not None:
            self._proc.wait(timeout=10)  # ours: reap it
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        for _ in range(3):  # the old socket may linger a moment
            with (self.base / "offsite.log").open("ab") as log:
                self._proc = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env=env,
                )
            record_pid(self.stack, "s3_offsite", self._proc.pid)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._proc.poll() is None:
                if port_open(self.port):
                    self.make_buckets()
                    return time.perf_counter() - started
                time.sleep(0.05)
            if pid_alive(self._proc.pid):
                stop_pid(self._proc.pid)
            self._proc.wait(timeout=10)
            time.sleep(1)
        raise RuntimeError(f"moto did not restart on port {self.port}; see {self.base}")

    def make_buckets(self) -> None:
        s3 = self.client()
        for bucket in (BUCKET, RUNBOOK_BUCKET, PGBACKREST_BUCKET):
            s3.make_bucket(bucket)
        s3.set_bucket_versioning(RUNBOOK_BUCKET, VersioningConfig(ENABLED))

    def bucket_bytes(self, bucket: str, prefix: str = "") -> int:
        """Bytes stored under a prefix (what a tool uploaded in this phase)."""
        return sum(o.size or 0 for o in self.client().list_objects(bucket, prefix, recursive=True))


def table_counts(conninfo: str) -> dict[str, Any]:
    """Rows per table and the large objects, counted as the drill counts them."""
    with psycopg.connect(conninfo) as conn:
        stats = collect_stats(conn, False, sequences=False)
    counts: dict[str, Any] = {name: t["rows"] for name, t in stats.tables.items()}
    counts["(large objects)"] = stats.large_objects.get("count")
    return counts


def verify_counts(restored: str, live: str) -> int:
    """Count every table of the restored and the live database, as the drill does, and
    compare; raise on any difference. Returns the number of tables compared."""
    got, want = table_counts(restored), table_counts(live)
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise RuntimeError(f"row counts differ from live in {len(diff)} tables: {diff[:5]}")
    return len(want)


def stop_leftovers(base: Path) -> list[int]:
    """After ``stack down``: stop any process still naming the stack's directory in its
    command line (all of them were started for this run, e.g. an archive-push of the
    live server's archiver). Returns their PIDs."""
    found = []
    needle = str(base).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    for pid in found:
        stop_pid(pid, timeout=5, group=False)
    return found
