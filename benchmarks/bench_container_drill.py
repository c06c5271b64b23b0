"""Benchmark a drill into a container sandbox against one into the standing sandbox server.

One local stack is started with --size MB of demo CRM data and backed up once. Per repeat:
  server     `opsdrill restore --drill` into the stack's sandbox server (sandbox.dsn)
  container  the same backup, `opsdrill restore --drill` with sandbox.container: a fresh
             PostgreSQL container of the backup's major, started, guarded, restored into,
             verified and removed (wall time, so the container's start and removal count)
  start      the container's start alone (opsdrill.containers.sandbox_container: from the
             call to the first connection), then its removal
The container gets the stack sandbox's throwaway settings (fsync off...), so both servers
are configured alike. The ratio compares medians (container / server). The Docker engine
and images are the test harness's (tests/helpers/containers.py: our own dockerd when none runs,
images built locally).
A measurement: exits 0 whatever the ratio, 1 when a drill failed, 2 when no engine can run.
Results also go to benchmarks/results/container-latest.json.
Usage: python benchmarks/bench_container_drill.py [--size 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import as_installed
import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the test harness's engine and images (tests/helpers/containers.py)

from opsdrill.containers import sandbox_container  # noqa: E402
from opsdrill_stack.local import LocalStack  # noqa: E402
from opsdrill_stack.postgres import FAST_SETTINGS  # noqa: E402
from tests.helpers.containers import Unavailable, engine_session, ensure_images  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "container-latest.json"


def drill(inventory: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "opsdrill", "restore", "-i", str(inventory), "-d", "crm", "--drill"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"drill exited {proc.returncode}:\n{proc.stderr[-1500:]}")
    return seconds, proc.stdout


def start_alone(pattern: str) -> tuple[float, float]:
    """(start seconds, removal seconds) of one sandbox container of major 15."""
    started = time.perf_counter()
    with sandbox_container(
        "crm", pattern, 15, network="host", timeout=120, settings=FAST_SETTINGS
    ) as box:
        up = time.perf_counter() - started
        assert box.endpoint.params["port"]
        leaving = time.perf_counter()
    return up, time.perf_counter() - leaving


def main(argv: list[str] | None = None) -> int:
    as_installed.with_bytecode_caches()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="MB of demo CRM data")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        with engine_session() as engine:
            build_started = time.perf_counter()
            pattern = ensure_images(engine)
            images_seconds = time.perf_counter() - build_started
            return _bench(args, engine.storage, pattern, images_seconds)
    except Unavailable as exc:
        print(f"bench_container_drill: no Docker engine can run here: {exc}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace, storage: str, pattern: str, images_seconds: float) -> int:
    stack = LocalStack(Path(tempfile.mkdtemp(prefix="opsdrill-bench-container-")), args.size)
    runs: dict[str, list[float]] = {"server": [], "container": [], "start": [], "remove": []}
    inner: list[float] = []
    try:
        server_inv = stack.up()
        data = tomllib.loads(server_inv.read_text())
        data["databases"]["crm"]["content_hashes"] = False
        server_inv.write_text(tomli_w.dumps(data))
        # the same throwaway settings as the stack's sandbox server: like against like
        data["databases"]["crm"]["sandbox"] = {
            "container": pattern,
            "container_network": "host",
            "container_settings": FAST_SETTINGS,
        }
        container_inv = server_inv.with_name("inventory-container.toml")
        container_inv.write_text(tomli_w.dumps(data))
        subprocess.run(
            [sys.executable, "-m", "opsdrill", "backup", "-i", str(server_inv)],
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        for i in range(args.repeat):
            seconds, _ = drill(server_inv)
            runs["server"].append(seconds)
            seconds, out = drill(container_inv)
            runs["container"].append(seconds)
            found = re.search(r"started in ([\d.]+)s", out)
            inner.append(float(found[1]) if found else 0.0)
            up, down = start_alone(pattern)
            runs["start"].append(up)
            runs["remove"].append(down)
            print(
                f"repeat {i + 1}: server {runs['server'][-1]:.2f}s, container "
                f"{runs['container'][-1]:.2f}s (its start {inner[-1]:.2f}s), start alone "
                f"{up:.2f}s, removal {down:.2f}s",
                flush=True,
            )
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"bench_container_drill: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.down()
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["container"] / med["server"]
    print(
        f"\ncontainer drill vs server drill, {args.size} MB, median of {args.repeat} "
        f"({storage} storage):\n"
        f"  server sandbox     {med['server']:7.2f} s\n"
        f"  container sandbox  {med['container']:7.2f} s   ratio {ratio:.2f}\n"
        f"  container start    {med['start']:7.2f} s   (alone; removal {med['remove']:.2f} s)\n"
        f"  images ready in    {images_seconds:7.2f} s   (0 when already built)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": platform.platform(),
                "size_mb": args.size,
                "repeat": args.repeat,
                "storage_driver": storage,
                "runs": runs,
                "container_start_in_drill": inner,
                "median": med,
                "ratio": ratio,
                "images_seconds": images_seconds,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
