"""The Allure report: ``python -m opsdrill_pytest.report`` turns real check results into a
report that renders.

Two scheduled runs of a few small checks (built with the real ``Check`` decorator, run by
pytest with allure-pytest and the opsdrill plugin, which writes environment.properties and
categories.json), each followed by a report with one shared history file: the first by
``make report``, the second as the CI templates run it (``python -m opsdrill_pytest.report
generate`` in the job's directory, paths relative to it). The second report is served by
``make report-serve`` and rendered in headless Chromium.
"""

from __future__ import annotations

import contextlib
import fcntl
import html
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "reports"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("npm") is None, reason="npm is missing (make system)"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is missing (make system)"),
]

FAILED_TITLE = "crm backup matches its manifest"
FAILED_DETAIL = "expected sha256 5e1f, found 9a0c in crm-20260101T0000Z.dump.zst.gpg"
FAILED_MESSAGE = f"pg:crm: {FAILED_DETAIL}"
ATTACHMENTS = ("manifest vs object", "object stat")

CHECKS = (
    textwrap.dedent(
        '''
    """Report fixtures: a few checks shaped like the real ones."""

    import os

    import allure

    from opsdrill_pytest.checks import Check, attach_json, attach_text

    RUNBOOK = "docs/runbooks/backup-and-restore.md"
    FRESH = Check("pg.backup.freshness", "critical", RUNBOOK + "#freshness", "backups",
                  "postgres backup freshness")
    COMPLETE = Check("pg.backup.completeness", "blocker", RUNBOOK + "#completeness", "backups",
                     "postgres backup completeness")
    PARITY = Check("files.mirror.parity", "critical", RUNBOOK + "#files", "storage",
                   "files mirror parity")
    SECRETS = Check("secrets.bundle.freshness", "normal", RUNBOOK + "#secrets", "backups",
                    "secrets bundle")


    @FRESH
    def check_fresh():
        allure.dynamic.title("crm backup is younger than 60 min")
        attach_json("backups (newest 10)", [{"id": "crm-20260101T0000Z", "complete": True}])


    @COMPLETE
    def check_complete():
        allure.dynamic.title("FAILED_TITLE")
        attach_text("manifest vs object", "sha256 manifest 5e1f\\nsha256 object   9a0c")
        attach_json("object stat", {"size": 1024, "etag": "abc"})
        COMPLETE.fail("pg:crm", "FAILED_DETAIL")


    @PARITY
    def check_parity():
        allure.dynamic.title("files mirror holds every live object")
        if os.environ["REPORT_TEST_RUN"] == "2":
            PARITY.fail("files:app", "expected 0 objects missing off-site, found 3")


    @SECRETS
    def check_unreachable():
        allure.dynamic.title("app secrets bundle is younger than 24 h")
        raise ConnectionError("offsite S3 at 127.0.0.1:9 refused the connection")
    '''
    )
    .replace("FAILED_TITLE", FAILED_TITLE)
    .replace("FAILED_DETAIL", FAILED_DETAIL)
)

PYTEST_INI = """\
[pytest]
python_files = check_*.py
python_functions = check_*
"""


@dataclass
class Report:
    results: Path
    report: Path
    single: Path
    history: Path

    def widget(self, name: str) -> Any:
        return json.loads((self.report / "widgets" / name).read_text())

    def test_results(self) -> dict[str, dict[str, Any]]:
        """The report's per-check data files, by title."""
        out = {}
        for path in (self.report / "data" / "test-results").glob("*.json"):
            data = json.loads(path.read_text())
            out[data["name"]] = data
        return out


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OPSDRILL_"))}
    env.update(extra)
    return env


def _make(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        ["make", "-s", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(),
    )
    assert proc.returncode == 0, f"make {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _report_vars(r: Report) -> list[str]:
    return [
        f"ALLURE_RESULTS={r.results}",
        f"ALLURE_REPORT={r.report}",
        f"ALLURE_REPORT_SINGLE={r.single}",
        f"ALLURE_HISTORY={r.history}",
    ]


def _report_module(r: Report, cwd: Path) -> None:
    """`python -m opsdrill_pytest.report generate` in `cwd`, the paths relative to it, as a
    CI job runs it; Allure from the checkout's node_modules (cwd has none)."""
    paths = {
        "ALLURE_RESULTS": r.results,
        "ALLURE_REPORT": r.report,
        "ALLURE_REPORT_SINGLE": r.single,
        "ALLURE_HISTORY": r.history,
    }
    env = _clean_env(**{k: str(v.relative_to(cwd)) for k, v in paths.items()})
    env.pop("ALLURE_CLI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "opsdrill_pytest.report", "generate"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"report: {r.report.relative_to(cwd)}/index.html" in proc.stdout


def _run_checks(workdir: Path, results: Path, run: int) -> None:
    """One scheduled run: the checks above, with the opsdrill plugin as `make verify` has it."""
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(workdir / "check_report_demo.py"),
        "-c",
        str(workdir / "pytest.ini"),
        "--rootdir",
        str(workdir),
        "--local-stack",
        "never",
        "-p",
        "no:cacheprovider",
        "-q",
        "--alluredir",
        str(results),
    ]
    proc = subprocess.run(
        argv,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(REPORT_TEST_RUN=str(run)),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # some checks fail on purpose
    assert (results / "environment.properties").exists(), proc.stdout + proc.stderr
    assert (results / "categories.json").exists(), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, Report]:
    """Two runs, reported with `make report` and then the module; the second report carries
    the history."""
    # One npm install for all concurrent test processes (xdist workers, other checkouts'
    # runs on this machine): `npm ci` replaces node_modules/ as a whole.
    with open(Path(tempfile.gettempdir()) / "opsdrill-report-deps.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _make("report-deps")
    work = tmp_path_factory.mktemp("report")
    (work / "check_report_demo.py").write_text(CHECKS)
    (work / "pytest.ini").write_text(PYTEST_INI)
    history = work / "history.jsonl"
    out = []
    for run in (1, 2):
        r = Report(work / f"results-{run}", work / f"report-{run}", work / f"single-{run}", history)
        _run_checks(work, r.results, run)
        if run == 1:
            _make("report", *_report_vars(r), timeout=300)
        else:
            _report_module(r, cwd=work)
        out.append(r)
    return out[0], out[1]


def test_report_counts_labels_and_evidence(reports: tuple[Report, Report]) -> None:
    first, second = reports
    # Every check is new in the first report; the second knows them from the history.
    assert first.widget("statistic.json") == {
        "total": 4,
        "new": 4,
        "passed": 2,
        "failed": 1,
        "broken": 1,
    }
    assert second.widget("statistic.json") == {"total": 4, "passed": 1, "failed": 2, "broken": 1}
    failed = second.test_results()[FAILED_TITLE]
    assert failed["status"] == "failed"
    assert FAILED_MESSAGE in failed["error"]["message"]
    assert "check pg.backup.completeness; runbook: docs/runbooks/" in failed["error"]["message"]
    names = [s["link"]["name"] for s in failed["steps"] if s.get("type") == "attachment"]
    assert sorted(names) == sorted(ATTACHMENTS)
    labels = {(lab["name"], lab["value"]) for lab in failed["labels"]}
    assert {
        ("epic", "backups"),
        ("feature", "postgres backup completeness"),
        ("severity", "blocker"),
        ("tag", "pg.backup.completeness"),
        ("check_id", "pg.backup.completeness"),
    } <= labels
    assert [link["url"] for link in failed["links"]] == [
        "docs/runbooks/backup-and-restore.md#completeness"
    ]


def test_report_environment_and_categories(reports: tuple[Report, Report]) -> None:
    _, second = reports
    env = {e["name"]: e["values"] for e in second.widget("allure_environment.json")}
    written = dict(
        line.split("=", 1)
        for line in (second.results / "environment.properties").read_text().splitlines()
    )
    assert {"opsdrill.version", "opsdrill.git_sha", "run.started", "inventory.name"} <= set(env)
    assert {k: v[0] for k, v in env.items()} == written
    tree = second.widget("categories.json")
    by_category = {tree["nodes"][root]["name"]: _leaves(tree, root) for root in tree["roots"]}
    assert by_category == {
        "Target unreachable / infrastructure broken": ["app secrets bundle is younger than 24 h"],
        "Backup integrity (manifest, size, sha256)": [FAILED_TITLE],
        "Files mirror out of parity or late": ["files mirror holds every live object"],
    }


def _leaves(tree: dict[str, Any], node_id: str) -> list[str]:
    node = tree["nodes"][node_id]
    if node["type"] == "tr":
        return [node["name"]]
    return [leaf for child in node.get("childrenIds", []) for leaf in _leaves(tree, child)]


def test_history_is_carried_into_the_next_report(reports: tuple[Report, Report]) -> None:
    first, second = reports
    runs = [json.loads(line) for line in second.history.read_text().splitlines()]
    assert len(runs) == 2
    assert all(len(run["testResults"]) == 4 for run in runs)
    results = second.test_results()
    parity = results["files mirror holds every live object"]
    assert [h["status"] for h in parity["history"]] == ["passed"]
    assert all(len(r["history"]) == 1 for r in results.values())
    assert all(r["history"] == [] for r in first.test_results().values())
    # The trend chart has the previous run and the current one.
    charts = second.widget("charts.json")["general"].values()
    dynamics = next(c for c in charts if c["type"] == "statusDynamics")
    assert len(dynamics["data"]) == 2


def test_single_file_report_is_self_contained(reports: tuple[Report, Report]) -> None:
    _, second = reports
    assert [p.name for p in second.single.iterdir()] == ["index.html"]
    page = (second.single / "index.html").read_text()
    assert not re.search(r"""(src|href)=["'](?!data:|https?:|#)""", page)
    for generated in (page, (second.report / "index.html").read_text()):
        assert "googletagmanager" not in generated  # no third-party requests
    dom = _text(_chromium("--dump-dom", (second.single / "index.html").as_uri()))
    assert re.search(r"Total\s+4\s+Failed\s+2\s+Broken\s+1\s+Passed\s+1", dom), dom[:2000]


@pytest.fixture(scope="module")
def served(reports: tuple[Report, Report]) -> Iterator[str]:
    """`make report-serve` on a free port; stopped (its whole process group) afterwards."""
    _, second = reports
    proc = subprocess.Popen(
        ["make", "-s", "report-serve", *_report_vars(second), "REPORT_PORT=0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_clean_env(),
        start_new_session=True,
    )
    try:
        url = _served_url(proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def _served_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(r"\(?(http://127\.0\.0\.1:\d+/)\)?", line)
        if found:
            return found.group(1)
    raise AssertionError(f"report-serve printed no URL: {''.join(seen)}")


def test_report_serve_binds_localhost(served: str, reports: tuple[Report, Report]) -> None:
    _, second = reports
    with urllib.request.urlopen(served + "widgets/statistic.json", timeout=10) as resp:
        assert json.loads(resp.read()) == second.widget("statistic.json")


def test_rendered_report_shows_counts_and_the_failed_check(
    served: str, reports: tuple[Report, Report]
) -> None:
    _, second = reports
    ARTIFACTS.mkdir(exist_ok=True)
    overview = _text(_chromium("--dump-dom", served))
    assert "opsdrill verification" in overview
    assert re.search(r"Total\s+4\s+Failed\s+2\s+Broken\s+1\s+Passed\s+1", overview), overview
    assert re.search(r"Metadata\s+\d+\s+.*inventory\.name", overview), overview
    assert "opsdrill.version" in overview
    _chromium(f"--screenshot={ARTIFACTS / 'test-report-overview.png'}", served)

    failed_id = second.test_results()[FAILED_TITLE]["id"]
    page = _text(_chromium("--dump-dom", f"{served}#{failed_id}"))
    assert FAILED_TITLE in page and "Failed" in page, page
    assert FAILED_MESSAGE in page, page
    assert "Backup integrity (manifest, size, sha256)" in page, page
    for name in ATTACHMENTS:
        assert name in page, page
    _chromium(f"--screenshot={ARTIFACTS / 'test-report-failed-check.png'}", f"{served}#{failed_id}")
    assert (ARTIFACTS / "test-report-overview.png").stat().st_size > 10_000


def _chromium(action: str, url: str) -> str:
    """Headless Chromium, its own profile; the whole process tree is stopped afterwards."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="opsdrill-chromium-") as profile:
        argv = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--window-size=1280,900",
            action,
            url,
        ]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            # Also any renderer/zygote left behind by a browser that exited or hung.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.communicate()
        assert proc.returncode == 0, err[-2000:]
        return out


def _text(dom: str) -> str:
    """The visible text of a dumped DOM, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
