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
ThreadPoolExecutor over one shared DnsResolver; each run's resolver remembers its answers,
as a check run's does (records the domains share are asked once). Target: the concurrent wall time
(median) <= 2 s for 100 domains (scaled for other --domains). Reports the queries sent
per domain.
Every generated record is correct, so a finding is a bug in this generator or in
opsdrill.dns: the findings are printed and the script exits 1, as it does when Knot fails
or a query times out. A missed target prints MISS and exits 0. Results also go to
benchmarks/results/dns-latest.json.

End to end against a peer, checkdmarc (PyPI 6.0.4, in a venv of its own: --checkdmarc,
default /var/tmp/opsdrill-peers/checkdmarc/bin/checkdmarc). Its -n option takes resolvers
on port 53 only, so the same knotd also listens on --peer-address (127.0.0.77) port 53.
Both are timed from process start to exit, interleaved with the library rows (the order
rotated per repeat): ``pytest <checks> -m dns --inventory <the generated inventory>`` (cwd
the repository; <checks> is opsdrill_checks/, or checks/ before the rename), and
``checkdmarc <domains file> -o out.json -n <peer address>``. Target: opsdrill >= 2x faster,
the median of the per-repeat ratios. What each judges differs: checkdmarc has no DKIM
check at all (no selector option), no check_host for a sending IP and no expectations
(providers, forbidden MX); it checks SOA, NS, DNSSEC (DS and DNSKEY over TCP), MTA-STS and
TLS-RPT records, the MX hosts (A/AAAA, PTR, TLSA), SPF (record, include tree, lookup
counts), DMARC (record, rua authorisation) and BIMI (selector "default"). Its queries are
counted in one untimed run (dnspython's query functions wrapped). A missing checkdmarc, or
port 53 on the peer address not free (not root, or taken), prints SKIP and the opsdrill end
to end row still runs; a failed pytest run (any check not passing) or a checkdmarc crash
is a failure (exit 1).
Usage: python benchmarks/bench_dns.py [--domains 100] [--workers 16] [--repeat 3] [--keep]
       [--checkdmarc PATH] [--peer-address 127.0.0.77]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import as_installed
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
# The check suite users run: renamed from checks/ to opsdrill_checks/.
CHECKS = REPO / "opsdrill_checks" if (REPO / "opsdrill_checks").is_dir() else REPO / "checks"
PEERS = Path("/var/tmp/opsdrill-peers")
CHECKDMARC = PEERS / "checkdmarc" / "bin" / "checkdmarc"
CHECKDMARC_INSTALL = (
    f"python3 -m venv {PEERS / 'checkdmarc'} && "
    f"{PEERS / 'checkdmarc' / 'bin' / 'pip'} install checkdmarc==6.0.4"
)
PEER_ADDRESS = "127.0.0.77"  # checkdmarc -n takes port 53 only
TARGET_PEER_SPEEDUP = 2.0  # checkdmarc's end-to-end time / opsdrill's, median of repeats
E2E_TIMEOUT = 600.0
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


@dataclass
class PeerKnot(KnotServer):
    """The bench's Knot, also listening on ``peer_address`` port 53 when set: one server
    answers opsdrill (its own port) and checkdmarc (port 53 only) alike."""

    peer_address: str | None = None

    def _write_config(self, port: int) -> None:
        super()._write_config(port)
        if self.peer_address:
            text = self.conf.read_text()
            own = f"listen: 127.0.0.1@{port}"
            both = f"listen: [ 127.0.0.1@{port}, {self.peer_address}@53 ]"
            if own not in text:
                raise RuntimeError(f"unexpected knot.conf (no '{own}'): {self.conf}")
            self.conf.write_text(text.replace(own, both))


def port53_free(address: str) -> str:
    """Why ``address`` port 53 cannot be served ('' when it can): Knot exits when any of
    its listen addresses fails to bind, so this is checked before it starts."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((address, 53))
            except OSError as exc:
                return f"cannot listen on {address}:53 ({exc.strerror}; root needed, or taken)"
    return ""


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


# -- end to end: the pytest run and checkdmarc, each from process start to exit ------------
_OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")
_SESSION = re.compile(r" in ([\d.]+)s\b")
COUNT_QUERIES = '''\
"""checkdmarc's CLI with dnspython's query functions counted (written by bench_dns.py).
Usage: python count_queries.py COUNTS.json CHECKDMARC-ARGS..."""
import collections
import json
import sys

import dns.query
import dns.rdatatype

counts = collections.Counter()


def counted(name, send):
    def query(q, *args, **kwargs):
        counts[f"{name} {dns.rdatatype.to_text(q.question[0].rdtype)}"] += 1
        return send(q, *args, **kwargs)

    return query


for name in ("udp", "tcp", "tls", "https", "quic"):
    if hasattr(dns.query, name):
        setattr(dns.query, name, counted(name, getattr(dns.query, name)))

from checkdmarc._cli import _main

out = sys.argv[1]
sys.argv = ["checkdmarc", *sys.argv[2:]]
try:
    _main()
finally:
    with open(out, "w") as f:
        json.dump(dict(counts), f)
'''


@dataclass
class E2e:
    """One process, start to exit."""

    seconds: float
    session: float | None = None  # pytest's own figure (its summary line), after start-up
    outcomes: dict[str, int] = field(default_factory=dict)


def timed(
    argv: Sequence[str], what: str, cwd: Path | None = None, check: bool = True
) -> tuple[float, int, str]:
    """Wall seconds from spawning ``argv`` to its exit, its exit code and its output."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=E2E_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not finish within {E2E_TIMEOUT:g} s") from None
    seconds = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}:\n{output[-2000:]}")
    return seconds, proc.returncode, output


def pytest_argv(inventory: Path) -> list[str]:
    """The DNS checks as a user runs them (cwd the repository); no cache dir written."""
    return [
        *(sys.executable, "-m", "pytest", CHECKS.name, "-m", "dns"),
        *("--inventory", str(inventory), "-p", "no:cacheprovider", "-q"),
    ]


def run_pytest(inventory: Path) -> tuple[E2e, list[str]]:
    """The whole DNS check run, and its problems: on zones generated to be correct, any
    check that did not pass (or skip: no discovery, no migration configured) is a bug."""
    seconds, code, output = timed(pytest_argv(inventory), "pytest -m dns", REPO, check=False)
    lines = output.splitlines()
    last = next((line for line in reversed(lines) if _SESSION.search(line)), "")
    outcomes: dict[str, int] = {}
    for n, word in _OUTCOME.findall(last):
        key = "errors" if word.startswith("error") else word
        outcomes[key] = outcomes.get(key, 0) + int(n)
    session = _SESSION.search(last)
    problems: list[str] = []
    if code != 0 or outcomes.get("failed") or outcomes.get("errors"):
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        problems = failed or [f"pytest exited {code}:", *lines[-15:]]
    elif not outcomes.get("passed"):
        problems = ["pytest ran no check:", *lines[-15:]]
    return E2e(seconds, float(session.group(1)) if session else None, outcomes), problems


def interpreter_of(script: Path) -> str:
    """The Python a console script runs with (its shebang), to run a wrapper with."""
    first = script.read_bytes().split(b"\n", 1)[0].decode(errors="replace")
    if first.startswith("#!") and "python" in first:
        return first[2:].strip().split()[0]
    return str(script.parent / "python")


@dataclass(frozen=True)
class Checkdmarc:
    binary: Path
    domains_file: Path
    out: Path
    address: str

    def args(self) -> list[str]:  # the domains file first: -n takes every later word
        return [str(self.domains_file), "-o", str(self.out), "-n", self.address]

    def version(self) -> str:
        return timed([str(self.binary), "-v"], "checkdmarc -v")[2].strip()

    def startup(self) -> E2e:
        """``checkdmarc -v``: the interpreter and checkdmarc's imports, no query."""
        return E2e(timed([str(self.binary), "-v"], "checkdmarc -v")[0])

    def run(self, domains: int) -> tuple[E2e, dict[str, Any]]:
        self.out.unlink(missing_ok=True)
        seconds = timed([str(self.binary), *self.args()], "checkdmarc")[0]
        return E2e(seconds), self.verdict(domains)

    def verdict(self, domains: int) -> dict[str, Any]:
        """What checkdmarc concluded, per section; no output or a missing domain raises."""
        try:
            results = json.loads(self.out.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"checkdmarc wrote no readable {self.out}: {exc}") from None
        results = results if isinstance(results, list) else [results]
        if len(results) != domains:
            raise RuntimeError(f"checkdmarc reported {len(results)} of {domains} domains")
        warnings: Counter[str] = Counter()
        for r in results:
            for section in ("ns", "mx", "spf", "dmarc"):
                for w in r.get(section, {}).get("warnings", []):
                    warnings[re.sub(r"\d+(\.\d+){3}|[\w.-]+\.test", "<name>", w)] += 1
        return {
            "spf_valid": sum(r["spf"].get("valid") is True for r in results),
            "dmarc_valid": sum(r["dmarc"].get("valid") is True for r in results),
            "mx_found": sum(len(r["mx"].get("hosts", [])) == 2 for r in results),
            "warnings": dict(warnings),
        }

    def count_queries(self, base: Path) -> dict[str, int]:
        """One untimed run with dnspython's query functions counted (also the warm-up)."""
        script, counts = base / "count_queries.py", base / "checkdmarc-queries.json"
        script.write_text(COUNT_QUERIES)
        argv = [interpreter_of(self.binary), str(script), str(counts), *self.args()]
        timed(argv, "checkdmarc (counting queries)")
        found: dict[str, int] = json.loads(counts.read_text())
        return found


def target(domains: int) -> float:
    return TARGET_SECONDS * domains / 100


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def peer_for(args: argparse.Namespace) -> str:
    """Why checkdmarc is left out ('' when it runs)."""
    if not args.checkdmarc.is_file():
        return f"SKIP checkdmarc: checkdmarc not installed ({CHECKDMARC_INSTALL})"
    busy = port53_free(args.peer_address)
    return f"SKIP checkdmarc: {busy}" if busy else ""


def bench(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Generate, serve, and time; raises RuntimeError / OpsdrillError on a failure."""
    started = time.perf_counter()
    domains, zones, key_count = generate(args.domains, base / "dkim")
    generate_seconds = time.perf_counter() - started
    skip_peer = peer_for(args)
    if skip_peer:
        print(skip_peer, flush=True)
    knot = PeerKnot(
        "dns-bench", base / "knot", peer_address=None if skip_peer else args.peer_address
    )
    started = time.perf_counter()
    try:
        knot.start(zones)
        start_seconds = time.perf_counter() - started
        also = "" if skip_peer else f" and {args.peer_address}:53"
        print(
            f"{len(zones)} zones ({args.domains} sending domains, "
            f"{len(MAIL_PROVIDERS) + len(RELAYS)} providers, "
            f"1 report receiver), {key_count} RSA-{DKIM_BITS} keys generated in "
            f"{generate_seconds:.2f}s; Knot on 127.0.0.1:{knot.port}{also} up in "
            f"{start_seconds:.2f}s ({base})",
            flush=True,
        )
        inv_path = base / "inventory.toml"
        inv = write_inventory(inv_path, domains, knot.port, args.timeout)
        tasks = [t for d in domains for t in tasks_for(inv, d.name)]

        def resolver() -> DnsResolver:  # as the checks build theirs from [dns]
            dns = inv.dns
            return DnsResolver(list(dns.nameservers), dns.port, dns.timeout_seconds, remember=True)

        # Warm-up, untimed: imports, pyspf's DNS hook, the first sockets. It also fails
        # fast on a generator bug before anything is timed.
        warm = run_sequential(tasks_for(inv, domains[0].name), resolver(), knot.pid)
        problems = findings_of(warm)
        if problems:
            return {"findings": problems, "phase": "warm-up"}
        # The end-to-end runs warm up too (bytecode, page cache), and fail fast.
        problems = run_pytest(inv_path)[1]
        if problems:
            return {"findings": problems, "phase": "warm-up (pytest)"}
        peer: Checkdmarc | None = None
        peer_info: dict[str, Any] = {"skipped": skip_peer} if skip_peer else {}
        if not skip_peer:
            names = base / "domains.txt"
            names.write_text("".join(f"{d.name}\n" for d in domains))
            peer = Checkdmarc(args.checkdmarc, names, base / "checkdmarc.json", args.peer_address)
            counted = peer.count_queries(base)
            peer_info = {
                "version": peer.version(),
                "command": [str(args.checkdmarc), *peer.args()],
                "queries_per_domain": round(sum(counted.values()) / args.domains, 2),
                "queries_per_domain_by_type": {
                    k: round(n / args.domains, 2) for k, n in sorted(counted.items())
                },
            }
        runs: dict[str, list[Run]] = {"sequential": [], "concurrent": []}
        e2e: dict[str, list[E2e]] = {"opsdrill": [], "checkdmarc": [], "checkdmarc -v": []}
        verdicts: list[dict[str, Any]] = []
        steps = ["sequential", "concurrent", "opsdrill", *(["checkdmarc"] if peer else [])]
        for i in range(args.repeat):
            shift = i % len(steps)  # interleaved: the order rotates per repeat
            for step in steps[shift:] + steps[:shift]:
                if step == "sequential":
                    runs[step].append(run_sequential(tasks, resolver(), knot.pid))
                elif step == "concurrent":
                    runs[step].append(run_concurrent(tasks, resolver(), knot.pid, args.workers))
                elif step == "opsdrill":
                    run, problems = run_pytest(inv_path)
                    if problems:
                        return {"findings": problems, "phase": f"run {i + 1} (pytest)"}
                    e2e[step].append(run)
                elif peer is not None:
                    e2e["checkdmarc -v"].append(peer.startup())
                    run, seen = peer.run(args.domains)
                    e2e[step].append(run)
                    verdicts.append(seen)
            print(
                f"run {i + 1}/{args.repeat}: "
                + ", ".join(
                    f"{k} {v[-1].seconds:.3f}s ({v[-1].queries} queries)" for k, v in runs.items()
                )
                + "; end to end: "
                + ", ".join(f"{k} {v[-1].seconds:.3f}s" for k, v in e2e.items() if v),
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
        "end_to_end": end_to_end(e2e, verdicts, peer_info, inv_path),
    }


def end_to_end(
    e2e: dict[str, list[E2e]],
    verdicts: list[dict[str, Any]],
    peer: dict[str, Any],
    inv_path: Path,
) -> dict[str, Any]:
    ours = e2e["opsdrill"]
    sessions = [r.session for r in ours if r.session is not None]
    out: dict[str, Any] = {
        "opsdrill": {
            "command": pytest_argv(inv_path),
            "cwd": str(REPO),
            "seconds": [round(r.seconds, 3) for r in ours],
            "median_seconds": round(statistics.median(r.seconds for r in ours), 3),
            # pytest's own "in N s": session start (after imports and plugins) to the end.
            "session_median_seconds": round(statistics.median(sessions), 3) if sessions else None,
            "outcomes": ours[-1].outcomes,
        },
        "checkdmarc": peer,
    }
    theirs = e2e["checkdmarc"]
    if theirs:
        ratios = [t.seconds / o.seconds for o, t in zip(ours, theirs, strict=True)]
        speedup = statistics.median(ratios)
        peer.update(
            seconds=[round(r.seconds, 3) for r in theirs],
            median_seconds=round(statistics.median(r.seconds for r in theirs), 3),
            startup_median_seconds=round(
                statistics.median(r.seconds for r in e2e["checkdmarc -v"]), 3
            ),
            verdict=verdicts[-1],
            verdicts_consistent=all(v == verdicts[-1] for v in verdicts),
        )
        out.update(
            ratios=[round(r, 3) for r in ratios],
            speedup_median=round(speedup, 3),
            target_speedup=TARGET_PEER_SPEEDUP,
            pass_peer=speedup >= TARGET_PEER_SPEEDUP,
        )
    return out


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
    print_end_to_end(r["end_to_end"], args)


def print_end_to_end(e: dict[str, Any], args: argparse.Namespace) -> None:
    ours, peer = e["opsdrill"], e["checkdmarc"]
    print(
        f"\n== end to end, process start to exit, {args.domains} domains; median of "
        f"{args.repeat}, interleaved =="
    )
    print("{:<44} {:>7} {:>10}  what it judged".format("run", "wall s", "start-up s"))
    session = ours["session_median_seconds"]
    startup = f"{ours['median_seconds'] - session:.2f}" if session is not None else "?"
    outcomes = ", ".join(f"{n} {k}" for k, n in ours["outcomes"].items())
    label = f"pytest {CHECKS.name} -m dns --inventory"
    print(f"{label:<44} {ours['median_seconds']:>7.3f} {startup:>10}  {outcomes}")
    if "skipped" in peer:
        print(peer["skipped"])
        return
    v = peer["verdict"]
    judged = (
        f"SPF valid {v['spf_valid']}, DMARC valid {v['dmarc_valid']}, 2 MX {v['mx_found']} "
        f"of {args.domains}; {peer['queries_per_domain']:g} queries per domain"
    )
    label = f"checkdmarc {peer['version']} -n {args.peer_address}"
    print(
        f"{label:<44} {peer['median_seconds']:>7.3f} "
        f"{peer['startup_median_seconds']:>10.2f}  {judged}"
    )
    print(
        "start-up: opsdrill = wall - pytest's own session time; checkdmarc = `checkdmarc -v`. "
        "checkdmarc has no DKIM check (opsdrill: 2 selectors per domain) and no check_host"
    )
    print("checkdmarc's warnings: " + (json.dumps(v["warnings"]) if v["warnings"] else "none"))
    if not peer["verdicts_consistent"]:
        print("note: checkdmarc's verdict differed between runs")
    ratios = ", ".join(f"{x:.2f}" for x in e["ratios"])
    print(
        f"speed-up of opsdrill over checkdmarc, end to end (checkdmarc s / opsdrill s): "
        f"{e['speedup_median']:.2f}x, the median of {ratios} (target >= "
        f"{e['target_speedup']:g}x): "
        f"{verdict(e['pass_peer'])}"
    )


def main(argv: list[str] | None = None) -> int:
    as_installed.with_bytecode_caches()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--domains", type=int, default=100, help="generated sending domains")
    p.add_argument("--workers", type=int, default=16, help="threads of the concurrent run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind; medians compared")
    p.add_argument("--timeout", type=float, default=2.0, help="DnsResolver timeout per query")
    p.add_argument(
        "--keep", action="store_true", help="keep the temp dir: zones, knot.conf, knot.log"
    )
    p.add_argument(
        "--checkdmarc",
        type=Path,
        default=CHECKDMARC,
        help=f"the peer's console script (default {CHECKDMARC}; SKIP when absent)",
    )
    p.add_argument(
        "--peer-address",
        default=PEER_ADDRESS,
        help="a loopback address whose port 53 Knot also serves, for checkdmarc -n",
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
