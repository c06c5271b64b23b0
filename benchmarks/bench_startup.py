"""Check-run start-up: from `pytest --pyargs opsdrill_checks` to the first check, and its parts.

One Knot serves --domains generated sending domains (bench_dns.py's generator); each repeat,
interleaved, times from process start (this script's clock before the spawn):
  interpreter   `python -c pass`
  imports       python, pytest and the plugins pytest loads (ours, allure-pytest, xdist)
  collected     `pytest --pyargs opsdrill_checks -m dns --inventory ...`: collection done
  first check   the same run: the first check starts (benchmarks/startup_probe.py)
  whole run     the same run: exit
  -n 2          the same run under two xdist workers: first check in a worker, and exit
Target: first check <= 1.0 s (a plain run, idle machine). Medians of the repeats; MISS
prints, exit 0; exit 1 when a run does not pass. Load (/proc/loadavg) is printed: on a busy
machine every figure grows.
Usage: python benchmarks/bench_startup.py [--domains 30] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import as_installed
import bench_dns

REPO = Path(__file__).resolve().parent.parent
TARGET_FIRST_CHECK = 1.0
IMPORTS = (
    "import pytest, opsdrill_pytest.plugin, opsdrill_pytest.outcomes, "
    "allure_pytest.plugin, xdist.plugin"
)


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(start wall clock, seconds to exit, output)."""
    start = time.time()
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:6])}... exited {done.returncode}:\n{done.stdout[-1500:]}"
        )
    return start, time.perf_counter() - began, done.stdout + done.stderr


def check_run(inventory: Path, workers: int, marks: Path) -> dict[str, float]:
    marks.write_text("")
    env = dict(os.environ, OPSDRILL_BENCH_FIRST_CHECK=str(marks))
    argv = [sys.executable, "-m", "pytest", "--pyargs", "opsdrill_checks", "-m", "dns"]
    argv += ["--inventory", str(inventory), "-p", "no:cacheprovider", "-q"]
    argv += ["-p", "startup_probe"] + (["-n", str(workers)] if workers else [])
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent)
    start, whole, _ = timed(argv, env)
    stamps = [line.split() for line in marks.read_text().splitlines()]
    first = min(float(t) for kind, t, _ in stamps if kind == "first") - start
    collected = min(float(t) for kind, t, _ in stamps if kind == "collected") - start
    return {"collected": collected, "first": first, "whole": whole}


def main(argv: list[str] | None = None) -> int:
    as_installed.with_bytecode_caches()
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--domains", type=int, default=30)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="opsdrill-bench-startup-"))
    rows: dict[str, list[float]] = {}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    knot: bench_dns.PeerKnot | None = None
    try:
        domains, zones, _ = bench_dns.generate(args.domains, base / "dkim")
        knot = bench_dns.PeerKnot("startup-bench", base / "knot", peer_address=None)
        knot.start(zones)
        inventory = base / "inventory.toml"
        bench_dns.write_inventory(inventory, domains, knot.port, 2.0)
        check_run(inventory, 0, base / "marks")  # warm-up: bytecode, page cache
        for _ in range(args.repeat):
            rows.setdefault("interpreter", []).append(timed([sys.executable, "-c", "pass"])[1])
            rows.setdefault("imports", []).append(timed([sys.executable, "-c", IMPORTS])[1])
            plain = check_run(inventory, 0, base / "marks")
            for key, value in plain.items():
                rows.setdefault(key, []).append(value)
            xdist = check_run(inventory, 2, base / "marks")
            rows.setdefault("-n 2 first check", []).append(xdist["first"])
            rows.setdefault("-n 2 whole run", []).append(xdist["whole"])
    finally:
        if knot is not None:
            knot.stop()
        shutil.rmtree(base, ignore_errors=True)  # zones, keys, the inventory, the marks
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n== check-run start-up, {args.domains} domains, -m dns; median of {args.repeat} ==")
    print(f"load before {' '.join(load_before)}, after {' '.join(load_after)}")
    names = {
        "interpreter": "python -c pass",
        "imports": "+ pytest and its plugins imported",
        "collected": "pytest: collection done",
        "first": "pytest: first check starts",
        "whole": "pytest: whole run",
        "-n 2 first check": "pytest -n 2: first check starts",
        "-n 2 whole run": "pytest -n 2: whole run",
    }
    for key, label in names.items():
        median = statistics.median(rows[key])
        mark = ""
        if key == "first":
            ok = median <= TARGET_FIRST_CHECK
            mark = f"  target <= {TARGET_FIRST_CHECK:g} s: {'PASS' if ok else 'MISS'}"
        print(f"{label:38} {median:7.3f} s{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
