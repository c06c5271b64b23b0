"""Benchmark opsdrill backup and drill against the floors and the tools users pick instead.

For each --sizes value (MB of demo CRM data) one local stack is started; every tool then
works on the same live PostgreSQL, the same off-site S3 server (moto) and the same data.
Each repeat runs the floors, then one phase per tool in an order rotated every repeat;
each phase starts on a freshly restarted moto with empty buckets (moto keeps all it was
sent in memory and slows down as it grows), so every tool meets the same server:
  floors      A         pg_dump -Fc -Z0 > /dev/null of the live database
              pipeline  opsdrill's own pipeline (pg_dump -Z0 | zstd -1 | gpg) to a null sink
              B         createdb + pg_restore -j2 of a local uncompressed custom-format dump
  opsdrill    backup    `opsdrill backup` (pg_dump | zstd | gpg -> S3 multipart + manifest)
              drill     `opsdrill restore --drill` (fetch, decrypt, restore, verify, drop)
  runbook     backup    pg_dump -Fc | gzip | gpg | rclone rcat (the seed runbook's pipeline)
              restore   rclone cat | gpg -d | gunzip | pg_restore (one job), counts, drop
  pgBackRest  backup    full, zst + aes-256-cbc, to an S3 repo (via stunnel) and a posix repo
              restore   restore, start a postgres, wait for recovery, counts, stop, remove
"counts": every table's rows against the live database, as the drill compares them.
Every ratio is the median of the per-repeat ratios. Targets: pipeline <= 1.3 x A;
backup <= 1.5 x A, <= 0.25 x the runbook's, <= 0.5 x pgBackRest's (S3); drill <= 1.0 x B
and faster than the runbook's and pgBackRest's (S3) restores. The peak RSS of the opsdrill
process (children excluded) must stay under 150 MiB and flat across sizes. A peer whose
tool is missing prints SKIP with the package to install. The inventory is rewritten with
content_hashes = false (hashes are optional). The load (/proc/loadavg) and the S3
server's CPU are printed. A measurement: exits 0 even on a MISS, 1 only when an operation
itself failed. Results also go to benchmarks/results/latest.json.
Usage: python benchmarks/bench_backup.py [--sizes 1024 4096] [--repeat 3] [--s3-timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import as_installed
import psycopg
import tomli_w
from peers import backup_runbook, pgbackrest
from peers.backup_stack import RUNBOOK_BUCKET, OffsiteS3, stop_leftovers
from psycopg.conninfo import make_conninfo

from opsdrill.backups.backup import LOCK_WAIT_MS, compress_stage
from opsdrill.config.envfile import read_env_file
from opsdrill.config.inventory import load
from opsdrill.gpg import GpgHome
from opsdrill.pipeline import HashingReader, Pipeline, Stage
from opsdrill.s3 import PART_SIZE
from opsdrill_stack.local import LocalStack
from opsdrill_stack.postgres import SUPERUSER, pg_bindir

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "latest.json"
RSS_LIMIT_MIB = 150.0
RSS_FLAT_MIB = 20.0  # "flat": peak RSS may differ by at most this much between sizes
MIB = 1024 * 1024
# Runs the real CLI, then reports this process's own peak RSS (KiB; children not included).
# VmHWM, not ru_maxrss: Linux carries the parent's RSS over fork+exec into ru_maxrss, so a
# large launcher (this script holds ~90 MiB) would be reported instead of the CLI's own peak.
WRAPPER = (
    "import sys; from opsdrill.cli import main; rc=main(sys.argv[1:]); "
    "hwm=open('/proc/self/status').read().split('VmHWM:')[1].split()[0]; "
    "print('MAXRSS', hwm, file=sys.stderr); sys.exit(rc)"
)
# What each measured operation runs (the keys of runs_seconds in the results).
OPS = {
    "A": "pg_dump -Fc -Z0 > /dev/null",
    "pipeline": "opsdrill's pg_dump | zstd -1 | gpg > null sink",
    "backup": "opsdrill backup (S3 multipart + manifest)",
    "runbook_backup": "runbook: pg_dump -Fc | gzip | gpg | rclone rcat",
    "pgbackrest_s3_backup": "pgBackRest full backup, S3 repo",
    "pgbackrest_posix_backup": "pgBackRest full backup, posix repo",
    "B": "createdb + pg_restore -j2 of a local file",
    "drill": "opsdrill restore --drill",
    "runbook_restore": "runbook: rclone cat | gpg -d | gunzip | pg_restore",
    "pgbackrest_s3_restore": "pgBackRest restore from S3 + recovery",
    "pgbackrest_posix_restore": "pgBackRest restore from posix + recovery",
}
# Operations that talk to the off-site S3 server: its CPU is recorded for each.
S3_OPS = (
    "backup",
    "drill",
    "runbook_backup",
    "runbook_restore",
    "pgbackrest_s3_backup",
    "pgbackrest_s3_restore",
)


@dataclass(frozen=True)
class Ratio:
    """``num / den`` per repeat, median over repeats; ``strict``: must be below target."""

    num: str
    den: str
    target: float | None = None
    strict: bool = False

    @property
    def key(self) -> str:
        return f"{self.num}/{self.den}"

    def ok(self, value: float) -> bool | None:
        if self.target is None:
            return None
        return value < self.target if self.strict else value <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return ""
        return f"{'< ' if self.strict else '<= '}{self.target:g}"


RATIOS = [
    Ratio("pipeline", "A", 1.3),
    Ratio("backup", "A", 1.5),
    Ratio("backup", "runbook_backup", 0.25),
    Ratio("backup", "pgbackrest_s3_backup", 0.5),
    Ratio("backup", "pgbackrest_posix_backup"),
    Ratio("runbook_backup", "A"),
    Ratio("pgbackrest_s3_backup", "A"),
    Ratio("pgbackrest_posix_backup", "A"),
    Ratio("drill", "B", 1.0),
    Ratio("drill", "runbook_restore", 1.0, strict=True),
    Ratio("drill", "pgbackrest_s3_restore", 1.0, strict=True),
    Ratio("drill", "pgbackrest_posix_restore"),
    Ratio("runbook_restore", "B"),
    Ratio("pgbackrest_s3_restore", "B"),
    Ratio("pgbackrest_posix_restore", "B"),
]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pg_env(port: int, password: str, dbname: str) -> dict[str, str]:
    """libpq environment: the password travels as PGPASSWORD, never in argv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST="127.0.0.1", PGPORT=str(port), PGUSER=SUPERUSER, PGDATABASE=dbname)
    env["PGPASSWORD"] = password
    return env


def conninfo_of(env: dict[str, str], dbname: str) -> str:
    return make_conninfo(
        "",
        host=env["PGHOST"],
        port=env["PGPORT"],
        user=env["PGUSER"],
        password=env["PGPASSWORD"],
        dbname=dbname,
    )


def timed(argv: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return seconds


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """Run `opsdrill ARGS` in a subprocess: (wall seconds, own peak RSS MiB, stdout)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, cwd=REPO
    )
    seconds = time.perf_counter() - started
    found = re.search(r"^MAXRSS (\d+)$", proc.stderr, re.M)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"opsdrill {args[0]} exited {proc.returncode}:\n{proc.stderr[-1500:]}")
    return seconds, int(found.group(1)) / 1024, proc.stdout


def rewrite_inventory(inv_path: Path, s3_timeout: float | None) -> None:
    """content_hashes = false (optional feature); optionally a longer S3 read timeout."""
    data = tomllib.loads(inv_path.read_text())
    for db in data["databases"].values():
        db["content_hashes"] = False
    if s3_timeout:
        for store in data["stores"].values():
            store["timeout_seconds"] = s3_timeout
    inv_path.write_text("# rewritten by bench_backup.py\n" + tomli_w.dumps(data))


class OwnPipeline:
    """opsdrill backup's stages (pg_dump -Z0 | compressor | gpg, built by the same code,
    read and hashed by the same reader) into a null sink: no snapshot, upload or
    manifest. What the pipeline costs over the floor."""

    def __init__(self, inv_path: Path, bindir: Path, live: dict[str, str]) -> None:
        inv = load(inv_path)
        self.db = inv.database("crm")
        self.bindir, self.live = bindir, live
        self.home = GpgHome()
        gpg = inv.model.gpg
        assert gpg is not None
        self.home.import_keys(inv.resolve_path(gpg.public_keys_file), what="public keys")
        self.recipients = list(self.home.encryption_key_ids(gpg.recipients))

    def run(self) -> float:
        started = time.perf_counter()
        dump = [str(self.bindir / "pg_dump"), "--format=custom", "--compress=0"]
        dump += [f"--lock-wait-timeout={LOCK_WAIT_MS}", "--no-password"]
        stages = [
            Stage("pg_dump", dump, env=self.live),
            compress_stage(self.db),
            Stage("encrypt (gpg)", self.home.encrypt_argv(self.recipients)),
        ]
        pipeline = Pipeline(stages)
        try:
            reader = HashingReader(pipeline)
            while reader.read(PART_SIZE):
                pass
        finally:
            pipeline.close()
        return time.perf_counter() - started

    def close(self) -> None:
        self.home.close()


@dataclass
class Peers:
    """The peers that can run here, and the SKIP lines of those that cannot."""

    runbook: backup_runbook.Runbook | None
    pgbackrest: pgbackrest.PgBackRest | None
    pgbackrest_s3: bool
    skipped: list[str]

    def close(self) -> None:
        if self.runbook is not None:
            self.runbook.close()
        if self.pgbackrest is not None:
            self.pgbackrest.close()

    def versions(self) -> dict[str, str]:
        out = self.runbook.versions() if self.runbook is not None else {}
        if self.pgbackrest is not None:
            out["pgbackrest"] = self.pgbackrest.version()
        return out


def start_peers(
    stack: LocalStack, base: Path, bindir: Path, secrets: dict[str, str], s3: OffsiteS3
) -> Peers:
    skipped: list[str] = []
    inv = tomllib.loads((base / "inventory.toml").read_text())
    runbook = None
    why = backup_runbook.missing()
    if why:
        skipped.append(why)
    else:
        runbook = backup_runbook.Runbook(
            base / "peers" / "runbook",
            bindir,
            fingerprint=inv["gpg"]["recipients"][0],
            public_key=base / inv["gpg"]["public_keys_file"],
            secret_key=base / inv["gpg"]["drill_private_key_file"],
            passphrase=secrets[inv["gpg"]["drill_passphrase_env"]],
            s3_port=s3.port,
            access_key=s3.access_key,
            secret_access_key=s3.secret_key,
        )
    gone = pgbackrest.missing()
    skipped += list(dict.fromkeys(v for v in gone.values() if v))
    pgbr = None
    if gone["posix"] is None:
        pgbr = pgbackrest.PgBackRest(
            base / "peers" / "pgbackrest",
            bindir,
            stack=stack,
            live_password=secrets["OPSDRILL_LIVE_PG_PASSWORD"],
            s3_port=s3.port if gone["s3"] is None else None,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
        )
    return Peers(runbook, pgbr, gone["s3"] is None, skipped)


def median_ratios(runs: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Each ratio per repeat (both operations measured in that repeat), and its median."""
    out: dict[str, dict[str, Any]] = {}
    for r in RATIOS:
        pairs = list(zip(runs.get(r.num, []), runs.get(r.den, []), strict=False))
        if not pairs or len(runs[r.num]) != len(runs[r.den]):
            continue
        per_repeat = [n / d for n, d in pairs]
        value = statistics.median(per_repeat)
        out[r.key] = {
            "ratio": round(value, 3),
            "per_repeat": [round(x, 3) for x in per_repeat],
            "target": r.target_text() or None,
            "pass": r.ok(value),
        }
    return out


@dataclass
class Servers:
    """How to reach the stack's servers, as libpq environments and a conninfo."""

    live: dict[str, str]
    sandbox: dict[str, str]
    live_conninfo: str


class SizeRun:
    """The measurements of one size: each operation's seconds per repeat, the S3 server's
    (and the TLS terminator's) CPU during each S3 operation, sizes stored, RSS."""

    def __init__(
        self, inv: Path, bindir: Path, servers: Servers, s3: OffsiteS3, peers: Peers
    ) -> None:
        self.inv, self.bindir, self.srv, self.s3, self.peers = inv, bindir, servers, s3, peers
        self.runs: dict[str, list[float]] = {}
        self.s3_cpu: dict[str, list[float]] = {}
        self.tls_cpu: dict[str, list[float]] = {}
        self.rss: dict[str, list[float]] = {"backup": [], "drill": []}
        self.stored: dict[str, int] = {}
        self.drill_detail = ""

    def measure(self, op: str, run: Callable[[], float]) -> None:
        pgbr = self.peers.pgbackrest
        before = (self.s3.cpu(), pgbr.cpu() if pgbr else 0.0)
        self.runs.setdefault(op, []).append(run())
        if op in S3_OPS:
            self.s3_cpu.setdefault(op, []).append(self.s3.cpu() - before[0])
            if op.startswith("pgbackrest") and pgbr:
                self.tls_cpu.setdefault(op, []).append(pgbr.cpu() - before[1])

    def floors(self, i: int, own: OwnPipeline, dump_file: Path) -> None:
        pg_dump = [str(self.bindir / "pg_dump"), "-Fc", "-Z0"]
        with open(os.devnull, "wb") as null:
            self.measure("A", partial(timed, pg_dump, self.srv.live, null))
        self.measure("pipeline", own.run)
        scratch = f"bench_baseline_{i}"
        sandbox = self.srv.sandbox

        def bare_restore() -> float:
            started = time.perf_counter()
            timed([str(self.bindir / "createdb"), "-T", "template0", scratch], sandbox)
            restore = [str(self.bindir / "pg_restore"), "-j2", "--exit-on-error", "--no-owner"]
            timed([*restore, "--no-privileges", "-d", scratch, str(dump_file)], sandbox)
            return time.perf_counter() - started

        self.measure("B", bare_restore)
        timed([str(self.bindir / "dropdb"), "--force", scratch], sandbox)

    def opsdrill_phase(self, i: int) -> None:
        cli = ["-i", str(self.inv), "-d", "crm"]

        def backup() -> float:
            seconds, peak, out = run_cli(["backup", *cli])
            self.rss["backup"].append(peak)
            found = re.search(r": (\d+) bytes", out)
            self.stored["backup"] = int(found.group(1)) if found else 0
            return seconds

        def drill() -> float:
            seconds, peak, out = run_cli(["restore", *cli, "--drill"])
            self.rss["drill"].append(peak)
            self.drill_detail = out.splitlines()[0] if out else ""
            return seconds

        self.measure("backup", backup)
        self.measure("drill", drill)

    def runbook_phase(self, i: int) -> None:
        rb = self.peers.runbook
        assert rb is not None
        key = f"crm/crm-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{i}.dump.gz.gpg"
        self.measure("runbook_backup", partial(rb.backup, key, self.srv.live))
        self.stored["runbook_backup"] = self.s3.bucket_bytes(RUNBOOK_BUCKET)
        scratch = f"bench_runbook_{i}"
        restored = conninfo_of(self.srv.sandbox, scratch)
        self.measure(
            "runbook_restore",
            partial(rb.restore, key, scratch, self.srv.sandbox, restored, self.srv.live_conninfo),
        )

    def pgbackrest_phase(self, i: int) -> None:
        pb = self.peers.pgbackrest
        assert pb is not None
        pb.reset_repos()
        repos = [("s3", pgbackrest.S3_REPO)] if self.peers.pgbackrest_s3 else []
        for kind, repo in [*repos, ("posix", pgbackrest.POSIX_REPO)]:
            self.measure(f"pgbackrest_{kind}_backup", partial(pb.backup, repo))
            self.stored[f"pgbackrest_{kind}_backup"] = pb.repo_bytes(repo)
            self.measure(
                f"pgbackrest_{kind}_restore", partial(pb.restore, repo, self.srv.live_conninfo)
            )

    def phases(self) -> list[tuple[str, Callable[[int], None]]]:
        out: list[tuple[str, Callable[[int], None]]] = [("opsdrill", self.opsdrill_phase)]
        if self.peers.runbook is not None:
            out.append(("runbook", self.runbook_phase))
        if self.peers.pgbackrest is not None:
            out.append(("pgBackRest", self.pgbackrest_phase))
        return out


def bench_size(size_mb: int, repeat: int, s3_timeout: float | None) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="opsdrill-bench-"))
    stack = LocalStack(base, size_mb=size_mb)
    bindir = pg_bindir()
    peers: Peers | None = None
    own: OwnPipeline | None = None
    try:
        started = time.perf_counter()
        inv = stack.up()
        up_seconds = time.perf_counter() - started
        print(f"[{size_mb} MB] stack up in {up_seconds:.0f}s ({base})", flush=True)
        rewrite_inventory(inv, s3_timeout)
        secrets = read_env_file(base / "secrets.env")
        comps = stack.state["components"]
        s3 = OffsiteS3(
            stack, secrets["OPSDRILL_OFFSITE_ACCESS_KEY"], secrets["OPSDRILL_OFFSITE_SECRET_KEY"]
        )
        # Before the first measurement: pgBackRest restarts the live server (archiving).
        peers = start_peers(stack, base, bindir, secrets, s3)
        for line in peers.skipped:
            print(line, flush=True)
        live = pg_env(comps["pg_live"]["port"], secrets["OPSDRILL_LIVE_PG_PASSWORD"], "crm")
        sandbox = pg_env(
            comps["pg_sandbox"]["port"], secrets["OPSDRILL_SANDBOX_PG_PASSWORD"], "postgres"
        )
        srv = Servers(live, sandbox, conninfo_of(live, "crm"))
        with psycopg.connect(srv.live_conninfo) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            db_bytes = int(row[0]) if row else 0
        dump_file = base / "baseline.dump"  # prepared once; also warms the page cache
        timed([str(bindir / "pg_dump"), "-Fc", "-Z0", "-f", str(dump_file)], live)
        own = OwnPipeline(inv, bindir, live)
        run = SizeRun(inv, bindir, srv, s3, peers)
        phases = run.phases()
        loads = [loadavg()]
        moto_restart: list[float] = []
        for i in range(repeat):
            loads.append(loadavg())
            print(f"[{size_mb} MB] run {i + 1}/{repeat}: load {loads[-1]}", flush=True)
            run.floors(i, own, dump_file)
            shift = i % len(phases)  # every tool takes its turn first and last
            for name, phase in phases[shift:] + phases[:shift]:
                moto_restart.append(s3.restart())
                phase(i)
                print(f"  {name} done (load {loadavg()})", flush=True)
            print(
                f"[{size_mb} MB] run {i + 1}/{repeat}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in run.runs.items()),
                flush=True,
            )
        loads.append(loadavg())
        medians = {k: statistics.median(v) for k, v in run.runs.items()}

        def median_of(values: dict[str, list[float]]) -> dict[str, float]:
            return {k: round(statistics.median(v), 2) for k, v in values.items()}

        return {
            "size_mb": size_mb,
            "s3_timeout_seconds": s3_timeout,
            "stack_up_seconds": round(up_seconds, 1),
            "database_bytes": db_bytes,
            "baseline_dump_bytes": dump_file.stat().st_size,
            "backup_object_bytes": run.stored.get("backup", 0),
            "stored_bytes": run.stored,
            "operations": {k: OPS[k] for k in run.runs},
            "runs_seconds": {k: [round(x, 3) for x in v] for k, v in run.runs.items()},
            "median_seconds": {k: round(v, 3) for k, v in medians.items()},
            "ratios": median_ratios(run.runs),
            "peak_rss_mib": {k: round(max(v), 1) for k, v in run.rss.items()},
            "rss_runs_mib": {k: [round(x, 1) for x in v] for k, v in run.rss.items()},
            "s3_server_cpu_seconds": median_of(run.s3_cpu),
            "tls_terminator_cpu_seconds": median_of(run.tls_cpu),
            "s3_restart_seconds": median_of({"median": moto_restart}).get("median"),
            "loadavg": loads,
            "skipped": peers.skipped,
            "peer_versions": peers.versions(),
            "last_drill_summary": run.drill_detail,
        }
    finally:
        if own is not None:
            own.close()
        if peers is not None:
            peers.close()
        stack.down()
        left = stop_leftovers(base)
        if left:
            print(f"[{size_mb} MB] stopped leftover processes of the run: {left}", flush=True)


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "PASS" if ok else "MISS"


def print_table(r: dict[str, Any], repeat: int) -> None:
    med = r["median_seconds"]
    print(
        f"\n== crm {r['size_mb']} MB: pg_database_size {r['database_bytes'] / MIB:,.0f} MiB, "
        f"opsdrill object {r['backup_object_bytes'] / MIB:,.1f} MiB "
        f"(content_hashes = false, S3 timeout {r['s3_timeout_seconds'] or 'as stack'}); "
        f"median of {repeat}; load {' -> '.join(r['loadavg'])} =="
    )
    print(f"{'operation':<25} {'what runs':<52} {'median s':>9} {'stored MiB':>10}")
    for op, label in OPS.items():
        if op in med:
            size = r["stored_bytes"].get(op)
            stored = f"{size / MIB:10.1f}" if size else " " * 10
            print(f"{op:<25} {label:<52} {med[op]:9.2f} {stored}")
    print(f"\n{'ratio (median of per-repeat)':<50} {'ratio':>6} {'target':>7}  result  per repeat")
    for key, v in r["ratios"].items():
        per = ", ".join(f"{x:.2f}" for x in v["per_repeat"])
        print(
            f"{key:<50} {v['ratio']:>6.2f} {v['target'] or '':>7}  {verdict(v['pass']):<6}  {per}"
        )
    for line in r["skipped"]:
        print(line)
    cpu = ", ".join(f"{k} {v:.1f} s" for k, v in r["s3_server_cpu_seconds"].items())
    print(f"off-site S3 server (moto, same cores) CPU per run: {cpu}")
    if r["tls_terminator_cpu_seconds"]:
        tls = ", ".join(f"{k} {v:.1f} s" for k, v in r["tls_terminator_cpu_seconds"].items())
        print(f"TLS terminator for pgBackRest (stunnel, same cores) CPU per run: {tls}")
    for op, mib in r["peak_rss_mib"].items():
        print(
            f"peak RSS of the opsdrill process, {op:<6}: {mib:6.1f} MiB "
            f"(target < {RSS_LIMIT_MIB:.0f} MiB: {verdict(mib < RSS_LIMIT_MIB)})"
        )


def main(argv: list[str] | None = None) -> int:
    as_installed.with_bytecode_caches()
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Peers: the seed runbook's pipeline (needs rclone) and pgBackRest (needs "
        "pgbackrest, and stunnel4 for its S3 repo); a missing one is skipped.",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1024], help="demo CRM sizes in MB")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="interleaved runs per size (tool order rotated); ratios are medians of per-run ratios",
    )
    p.add_argument(
        "--s3-timeout",
        type=float,
        help="rewrite the stores' timeout_seconds (moto needs minutes to complete a GB upload)",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the stack
    results, failures = [], []
    for size in args.sizes:
        try:
            result = bench_size(size, args.repeat, args.s3_timeout)
        except RuntimeError as exc:  # an operation failed: no figures for this size
            print(f"\n== crm {size} MB: FAILED: {exc}", flush=True)
            failures.append({"size_mb": size, "error": str(exc)})
            continue
        print_table(result, args.repeat)
        results.append(result)
    rss_all = {op: [r["peak_rss_mib"][op] for r in results] for op in ("backup", "drill")}
    flat = {op: bool(v) and max(v) - min(v) <= RSS_FLAT_MIB for op, v in rss_all.items()}
    if len(results) > 1:
        for op, values in rss_all.items():
            spread = max(values) - min(values)
            print(
                f"RSS across sizes, {op}: {', '.join(f'{v:.1f}' for v in values)} MiB "
                f"(spread {spread:.1f} <= {RSS_FLAT_MIB:.0f} MiB: {verdict(flat[op])})"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "repeat": args.repeat,
        "content_hashes": False,
        "s3_timeout_seconds": args.s3_timeout,
        "targets": {r.key: r.target_text() for r in RATIOS if r.target is not None},
        "rss_flat_across_sizes": flat,
    }
    RESULTS.write_text(
        json.dumps({"meta": meta, "sizes": results, "failures": failures}, indent=2) + "\n"
    )
    print(f"\nresults written to {RESULTS.relative_to(REPO)}")
    return 1 if failures else 0  # a missed target is a result; a failed operation is not


if __name__ == "__main__":
    sys.exit(main())
