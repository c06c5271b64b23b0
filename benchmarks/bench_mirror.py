"""Mirror benchmark: opsdrill's parallel, content-comparing mirror against a plain
sequential copy of the same objects with the minio SDK, between two local S3 servers.

Prints ratios measured in the same run (targets: mirror >= 2x faster than the sequential
copy; a second, no-change run < 5% of the first). Not a test: it exits 0 either way.

    python benchmarks/bench_mirror.py [--total-mb 500] [--objects 400] [--workers 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w
from minio import Minio
from minio.commonconfig import ENABLED
from minio.versioningconfig import VersioningConfig

from opsdrill.config.inventory import load
from opsdrill.files.mirror import run_mirror
from opsdrill_stack.s3server import S3Server

RESULTS = Path(__file__).parent / "results"
KEYS = {
    "BENCH_LIVE_ACCESS": "live-access-key",
    "BENCH_LIVE_SECRET": "live-secret-key",
    "BENCH_OFF_ACCESS": "offsite-access-key",
    "BENCH_OFF_SECRET": "offsite-secret-key",
}


def sizes(total: int, count: int, rng: random.Random) -> list[int]:
    """A files bucket's shape: many small files, a few large ones (some multipart)."""
    weights = [rng.paretovariate(1.2) for _ in range(count)]
    scale = total / sum(weights)
    return [max(1, int(w * scale)) for w in weights]


def seed(client: Minio, bucket: str, total: int, count: int) -> list[tuple[str, int]]:
    rng = random.Random(42)
    objects = []
    for i, size in enumerate(sizes(total, count, rng)):
        key = f"uploads/{i % 17:02d}/{i:05d}.bin"
        client.put_object(bucket, key, io.BytesIO(os.urandom(size)), size)
        objects.append((key, size))
    return objects


def sequential_copy(
    src: Minio, dst: Minio, bucket: str, target: str, objects: list[tuple[str, int]]
) -> float:
    """The baseline: get then put, one object at a time, streamed."""
    started = time.perf_counter()
    for key, size in objects:
        resp = src.get_object(bucket, key)
        try:
            dst.put_object(target, key, resp, size, part_size=16 * 1024 * 1024)
        finally:
            resp.close()
            resp.release_conn()
    return time.perf_counter() - started


def write_inventory(base: Path, live: S3Server, off: S3Server, workers: int) -> Path:
    env = base / "bench.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in KEYS.items()))

    def store(server: S3Server, bucket: str, who: str) -> dict[str, Any]:
        return {
            "endpoint": f"127.0.0.1:{server.port}",
            "bucket": bucket,
            "secure": False,
            "access_key_env": f"BENCH_{who}_ACCESS",
            "secret_key_env": f"BENCH_{who}_SECRET",
            "timeout_seconds": 120.0,
        }

    inv = {
        "name": "bench-mirror",
        "env_file": str(env),
        "stores": {"live": store(live, "files", "LIVE"), "offsite": store(off, "mirror", "OFF")},
        "mirrors": {"files": {"source": "live", "target": "offsite", "workers": workers}},
    }
    path = base / "inventory.toml"
    path.write_text(tomli_w.dumps(inv))
    return path


def cpu_seconds(*pids: int) -> float:
    """CPU time of this process plus the given server processes."""
    total = resource.getrusage(resource.RUSAGE_SELF)
    seconds = total.ru_utime + total.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total-mb", type=int, default=500)
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="opsdrill-bench-mirror-"))
    live, off = S3Server("live", base / "live"), S3Server("offsite", base / "offsite")
    try:
        live.start()
        off.start()
        src = Minio(
            f"127.0.0.1:{live.port}",
            KEYS["BENCH_LIVE_ACCESS"],
            KEYS["BENCH_LIVE_SECRET"],
            secure=False,
        )
        dst = Minio(
            f"127.0.0.1:{off.port}",
            KEYS["BENCH_OFF_ACCESS"],
            KEYS["BENCH_OFF_SECRET"],
            secure=False,
        )
        src.make_bucket("files")
        dst.make_bucket("plain")
        dst.make_bucket("mirror")
        dst.set_bucket_versioning("mirror", VersioningConfig(ENABLED))
        objects = seed(src, "files", args.total_mb * 1024 * 1024, args.objects)
        total = sum(s for _, s in objects)
        # Cores kept busy (CPU-s of client + both servers / wall s): near the core count,
        # the copy is CPU-bound on this machine and more parallelism cannot speed it up.
        assert live.pid and off.pid
        cpu0 = cpu_seconds(live.pid, off.pid)
        baseline = sequential_copy(src, dst, "files", "plain", objects)
        cpu1 = cpu_seconds(live.pid, off.pid)
        inv = load(write_inventory(base, live, off, args.workers))
        first = run_mirror(inv, "files")
        cpu2 = cpu_seconds(live.pid, off.pid)
        busy = {"sequential": (cpu1 - cpu0) / baseline, "mirror": (cpu2 - cpu1) / first.seconds}
        second = run_mirror(inv, "files")
        assert first.ok and first.copied == len(objects), first.line()
        assert second.ok and second.copied == 0, second.line()
        speedup = baseline / first.seconds
        rerun = second.seconds / first.seconds
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cores": os.cpu_count(),
            "objects": len(objects),
            "total_mib": total / 2**20,
            "largest_mib": max(s for _, s in objects) / 2**20,
            "workers": args.workers,
            "sequential_copy_seconds": round(baseline, 2),
            "mirror_first_seconds": round(first.seconds, 2),
            "mirror_second_seconds": round(second.seconds, 3),
            "speedup": round(speedup, 2),
            "second_run_fraction": round(rerun, 4),
            "cores_busy": {k: round(v, 2) for k, v in busy.items()},
        }
        print(
            f"mirror benchmark: {len(objects)} objects, {total / 2**20:.0f} MiB "
            f"(largest {result['largest_mib']:.1f} MiB), {args.workers} workers, "
            f"{os.cpu_count()} cores, moto servers on 127.0.0.1"
        )
        print(
            f"  sequential minio copy : {baseline:8.2f} s  (baseline; "
            f"{busy['sequential']:.2f} cores busy)"
        )
        print(
            f"  opsdrill mirror, 1st  : {first.seconds:8.2f} s  speedup {speedup:.2f}x "
            f"(target >= 2x) {'PASS' if speedup >= 2 else 'MISS'}; "
            f"{busy['mirror']:.2f} cores busy"
        )
        print(
            f"  opsdrill mirror, 2nd  : {second.seconds:8.3f} s  = {rerun:.1%} of the first "
            f"(target < 5%) {'PASS' if rerun < 0.05 else 'MISS'}"
        )
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "mirror-latest.json").write_text(json.dumps(result, indent=2))
    finally:
        off.stop()
        live.stop()


if __name__ == "__main__":
    main()
