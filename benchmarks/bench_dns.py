"""Benchmark the DNS checks: every analysis for 100 generated sending domains on a local Knot.

A Knot server of its own (temp dir, free port) serves --domains generated sending domains,
each set up as a production domain is:
  SPF    v=spf1 mx include:<mail provider> include:<relay> -all, where each provider record
         includes its netblocks one level down (5 DNS-querying terms in all)
  DKIM   s1: a TXT record with our own 2048-bit RSA key (the relay signs with it); the mail
         provider's selector: a CNAME into the provider's zone, which publishes its key
  DMARC  p=reject, sp=reject, rua at an external receiver that authorises the reports
  MX     two hosts with A records; the application host (also an A record) is forbidden
plus the providers' zones and the report receiver's zone. The RSA keys are generated once
and shared by every domain. The expectations go into a generated inventory, loaded with
the real loader; each analysis then runs as the DNS checks run it (opsdrill.dns.suite:
SPF with check_host for the domain's sending IP, DKIM for each expected selector, DMARC,
MX), for every domain: sequentially on one thread (the baseline), then through a
ThreadPoolExecutor over one shared DnsResolver. Target: the concurrent wall time
(median) <= 2 s for 100 domains (scaled for other --domains). Reports the queries sent
per domain.
Every generated record is correct, so a finding is a bug in this generator or in
opsdrill.dns: the findings are printed and the script exits 1, as it does when Knot fails
or a query times out. A missed target prints MISS and exits 0. Results also go to
benchmarks/results/dns-latest.json.
Usage: python benchmarks/bench_dns.py [--domains 100] [--workers 16] [--repeat 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import tomli_w

from opsdrill.config.inventory import Inventory, load
from opsdrill.dns import DnsReport, DnsResolver, Resolver
from opsdrill.dns.suite import dkim_report, dmarc_report, expectations, mx_report, spf_report
from opsdrill.errors import OpsdrillError
from opsdrill_stack.demo_dns import DKIM_BITS, DkimKey, _generate_key, _txt, _zone, dkim_owner
from opsdrill_stack.knot import KnotServer

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "dns-latest.json"
TARGET_SECONDS = 2.0  # per 100 domains; other --domains values scale it linearly
OWN_SELECTOR = "s1"
REPORTS_ZONE = "dmarc-reports.test"
RUA = f"mailto:dmarc@{REPORTS_ZONE}"
DMARC_RECORD = f"v=DMARC1; p=reject; sp=reject; adkim=r; aspf=r; rua={RUA}"
MX_ADDRESSES = ("192.0.2.10", "192.0.2.11")
APP_ADDRESS = "203.0.113.10"
# What the analyses are called in the output, in the order they run for a domain.
KINDS = ("spf+check_host", "dkim txt", "dkim cname", "dmarc", "mx")

Row = tuple[str, str, str]  # (absolute owner, type, rdata)


@dataclass(frozen=True)
class Provider:
    """A service that sends for the domains, publishing itself as the big ones do: an SPF
    record that includes its netblocks. A mail provider (``signs=True``) also publishes the
    DKIM key its customers point a CNAME at; a relay signs with the domain's own key."""

    name: str
    index: int
    signs: bool

    @property
    def zone(self) -> str:
        return f"{self.name}.test"

    @property
    def selector(self) -> str:
        return f"{self.name.replace('-', '')}1"

    @property
    def spf_mechanism(self) -> str:
        return f"include:_spf.{self.zone}"

    @property
    def dkim_suffix(self) -> str:
        return f"dkim.{self.zone}"

    @property
    def selector_target(self) -> str:
        return f"{self.selector}.{self.dkim_suffix}"

    @property
    def ip4(self) -> str:
        return f"198.51.100.{64 * self.index}/26"

    @property
    def sending_ip(self) -> str:
        return f"198.51.100.{64 * self.index + 25}"

    def rows(self, key: DkimKey | None) -> list[Row]:
        rows = [
            # ~all as in Google's _spf.google.com: inside an include only a pass counts.
            _txt(f"_spf.{self.zone}", f"v=spf1 include:_netblocks.{self.zone} ~all"),
            _txt(
                f"_netblocks.{self.zone}",
                f"v=spf1 ip4:{self.ip4} ip6:2001:db8:{self.index + 1}::/48 -all",
            ),
        ]
        return rows + ([_txt(self.selector_target, key.record)] if key else [])

    def inventory(self) -> dict[str, Any]:
        table: dict[str, Any] = {"spf": [self.spf_mechanism]}
        if self.signs:
            table["dkim_selectors"] = [self.selector]
            table["dkim_cname_suffix"] = self.dkim_suffix
        return table


MAIL_PROVIDERS = (Provider("mailer-a", 0, True), Provider("mailer-b", 1, True))
RELAYS = (Provider("relay-a", 2, False), Provider("relay-b", 3, False))


@dataclass(frozen=True)
class Domain:
    index: int
    mailer: Provider  # DKIM: a CNAME to its key
    relay: Provider  # DKIM: our own key, selector s1; the known sending IP is the relay's

    @property
    def name(self) -> str:
        return f"sender-{self.index:03d}.test"

    @property
    def app_host(self) -> str:
        return f"app.{self.name}"

    def rows(self, own_key: DkimKey) -> list[Row]:
        name, mailer = self.name, self.mailer
        # The sending IP is in the second include: check_host walks mx and the first
        # include before it matches.
        spf = f"v=spf1 mx {mailer.spf_mechanism} {self.relay.spf_mechanism} -all"
        return [
            _txt(name, spf),
            _txt(name, f"bench-site-verification={self.index:08x}"),  # not SPF: ignored
            _txt(dkim_owner(name, OWN_SELECTOR), own_key.record),
            (dkim_owner(name, mailer.selector), "CNAME", mailer.selector_target + "."),
            _txt(f"_dmarc.{name}", DMARC_RECORD),
            (name, "MX", f"10 mx1.{name}."),
            (name, "MX", f"20 mx2.{name}."),
            (f"mx1.{name}", "A", MX_ADDRESSES[0]),
            (f"mx2.{name}", "A", MX_ADDRESSES[1]),
            (self.app_host, "A", APP_ADDRESS),
        ]

    def inventory(self) -> dict[str, Any]:
        return {
            "providers": [self.mailer.name, self.relay.name],
            "dkim_selectors": [OWN_SELECTOR],
            "receives_mail": True,
            "forbidden_mx": [self.app_host],
            "sending_ips": [self.relay.sending_ip],
            "dkim_min_rsa_bits": DKIM_BITS,
            "dmarc": {
                "min_policy": "reject",
                "min_subdomain_policy": "reject",
                "require_rua": True,
                "adkim": "r",
                "aspf": "r",
            },
        }


@dataclass(frozen=True)
class Task:
    """One analysis of one domain, as one check (one parametrised test) runs it."""

    domain: str
    kind: str
    run: Callable[[Resolver], DnsReport]


def generate(count: int, dkim_dir: Path) -> tuple[list[Domain], dict[str, str], int]:
    """The domains, every zone's text, and how many RSA keys were generated."""
    dkim_dir.mkdir(mode=0o700)
    keys = {OWN_SELECTOR: _generate_key(f"{OWN_SELECTOR}._domainkey.*", OWN_SELECTOR, dkim_dir)}
    for p in MAIL_PROVIDERS:
        keys[p.selector] = _generate_key(p.selector_target, p.selector, dkim_dir)
    # Every mail provider / relay pairing, in turn.
    domains = [Domain(i, MAIL_PROVIDERS[i % 2], RELAYS[(i // 2) % 2]) for i in range(count)]
    zones = {d.name: _zone(d.name, d.rows(keys[OWN_SELECTOR])) for d in domains}
    for p in (*MAIL_PROVIDERS, *RELAYS):
        zones[p.zone] = _zone(p.zone, p.rows(keys.get(p.selector)))
    zones[REPORTS_ZONE] = _zone(
        REPORTS_ZONE,
        [
            (REPORTS_ZONE, "MX", f"10 mx.{REPORTS_ZONE}."),
            (f"mx.{REPORTS_ZONE}", "A", "192.0.2.53"),
            _txt(REPORTS_ZONE, "v=spf1 -all"),
            _txt(f"_dmarc.{REPORTS_ZONE}", "v=DMARC1; p=reject"),
            *(_txt(f"{d.name}._report._dmarc.{REPORTS_ZONE}", "v=DMARC1") for d in domains),
        ],
    )
    return domains, zones, len(keys)


def write_inventory(path: Path, domains: Sequence[Domain], port: int, timeout: float) -> Inventory:
    """The domains' expectations as an inventory file, loaded (and validated) for real."""
    data = {
        "name": "bench-dns",
        "dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout_seconds": timeout},
        "mail_providers": {p.name: p.inventory() for p in (*MAIL_PROVIDERS, *RELAYS)},
        "sending_domains": {d.name: d.inventory() for d in domains},
    }
    path.write_text("# written by bench_dns.py\n" + tomli_w.dumps(data))
    return load(path)


def tasks_for(inv: Inventory, domain: str) -> list[Task]:
    """The analyses the DNS checks run for one domain, with the inventory's expectations."""
    exp = expectations(inv, domain)
    tasks = [Task(domain, KINDS[0], partial(spf_report, exp=exp))]
    for sel in exp.selectors:
        kind = KINDS[2] if sel.cname_suffix else KINDS[1]
        tasks.append(Task(domain, kind, partial(dkim_report, exp=exp, sel=sel)))
    tasks.append(Task(domain, KINDS[3], partial(dmarc_report, exp=exp)))
    tasks.append(Task(domain, KINDS[4], partial(mx_report, exp=exp)))
    return tasks


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    seconds: float
    queries: int
    reports: list[tuple[Task, DnsReport]]
    per_kind: dict[str, int]  # queries by analysis kind; sequential runs only
    cpu: dict[str, float]  # CPU seconds spent by this process (all threads) and by knotd


class Clock:
    """Wall time, this process's CPU time (every thread) and Knot's CPU time of one run."""

    def __init__(self, knot_pid: int) -> None:
        self.knot_pid = knot_pid
        self.wall = time.perf_counter()
        self.own = time.process_time()
        self.knot = cpu_seconds(knot_pid)

    def stop(self) -> tuple[float, dict[str, float]]:
        wall = time.perf_counter() - self.wall
        cpu = {
            "bench": time.process_time() - self.own,
            "knotd": cpu_seconds(self.knot_pid) - self.knot,
        }
        return wall, cpu


def run_sequential(tasks: Sequence[Task], resolver: DnsResolver, knot_pid: int) -> Run:
    per_kind = dict.fromkeys(KINDS, 0)
    reports = []
    clock = Clock(knot_pid)
    for task in tasks:
        before = resolver.queries
        reports.append((task, task.run(resolver)))
        per_kind[task.kind] += resolver.queries - before
    seconds, cpu = clock.stop()
    return Run(seconds, resolver.queries, reports, per_kind, cpu)


def run_concurrent(
    tasks: Sequence[Task], resolver: DnsResolver, knot_pid: int, workers: int
) -> Run:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dns-bench")
    clock = Clock(knot_pid)
    try:
        reports = list(pool.map(lambda task: task.run(resolver), tasks))
        seconds, cpu = clock.stop()
    finally:  # a failed task or an interrupt: drop what has not started yet
        pool.shutdown(wait=True, cancel_futures=True)
    return Run(seconds, resolver.queries, list(zip(tasks, reports, strict=True)), {}, cpu)


def findings_of(run: Run) -> list[str]:
    return [
        f"{task.domain} [{task.kind}] {f.code}: {f.message}"
        for task, report in run.reports
        for f in report.findings
    ]


def target(domains: int) -> float:
    return TARGET_SECONDS * domains / 100


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def bench(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Generate, serve, and time; raises RuntimeError / OpsdrillError on a failure."""
    started = time.perf_counter()
    domains, zones, key_count = generate(args.domains, base / "dkim")
    generate_seconds = time.perf_counter() - started
    knot = KnotServer("dns-bench", base / "knot")
    started = time.perf_counter()
    try:
        knot.start(zones)
        start_seconds = time.perf_counter() - started
        print(
            f"{len(zones)} zones ({args.domains} sending domains, "
            f"{len(MAIL_PROVIDERS) + len(RELAYS)} providers, "
            f"1 report receiver), {key_count} RSA-{DKIM_BITS} keys generated in "
            f"{generate_seconds:.2f}s; Knot on 127.0.0.1:{knot.port} up in {start_seconds:.2f}s "
            f"({base})",
            flush=True,
        )
        inv = write_inventory(base / "inventory.toml", domains, knot.port, args.timeout)
        tasks = [t for d in domains for t in tasks_for(inv, d.name)]

        def resolver() -> DnsResolver:  # as the checks build theirs from [dns]
            dns = inv.dns
            return DnsResolver(list(dns.nameservers), dns.port, dns.timeout_seconds)

        # Warm-up, untimed: imports, pyspf's DNS hook, the first sockets. It also fails
        # fast on a generator bug before anything is timed.
        warm = run_sequential(tasks_for(inv, domains[0].name), resolver(), knot.pid)
        problems = findings_of(warm)
        if problems:
            return {"findings": problems, "phase": "warm-up"}
        runs: dict[str, list[Run]] = {"sequential": [], "concurrent": []}
        for i in range(args.repeat):
            runs["sequential"].append(run_sequential(tasks, resolver(), knot.pid))
            runs["concurrent"].append(run_concurrent(tasks, resolver(), knot.pid, args.workers))
            print(
                f"run {i + 1}/{args.repeat}: "
                + ", ".join(
                    f"{k} {v[-1].seconds:.3f}s ({v[-1].queries} queries)" for k, v in runs.items()
                ),
                flush=True,
            )
            problems = [p for v in runs.values() for p in findings_of(v[-1])]
            if problems:
                return {"findings": problems, "phase": f"run {i + 1}"}
        version = "Knot " + knot.version().split()[-1]
    finally:
        knot.stop()
    medians = {k: statistics.median(r.seconds for r in v) for k, v in runs.items()}
    queries = {k: v[-1].queries for k, v in runs.items()}
    per_kind = runs["sequential"][-1].per_kind
    return {
        "findings": [],
        "knot": version,
        "zones": len(zones),
        "rsa_keys": key_count,
        "generate_seconds": round(generate_seconds, 3),
        "knot_start_seconds": round(start_seconds, 3),
        "analyses": len(tasks),
        "runs_seconds": {k: [round(r.seconds, 4) for r in v] for k, v in runs.items()},
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        "queries": queries,
        "queries_consistent": len({r.queries for v in runs.values() for r in v}) == 1,
        "queries_per_domain": round(queries["concurrent"] / args.domains, 2),
        "queries_per_domain_by_analysis": {
            k: round(n / args.domains, 2) for k, n in per_kind.items()
        },
        "queries_per_second": {
            k: round(queries[k] / medians[k]) for k in medians if medians[k] > 0
        },
        "cpu_seconds_median": {
            k: {who: round(statistics.median(r.cpu[who] for r in v), 3) for who in v[0].cpu}
            for k, v in runs.items()
        },
        "speedup": round(medians["sequential"] / medians["concurrent"], 2),
        "target_seconds": target(args.domains),
        "pass": medians["concurrent"] <= target(args.domains),
    }


def print_table(r: dict[str, Any], args: argparse.Namespace) -> None:
    med, q, qps = r["median_seconds"], r["queries"], r["queries_per_second"]
    print(
        f"\n== DNS checks: {args.domains} domains x {len(KINDS)} analyses = {r['analyses']}, "
        f"{r['zones']} zones on {r['knot']}; median of {args.repeat} =="
    )
    head = ("run", "workers", "wall s", "queries", "per domain", "queries/s", "target")
    print("{:<11} {:>7} {:>7} {:>8} {:>10} {:>9} {:>7}  result".format(*head))
    limit = f"<= {r['target_seconds']:g}"
    rows = [("sequential", 1, ""), ("concurrent", args.workers, limit)]
    for name, workers, target in rows:
        result = verdict(r["pass"]) if name == "concurrent" else ""
        print(
            f"{name:<11} {workers:>7} {med[name]:>7.3f} {q[name]:>8} "
            f"{q[name] / args.domains:>10.1f} {qps.get(name, 0):>9} {target:>7}  {result}"
        )
    print(f"speed-up of the concurrent run over the sequential one: {r['speedup']:.2f}x")
    for name, cpu in r["cpu_seconds_median"].items():
        print(
            f"CPU, {name} run: this process (all threads) {cpu['bench']:.2f} s, "
            f"knotd {cpu['knotd']:.2f} s"
        )
    by = r["queries_per_domain_by_analysis"]
    print("queries per domain by analysis: " + ", ".join(f"{k} {v:g}" for k, v in by.items()))
    if not r["queries_consistent"]:
        print("note: the query count differed between runs (it should not): " + json.dumps(q))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--domains", type=int, default=100, help="generated sending domains")
    p.add_argument("--workers", type=int, default=16, help="threads of the concurrent run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind; medians compared")
    p.add_argument("--timeout", type=float, default=2.0, help="DnsResolver timeout per query")
    p.add_argument(
        "--keep", action="store_true", help="keep the temp dir: zones, knot.conf, knot.log"
    )
    args = p.parse_args(argv)
    if args.domains < 1 or args.workers < 1 or args.repeat < 1:
        p.error("--domains, --workers and --repeat must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop Knot
    base = Path(tempfile.mkdtemp(prefix="opsdrill-bench-dns-"))
    error = ""
    result: dict[str, Any] = {}
    try:
        result = bench(args, base)
    except (RuntimeError, TimeoutError, OSError, OpsdrillError) as exc:  # no figures
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    findings = result.get("findings", [])
    if error:
        print(f"\n== DNS checks: FAILED: {error}", flush=True)
    elif findings:
        print(
            f"\n== DNS checks: FAILED: {len(findings)} finding(s) in the {result['phase']} on "
            "zones generated to be correct (a bug in the generator or in opsdrill.dns):"
        )
        for line in findings:
            print(f"  {line}")
    else:
        print_table(result, args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "domains": args.domains,
        "workers": args.workers,
        "repeat": args.repeat,
        "timeout_seconds": args.timeout,
    }
    RESULTS.write_text(
        json.dumps({"meta": meta, "result": result, "error": error}, indent=2) + "\n"
    )
    print(f"\nresults written to {RESULTS.relative_to(REPO)}")
    return 1 if error or findings else 0  # a missed target is a result; a failure is not


if __name__ == "__main__":
    sys.exit(main())
