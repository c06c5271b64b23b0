"""Shared fixtures for our own tests: one local stack per xdist worker, and helpers to
derive inventories, plant backups and run the real checks in a subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w

from opsdrill.backups import catalog
from opsdrill.backups.backup import run_backup
from opsdrill.backups.catalog import BackupRef
from opsdrill.backups.manifest import Manifest
from opsdrill.config.envfile import read_env_file
from opsdrill.config.inventory import Inventory, load
from opsdrill.s3 import client
from opsdrill_stack.gnupg_keys import Keypair, generate_keypair
from opsdrill_stack.knot import KnotServer
from opsdrill_stack.local import LocalStack
from tests.helpers.registry import MARK

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    stack: LocalStack
    inventory_path: Path

    @property
    def data(self) -> dict[str, Any]:
        return tomllib.loads(self.inventory_path.read_text())

    @property
    def secrets(self) -> dict[str, str]:
        return read_env_file(self.stack.base / "secrets.env")

    def live_conn(self, dbname: str = "crm") -> psycopg.Connection[Any]:
        port = self.stack.state["components"]["pg_live"]["port"]
        return psycopg.connect(
            host="127.0.0.1",
            port=port,
            user="opsdrill",
            dbname=dbname,
            password=self.secrets["OPSDRILL_LIVE_PG_PASSWORD"],
            autocommit=True,
            connect_timeout=10,
        )


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A real local stack for this worker; stopped when the session ends.

    Not under pytest's tmp_path: that tree is 0700 root and the postgres user must reach it.
    """
    local = LocalStack(Path(tempfile.mkdtemp(prefix="opsdrill-test-stack-")))
    path = local.up()
    try:
        yield Stack(local, path)
    finally:
        local.down()


@dataclass
class Env:
    """A test's own view of the stack: a private S3 prefix, optionally its own database."""

    stack: Stack
    path: Path
    data: dict[str, Any]

    @property
    def inv(self) -> Inventory:
        return load(self.path)

    def rewrite(self, mutate: Any) -> Env:
        mutate(self.data)
        self.path.write_text(tomli_w.dumps(self.data))
        return self

    def with_secret(self, tmp_path: Path, var: str, value: str) -> Env:
        """Point the inventory at a copy of its env_file where ``var`` holds ``value``
        (a rotated password, a wrong key): what a real host's stale file looks like."""
        values = read_env_file(Path(self.data["env_file"]))
        values[var] = value
        copy = tmp_path / f"secrets-{uuid.uuid4().hex[:6]}.env"
        copy.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        copy.chmod(0o600)
        return self.rewrite(lambda d: d.update(env_file=str(copy)))

    @contextlib.contextmanager
    def encrypting_to_another_key(self, tmp_path: Path) -> Iterator[Keypair]:
        """Inside, operations encrypt to an unrelated key; afterwards the inventory expects
        the original recipients again (the "wrong recipient" sabotage)."""
        other = generate_keypair(tmp_path / "other", "someone else", "another passphrase")
        original = dict(self.data["gpg"])
        self.rewrite(
            lambda d: d["gpg"].update(
                recipients=[other.fingerprint], public_keys_file=str(other.public_file)
            )
        )
        try:
            yield other
        finally:
            self.rewrite(lambda d: d.update(gpg=original))

    def backup(self, now: datetime | None = None, name: str = "crm") -> Manifest:
        return run_backup(self.inv, name, now=now)

    def refs(self, name: str = "crm") -> list[BackupRef]:
        inv = self.inv
        _, store = inv.store_for(name)
        return catalog.list_backups(client(inv, store), store, name)

    def store(self, store: str) -> tuple[Any, Any]:
        inv = self.inv
        st = inv.store(store)
        return client(inv, st), st

    def put(self, store: str, rel: str, body: bytes) -> None:
        s3, st = self.store(store)
        s3.put_object(st.bucket, st.prefix + rel, io.BytesIO(body), len(body))

    def s3(self, name: str = "crm") -> Any:
        inv = self.inv
        _, store = inv.store_for(name)
        return client(inv, store), store

    def run_checks(self, *selectors: str, extra: tuple[str, ...] = ()) -> CheckRun:
        return run_checks(self.path, *selectors, extra=extra, workdir=self.path.parent)


@pytest.fixture
def knot(stack: Stack) -> Iterator[KnotServer]:
    """The worker's DNS server; every zone is reloaded from its file afterwards."""
    server = stack.stack.knot()
    try:
        yield server
    finally:
        server.restore_all()


def derive(stack: Stack, tmp_path: Path, *, own_database: bool = False, own_files: int = 0) -> Env:
    """Copy the stack's inventory with fresh S3 prefixes, its own copy of the app's .env
    (read by the secrets bundle and [app_environment] alike), absolute paths for the
    probes' CA files, and optionally its own database and live files, so tests can
    sabotage in isolation."""
    data = stack.data
    base = stack.inventory_path.parent
    tag = uuid.uuid4().hex[:10]
    data["env_file"] = str(base / data["env_file"])
    for key in ("public_keys_file", "drill_private_key_file"):
        data["gpg"][key] = str(base / data["gpg"][key])
    data["stores"]["offsite"]["prefix"] = f"t-{tag}"
    data["stores"]["offsite-files"]["prefix"] = f"files-{tag}/"
    data["stores"]["restored-files"]["prefix"] = f"restored-{tag}/"
    copies: dict[Path, Path] = {}

    def own_copy(rel: str, name: str) -> str:
        """This env's copy of an app .env; the bundle and [app_environment] entries that
        read the same file share one copy, as they share the file on a real host."""
        source = (base / rel).resolve()
        if source not in copies:
            copy = tmp_path / name
            copy.write_text(source.read_text())
            copy.chmod(0o600)
            copies[source] = copy
        return str(copies[source])

    data["secrets"]["app"]["env_file"] = own_copy(data["secrets"]["app"]["env_file"], "app.env")
    for name, section in data.get("app_environment", {}).items():
        if "env_file" in section:
            section["env_file"] = own_copy(section["env_file"], f"app-{name}.env")
    for probe in data.get("probes", {}).values():
        for key in ("smtp", "imap", "trigger"):
            if "ca_file" in probe.get(key, {}):
                probe[key]["ca_file"] = str(base / probe[key]["ca_file"])
    if own_files:
        data["stores"]["live-files"]["prefix"] = f"live-{tag}/"
    if own_database:
        dbname = f"crm_{uuid.uuid4().hex[:8]}"
        with stack.live_conn("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{dbname}" TEMPLATE crm')
        dsn = data["databases"]["crm"]["dsn"]
        data["databases"]["crm"]["dsn"] = dsn.rsplit("/", 1)[0] + "/" + dbname
    path = tmp_path / "inventory.toml"
    path.write_text(tomli_w.dumps(data))
    env = Env(stack, path, data)
    for i in range(own_files):
        body = f"file {i} of test {tag}\n".encode() * (i + 1)
        env.put("live-files", f"docs/file-{i:03d}.txt", body)
    return env


@pytest.fixture
def env(stack: Stack, tmp_path: Path) -> Env:
    return derive(stack, tmp_path)


# The word pytest prints for each test with -v, alone or under xdist ("[gw0] [ 50%] WORD id").
_VERBOSE = re.compile(
    r"^(?:\[gw\d+\] \[\s*\d+%\] (?P<w1>[A-Z]+) (?P<n1>\S+::\S+)"
    r"|(?P<n2>\S+::\S+) (?P<w2>[A-Z]+)(?:\s+\[\s*\d+%\])?)\s*$",
    re.M,
)
_SUMMARY = re.compile(r"^=+ (?P<counts>(?:\d+ \w+(?:, )?)+) in [\d.]+s", re.M)
RUNS: list[CheckRun] = []  # the check runs of the test in progress (see _verify_claims)


@dataclass
class CheckRun:
    returncode: int
    output: str
    results: list[dict[str, Any]]
    results_dir: Path

    def by_check(self, check_id: str, target: str | None = None) -> dict[str, Any]:
        for res in self.results:
            labels = {(lab["name"], lab["value"]) for lab in res.get("labels", [])}
            if ("check_id", check_id) in labels and (
                target is None or ("target", target) in labels
            ):
                return res
        got = sorted(
            f"{lab.get('check_id')}[{lab.get('target')}]"
            for lab in ({x["name"]: x["value"] for x in r.get("labels", [])} for r in self.results)
        )
        where = check_id if target is None else f"{check_id}[{target}]"
        raise AssertionError(f"no result for {where}; got {got}\n{self.output[-3000:]}")

    def status(self, check_id: str) -> str:
        return str(self.by_check(check_id)["status"])

    def message(self, check_id: str) -> str:
        return str(self.by_check(check_id).get("statusDetails", {}).get("message", ""))

    def statuses(self, check_id: str) -> set[str]:
        """Every Allure status this check id has in the run (one per target)."""
        return {
            str(res["status"])
            for res in self.results
            if {"name": "check_id", "value": check_id} in res.get("labels", [])
        }

    def terminal(self, check_id: str, target: str | None = None) -> str:
        """The word pytest printed for this check in the terminal (needs -v: run_checks
        passes it): PASSED, FAILED, BROKEN, SKIPPED."""
        res = self.by_check(check_id, target)
        labels = {lab["name"]: lab["value"] for lab in res.get("labels", [])}
        module, func = str(res["fullName"]).rsplit("#", 1)
        nodeid = f"{module.replace('.', '/')}.py::{func}"
        words = {m["n1"] or m["n2"]: m["w1"] or m["w2"] for m in _VERBOSE.finditer(self.output)}
        want = f"{nodeid}[{labels['target']}]" if "target" in labels else nodeid
        for node, word in words.items():
            # nodeids are relative to the rootdir, or to the cwd outside it: compare the tail
            path = node if node.startswith(module.split(".")[0]) else node.split("/")[-1]
            if path == want or (path.startswith(nodeid) and "target" not in labels):
                return word
        raise AssertionError(f"no terminal line for {want}\n{self.output[-3000:]}")

    @property
    def summary(self) -> dict[str, int]:
        """pytest's last line, "1 failed, 2 broken, 3 passed in 4.0s", as counts."""
        found = list(_SUMMARY.finditer(self.output))
        if not found:
            raise AssertionError(f"no summary line\n{self.output[-3000:]}")
        pairs = (part.split(" ", 1) for part in found[-1]["counts"].split(", "))
        return {word: int(n) for n, word in pairs}

    def assert_outcome(self, check_id: str, status: str, *, exit_code: int | None = None) -> None:
        """The same outcome everywhere an operator looks: Allure, the terminal's word and
        summary line, and (when given) the process exit code."""
        res = self.by_check(check_id)
        assert res["status"] == status, f"{check_id} is {res['status']}: {self.message(check_id)}"
        word = {"passed": "PASSED", "failed": "FAILED", "broken": "BROKEN", "skipped": "SKIPPED"}
        assert self.terminal(check_id) == word[status], self.output[-3000:]
        assert self.summary.get(status, 0) >= 1, (self.summary, self.output[-2000:])
        if status == "broken":
            assert "failed" not in self.summary or self.returncode == 1, self.summary
        if exit_code is not None:
            assert self.returncode == exit_code, (self.returncode, self.output[-3000:])

    def assert_fails(self, check_id: str, *fragments: str) -> str:
        res = self.by_check(check_id)
        msg = self.message(check_id)
        assert res["status"] == "failed", f"{check_id} is {res['status']}: {msg}"
        for fragment in fragments:
            assert fragment in msg, f"{fragment!r} not in {check_id} message: {msg}"
        assert "runbook: docs/runbooks/" in msg
        return msg

    def assert_broken(self, check_id: str, *fragments: str) -> str:
        res = self.by_check(check_id)
        msg = self.message(check_id)
        assert res["status"] == "broken", f"{check_id} is {res['status']}: {msg}"
        for fragment in fragments:
            assert fragment in msg, f"{fragment!r} not in {check_id} message: {msg}"
        return msg

    def assert_passes(self, check_id: str) -> None:
        res = self.by_check(check_id)
        assert res["status"] == "passed", f"{check_id}: {res['status']}: {self.message(check_id)}"


def run_checks(
    inventory: Path, *selectors: str, extra: tuple[str, ...] = (), workdir: Path | None = None
) -> CheckRun:
    """Run the real checks in a subprocess, the way users do, and read Allure's results."""
    results_dir = (workdir or inventory.parent) / f"allure-{uuid.uuid4().hex[:6]}"
    paths = [str(ROOT / "opsdrill_checks" / s) if s.endswith(".py") else s for s in selectors]
    argv = [
        sys.executable,
        "-m",
        "pytest",
        *(paths or [str(ROOT / "opsdrill_checks")]),
        "--inventory",
        str(inventory),
        "-p",
        "no:cacheprovider",
        "-v",
        "-ra",
        "--alluredir",
        str(results_dir),
        "-o",
        "addopts=",
        *extra,
    ]
    return run_pytest(argv, results_dir)


def run_pytest(argv: list[str], results_dir: Path, cwd: Path = ROOT) -> CheckRun:
    """Run ``argv`` (a pytest command line writing Allure results to ``results_dir``) in a
    clean environment and read what it produced."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "OPSDRILL_"))}
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    results = [json.loads(p.read_text()) for p in results_dir.glob("*-result.json")]
    run = CheckRun(proc.returncode, proc.stdout + proc.stderr, results, results_dir)
    RUNS.append(run)
    return run


KINDS = ("unit", "integration", "faults")
# What a quick (unit) test may not use: these start servers or containers.
SLOW_FIXTURES = frozenset({"stack", "env", "docker_engine", "pg_images"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by the folder it lives in (``make test-quick`` runs ``-m unit``), and
    refuse a unit test that starts the local stack or a container: it belongs in
    ``tests/integration`` or ``tests/faults``, or ``make test-quick`` would not be quick."""
    misplaced = []
    for item in items:
        kind = item.path.parent.name
        if kind not in KINDS:
            continue
        item.add_marker(getattr(pytest.mark, kind))
        slow = SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if kind == "unit" and slow:
            misplaced.append(f"{item.nodeid} (uses {', '.join(sorted(slow))})")
    if misplaced:
        raise pytest.UsageError(
            "unit tests must not start servers; move to tests/integration: " + "; ".join(misplaced)
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.rep_call_failed = True  # type: ignore[attr-defined]
    return report


@pytest.fixture(autouse=True)
def _verify_claims(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``@proves(failed=..., broken=...)`` (tests/helpers/registry.py) must really
    show each claimed check id with that Allure status in one of its check runs."""
    RUNS.clear()
    yield
    marker = request.node.get_closest_marker(MARK)
    if marker is None or getattr(request.node, "rep_call_failed", False):
        return
    missing = [
        f"{check_id} {status}"
        for status in ("failed", "broken")
        for check_id in marker.kwargs.get(status, ())
        if not any(status in run.statuses(check_id) for run in RUNS)
    ]
    assert not missing, f"{request.node.nodeid} claims what its check runs do not show: {missing}"


def opsdrill(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opsdrill", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=300,
        env=env,
        input=stdin,
    )
