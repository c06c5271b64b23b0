"""Mirror benchmark: ``opsdrill mirror`` against ``rclone copy`` and a plain sequential copy
of the same objects with the minio SDK, between the same two local S3 servers (moto).

Every repeat runs each tool once, in an order rotated per repeat, each into a fresh
off-site server and a fresh versioned bucket (moto's memory grows with every upload and is
never returned, so a reused server would slow whoever comes last). A tool's no-change rerun
follows its first run on the same server. Ratios are taken within one repeat and the
script prints their medians. Targets (issue 16 and the mirror's own):

- mirror first run <= 1.0x rclone's, while hashing every object with sha256 (rclone
  compares MD5s/ETags only), judged against the variant the mirror compares worst with;
- mirror no-change rerun <= 1.0x rclone's, judged the same way: that is ``--checksum``,
  which compares the two listings, while the other variants HEAD every object on both
  servers for its modification time;
- the mirror's library call: first run >= 2x faster than the sequential copy (which runs
  in this process), its rerun < 5% of its first run.

opsdrill and rclone run as commands, so both peers' times include their start-up;
``opsdrill mirror`` runs as its console script does (``opsdrill.cli.main`` in a fresh
interpreter) with a timer around ``run_mirror``, so its library call is printed beside it.
CPU seconds are the tool's own (a command's, reaped with wait4) and each S3 server's.
A missed target prints MISS and the script exits 0; it exits 1 when a copy fails or
leaves the target unlike the source (keys, sizes; for the mirror also the sha256 it
recorded for the largest and the smallest object). Without rclone on PATH its rows are
skipped with "SKIP rclone: rclone not installed (apt-get install rclone)".

    python benchmarks/bench_mirror.py [--total-mb 500] [--objects 400] [--workers 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import as_installed
import tomli_w
from minio import Minio
from minio.commonconfig import ENABLED
from minio.versioningconfig import VersioningConfig

from opsdrill_stack.s3server import S3Server

RESULTS = Path(__file__).parent / "results"
KEYS = {
    "BENCH_LIVE_ACCESS": "live-access-key",
    "BENCH_LIVE_SECRET": "live-secret-key",
    "BENCH_OFF_ACCESS": "offsite-access-key",
    "BENCH_OFF_SECRET": "offsite-secret-key",
}
SOURCE_BUCKET = "files"
INDEX_PREFIX = ".opsdrill-mirror/"  # the mirror's own index in the target: not data
SEQUENTIAL, MIRROR = "sequential minio copy", "opsdrill mirror"
# rclone variants: name -> extra arguments. Default transfers is 4.
RCLONE = {
    "rclone copy": [],
    "rclone copy --transfers 8": ["--transfers", "8"],
    "rclone copy --checksum --transfers 8": ["--checksum", "--transfers", "8"],
}


CPU_FIELDS = ("client_cpu", "live_cpu", "off_cpu")


class BenchFailed(Exception):
    """An operation failed or left the target unlike the source: the script exits 1."""


@dataclass
class Timing:
    wall: float
    client_cpu: float  # the tool's own CPU-s (children of a command included)
    live_cpu: float  # CPU-s of the live S3 server during the run
    off_cpu: float  # CPU-s of the off-site S3 server during the run
    own: float | None = None  # the mirror: its library call alone (start-up excluded)


@dataclass
class Run:
    """One tool in one repeat: its first run and its no-change rerun."""

    tool: str
    first: Timing
    rerun: Timing | None = None


@dataclass
class Servers:
    live: S3Server
    base: Path
    off: S3Server | None = None
    history: list[str] = field(default_factory=list)

    def fresh_offsite(self) -> S3Server:
        """A new off-site moto for one tool: every tool starts from the same state."""
        self.stop_offsite()
        self.off = S3Server("offsite", self.base / "offsite")
        self.off.start()
        return self.off

    def stop_offsite(self) -> None:
        if self.off is not None:
            self.off.stop()
            self.off = None


def sizes(total: int, count: int, rng: random.Random) -> list[int]:
    """A files bucket's shape: many small files, a few large ones (some multipart)."""
    weights = [rng.paretovariate(1.2) for _ in range(count)]
    scale = total / sum(weights)
    return [max(1, int(w * scale)) for w in weights]


def seed(client: Minio, bucket: str, total: int, count: int) -> dict[str, int]:
    rng = random.Random(42)
    objects = {}
    for i, size in enumerate(sizes(total, count, rng)):
        key = f"uploads/{i % 17:02d}/{i:05d}.bin"
        client.put_object(bucket, key, io.BytesIO(os.urandom(size)), size)
        objects[key] = size
    return objects


def minio_client(server: S3Server, who: str) -> Minio:
    return Minio(
        f"127.0.0.1:{server.port}",
        KEYS[f"BENCH_{who}_ACCESS"],
        KEYS[f"BENCH_{who}_SECRET"],
        secure=False,
    )


def server_cpu(server: S3Server) -> float:
    fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def command(argv: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Run ``argv``; returns (wall s, its CPU-s, its output). Reaped with wait4 so that its
    CPU is its own (the servers are children too, reaped when they stop)."""
    with log.open("w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise BenchFailed(f"{' '.join(argv[:3])}... exited {proc.returncode}:\n{text[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, text


def measured(servers: Servers, call: Callable[[], tuple[float, float, str]]) -> tuple[Timing, str]:
    assert servers.off is not None
    live0, off0 = server_cpu(servers.live), server_cpu(servers.off)
    wall, cpu, text = call()
    timing = Timing(wall, cpu, server_cpu(servers.live) - live0, server_cpu(servers.off) - off0)
    return timing, text


def check_target(off: S3Server, bucket: str, objects: dict[str, int], tool: str) -> None:
    """Every source key with its size, nothing else (the mirror's index aside)."""
    found = {
        str(o.object_name): o.size or 0
        for o in minio_client(off, "OFF").list_objects(bucket, recursive=True)
        if not str(o.object_name).startswith(INDEX_PREFIX)
    }
    if found != objects:
        missing = sorted(objects.keys() - found.keys())[:5]
        differ = sorted(k for k in objects.keys() & found.keys() if objects[k] != found[k])[:5]
        raise BenchFailed(
            f"{tool}: the target holds {len(found)} objects, the source {len(objects)}; "
            f"missing e.g. {missing}, size differs e.g. {differ}"
        )


def check_hashes(servers: Servers, off: S3Server, bucket: str, objects: dict[str, int]) -> None:
    """The mirror's copies carry the sha256 of the source's bytes (the largest and the
    smallest object checked): what it verifies and rclone does not."""
    src, dst = minio_client(servers.live, "LIVE"), minio_client(off, "OFF")
    for key in (max(objects, key=objects.__getitem__), min(objects, key=objects.__getitem__)):
        digest, resp = hashlib.sha256(), src.get_object(SOURCE_BUCKET, key)
        try:
            for chunk in resp.stream(2**20):
                digest.update(chunk)
        finally:
            resp.close()
            resp.release_conn()
        meta = dst.stat_object(bucket, key).metadata or {}
        if meta.get("x-amz-meta-opsdrill-sha256") != digest.hexdigest():
            raise BenchFailed(f"{MIRROR}: {key} off-site does not carry its source's sha256")


def fresh_bucket(off: S3Server, bucket: str) -> None:
    """Versioned, as the mirror wants its target, and the same for every tool."""
    client = minio_client(off, "OFF")
    client.make_bucket(bucket)
    client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))


def bucket_name(tool: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", tool.lower()).strip("-")[:63]


def run_sequential(servers: Servers, objects: dict[str, int]) -> Run:
    """The baseline: get then put, one object at a time, streamed."""
    off = servers.fresh_offsite()
    bucket = bucket_name(SEQUENTIAL)
    fresh_bucket(off, bucket)
    src, dst = minio_client(servers.live, "LIVE"), minio_client(off, "OFF")

    def copy() -> tuple[float, float, str]:
        cpu0, started = self_cpu(), time.perf_counter()
        for key, size in objects.items():
            resp = src.get_object(SOURCE_BUCKET, key)
            try:
                dst.put_object(bucket, key, cast(BinaryIO, resp), size, part_size=16 * 2**20)
            finally:
                resp.close()
                resp.release_conn()
        return time.perf_counter() - started, self_cpu() - cpu0, ""

    first, _ = measured(servers, copy)
    check_target(off, bucket, objects, SEQUENTIAL)
    return Run(SEQUENTIAL, first)


def rclone_env(config: Path, servers: Servers) -> tuple[dict[str, str], list[str]]:
    """The remotes in a private config file; the keys only in rclone's environment."""
    assert servers.off is not None
    text = "".join(
        f"[{name}]\ntype = s3\nprovider = Other\nendpoint = http://127.0.0.1:{port}\n"
        "force_path_style = true\nregion = us-east-1\n\n"
        for name, port in (("live", servers.live.port), ("offsite", servers.off.port))
    )
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    # AWS_CA_BUNDLE (set on this machine) points rclone's SDK at a CA file for plain HTTP.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    for remote, who in (("LIVE", "LIVE"), ("OFFSITE", "OFF")):
        env[f"RCLONE_CONFIG_{remote}_ACCESS_KEY_ID"] = KEYS[f"BENCH_{who}_ACCESS"]
        env[f"RCLONE_CONFIG_{remote}_SECRET_ACCESS_KEY"] = KEYS[f"BENCH_{who}_SECRET"]
    return env, ["rclone", "--config", str(config)]


def run_rclone(servers: Servers, objects: dict[str, int], tool: str) -> Run:
    off = servers.fresh_offsite()
    bucket = bucket_name(tool)
    fresh_bucket(off, bucket)
    env, rclone = rclone_env(servers.base / "rclone.conf", servers)
    argv = [*rclone, "copy", f"live:{SOURCE_BUCKET}", f"offsite:{bucket}", *RCLONE[tool], "-v"]
    log = servers.base / "rclone.log"
    first, text = measured(servers, lambda: command(argv, env, log))
    copied = text.count(": Copied (")
    if copied != len(objects):
        raise BenchFailed(f"{tool}: copied {copied} of {len(objects)}:\n{text[-2000:]}")
    check_target(off, bucket, objects, tool)
    rerun, text = measured(servers, lambda: command(argv, env, log))
    if ": Copied (" in text:
        raise BenchFailed(f"{tool}: the no-change rerun copied objects:\n{text[-2000:]}")
    return Run(tool, first, rerun)


def write_inventory(servers: Servers, bucket: str, workers: int) -> Path:
    assert servers.off is not None
    env = servers.base / "bench.env"
    fd = os.open(env, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in KEYS.items()))

    def store(server: S3Server, name: str, who: str) -> dict[str, Any]:
        return {
            "endpoint": f"127.0.0.1:{server.port}",
            "bucket": name,
            "secure": False,
            "access_key_env": f"BENCH_{who}_ACCESS",
            "secret_key_env": f"BENCH_{who}_SECRET",
            "timeout_seconds": 120.0,
        }

    inv = {
        "name": "bench-mirror",
        "env_file": str(env),
        "stores": {
            "live": store(servers.live, SOURCE_BUCKET, "LIVE"),
            "offsite": store(servers.off, bucket, "OFF"),
        },
        "mirrors": {"files": {"source": "live", "target": "offsite", "workers": workers}},
    }
    path = servers.base / "inventory.toml"
    path.write_text(tomli_w.dumps(inv))
    return path


# `opsdrill mirror` exactly as the console script runs it (opsdrill.cli.main in a fresh
# interpreter), with a timer around the library call: the command's wall time minus it is
# what any opsdrill command pays (interpreter, imports, inventory) before and after.
LAUNCHER = """
import sys, time
import opsdrill.files.mirror as mirror
from opsdrill.cli import main
run = mirror.run_mirror
def timed(*args, **kwargs):
    started = time.perf_counter()
    try:
        return run(*args, **kwargs)
    finally:
        print(f"bench: run_mirror {time.perf_counter() - started:.4f} s", file=sys.stderr)
mirror.run_mirror = timed
sys.exit(main())
"""


def run_mirror(servers: Servers, objects: dict[str, int], workers: int) -> Run:
    off = servers.fresh_offsite()
    bucket = bucket_name(MIRROR)
    fresh_bucket(off, bucket)
    inventory = write_inventory(servers, bucket, workers)
    argv = [sys.executable, "-c", LAUNCHER, "mirror", "-i", str(inventory), "-m", "files"]
    log = servers.base / "mirror.log"

    def once(expect_copied: int) -> Timing:
        timing, text = measured(servers, lambda: command(argv, dict(os.environ), log))
        copied = re.search(r"copied (\d+) ", text)
        own = re.search(r"bench: run_mirror ([\d.]+) s", text)
        if not copied or not own or int(copied[1]) != expect_copied:
            raise BenchFailed(f"{MIRROR}: expected {expect_copied} copied:\n{text[-2000:]}")
        timing.own = float(own[1])
        return timing

    first = once(len(objects))
    check_target(off, bucket, objects, MIRROR)
    check_hashes(servers, off, bucket, objects)
    return Run(MIRROR, first, once(0))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(runs: list[list[Run]]) -> dict[str, Any]:
    """Print the table (medians of per-repeat figures and ratios); returns the JSON."""
    tools = [run.tool for run in runs[0]]
    by = [{run.tool: run for run in repeat} for repeat in runs]

    def med(tool: str, pick: Callable[[Run], float | None]) -> float:
        return median([v for r in by if (v := pick(r[tool])) is not None])

    Pick = Callable[[Run], float | None]

    def ratio(mine: Pick, pick: Pick, tool: str) -> float:
        """Median over repeats of the mirror's figure / the tool's, both from one repeat."""
        pairs = [(mine(r[MIRROR]), pick(r[tool])) for r in by]
        return median([a / b for a, b in pairs if a is not None and b])

    def first(r: Run) -> float:
        return r.first.wall

    def rerun(r: Run) -> float | None:
        return r.rerun.wall if r.rerun else None

    def own_first(r: Run) -> float | None:
        return r.first.own

    def own_rerun(r: Run) -> float | None:
        return r.rerun.own if r.rerun else None

    print(
        f"\n{'tool':38} {'1st s':>6} {'rerun s':>7} {'mirror/it':>10} {'mirror/it':>10}"
        "  CPU-s of the 1st run:"
    )
    print(f"{'':38} {'':>6} {'':>7} {'1st run':>10} {'rerun':>10}  tool / live S3 / off-site S3")
    peers = [t for t in tools if t in RCLONE]
    ratios: dict[str, dict[str, float]] = {}
    for tool in tools:
        r1, rr = ratio(first, first, tool), ratio(rerun, rerun, tool)
        ratios[tool] = {"first": r1, "rerun": rr}
        cpu = [median([getattr(r[tool].first, k) for r in by]) for k in CPU_FIELDS]
        again = med(tool, rerun)
        print(
            f"{tool:38} {med(tool, first):6.2f} "
            + (f"{again:7.3f} " if again == again else f"{'-':>7} ")
            + f"{r1:9.2f}x "
            + (f"{rr:9.2f}x" if rr == rr else f"{'-':>10}")
            + "  "
            + " / ".join(f"{c:.1f}" for c in cpu)
        )
    own1, own2 = med(MIRROR, own_first), med(MIRROR, own_rerun)
    print(
        f"  opsdrill mirror's library call alone: 1st {own1:.2f} s, rerun {own2:.3f} s "
        f"(the rest of its wall time: interpreter, imports, inventory, exit)"
    )
    speedup = 1 / ratio(own_first, first, SEQUENTIAL)
    fraction = ratio(own_rerun, own_first, MIRROR)
    print(f"\ntargets (medians of {len(runs)} per-repeat ratios):")
    result: dict[str, Any] = {
        "speedup_vs_sequential": speedup,
        "rerun_fraction": fraction,
        "ratios": ratios,
    }
    if peers:
        best1 = max(peers, key=lambda t: ratios[t]["first"])
        best2 = max(peers, key=lambda t: ratios[t]["rerun"])
        r1, r2 = ratios[best1]["first"], ratios[best2]["rerun"]
        bare1, bare2 = ratio(own_first, first, best1), ratio(own_rerun, rerun, best2)
        print(
            f"  mirror 1st run / {best1} (the rclone variant with the highest ratio): "
            f"{r1:.2f}x (target <= 1.0x) {verdict(r1 <= 1.0)}"
        )
        print(
            f"  mirror rerun / {best2} (the rclone variant with the highest ratio): "
            f"{r2:.2f}x (target <= 1.0x) {verdict(r2 <= 1.0)}"
        )
        print(
            f"    the same with the mirror's library call alone: 1st {bare1:.2f}x, "
            f"rerun {bare2:.2f}x (not a target: rclone's times include its start-up)"
        )
        result.update(
            best_first_peer=best1,
            best_rerun_peer=best2,
            library_call_ratios={"first": bare1, "rerun": bare2},
        )
    else:
        print("  SKIP rclone: rclone not installed (apt-get install rclone)")
    print(
        f"  mirror's library call, 1st run, vs the sequential copy (both in-process): "
        f"{speedup:.2f}x faster (target >= 2x) {verdict(speedup >= 2)}"
    )
    print(
        f"  mirror's library call, rerun = {fraction:.1%} of its 1st run (target < 5%) "
        f"{verdict(fraction < 0.05)}"
    )
    return result


def main() -> int:
    as_installed.with_bytecode_caches()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total-mb", type=int, default=500)
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    have_rclone = shutil.which("rclone") is not None
    if not have_rclone:
        print("SKIP rclone: rclone not installed (apt-get install rclone)")
    tools = [SEQUENTIAL, *(RCLONE if have_rclone else []), MIRROR]
    load_before = loadavg()
    base = Path(tempfile.mkdtemp(prefix="opsdrill-bench-mirror-"))
    servers = Servers(S3Server("live", base / "live"), base)
    runs: list[list[Run]] = []
    try:
        servers.live.start()
        src = minio_client(servers.live, "LIVE")
        src.make_bucket(SOURCE_BUCKET)
        objects = seed(src, SOURCE_BUCKET, args.total_mb * 1024 * 1024, args.objects)
        total = sum(objects.values())
        print(
            f"mirror benchmark: {len(objects)} objects, {total / 2**20:.0f} MiB (largest "
            f"{max(objects.values()) / 2**20:.1f} MiB), mirror workers {args.workers}, "
            f"{os.cpu_count()} cores, moto servers on 127.0.0.1, load {load_before}"
        )
        for i in range(args.repeat):
            order = tools[i % len(tools) :] + tools[: i % len(tools)]
            repeat: list[Run] = []
            for tool in order:
                if tool == SEQUENTIAL:
                    run = run_sequential(servers, objects)
                elif tool == MIRROR:
                    run = run_mirror(servers, objects, args.workers)
                else:
                    run = run_rclone(servers, objects, tool)
                repeat.append(run)
                again = f", rerun {run.rerun.wall:.3f} s" if run.rerun else ""
                print(f"  repeat {i + 1}: {tool}: {run.first.wall:.2f} s{again}", flush=True)
            runs.append(sorted(repeat, key=lambda r: tools.index(r.tool)))
        servers.stop_offsite()
        load_after = loadavg()
        result = report(runs)
        print(f"load before {load_before}, after {load_after}")
        result.update(
            date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            cores=os.cpu_count(),
            objects=len(objects),
            total_mib=total / 2**20,
            largest_mib=max(objects.values()) / 2**20,
            workers=args.workers,
            load_before=load_before,
            load_after=load_after,
            runs=[[asdict(run) for run in repeat] for repeat in runs],
        )
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "mirror-latest.json").write_text(json.dumps(result, indent=2))
    except BenchFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        servers.stop_offsite()
        servers.live.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
