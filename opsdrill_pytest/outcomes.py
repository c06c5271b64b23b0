"""The four outcomes of a check, one meaning each, and the exit code of a check run.

- passed: the target was examined and is right.
- failed: the target was examined and is wrong. Only ``CheckFailed`` (``Check.fail``)
  means that; nothing else a check raises is a verdict on the target.
- broken: opsdrill could not judge: a target unreachable, a timeout, opsdrill's own
  credentials refused, a missing tool, or a bug of ours. Any other exception, in any
  phase. A bare ``AssertionError`` (an ``assert`` in a check or a fixture) would read as
  "failed" to Allure and to pytest, so it is re-raised as ``OpsdrillBug`` first.
- skipped: not configured or not applicable, with the reason in words.

pytest knows only passed, failed and skipped: the terminal says "broken" (status word,
summary line and a section naming what to fix) where pytest would say "failed", the same
word Allure shows.

Exit codes: 0 every examined check passed; 1 at least one check failed (the target is
wrong); 2 nothing failed but something was broken, or nothing was examined at all (every
check skipped: an inventory with nothing to verify is not a green run). Counts per area go
to ``--metrics-file`` (Prometheus text), written by the xdist controller only, from the
reports the workers send it; the last-success time moves only on a green run that examined
something.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opsdrill import metrics
from opsdrill.redact import redact
from opsdrill_pytest.checks import CheckFailed, OpsdrillBug

OUTCOME = "opsdrill_outcome"
WHY = "opsdrill_why"
AREA = "opsdrill_area"
STARTED = pytest.StashKey[float]()
OUTCOMES = pytest.StashKey[dict[str, tuple[str, str]]]()
BROKEN = pytest.StashKey[dict[str, str]]()
BROKEN_EXIT = 2
# a failed phase outranks a broken one, which outranks a skip or a pass
RANK = {"passed": 0, "skipped": 1, "broken": 2, "failed": 3}
WORD = {"broken": ("broken", "B", "BROKEN")}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("opsdrill").addoption(
        "--metrics-file",
        metavar="PATH",
        help="write check counts per area and outcome as Prometheus text (controller only)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[STARTED] = time.monotonic()
    config.stash[OUTCOMES] = {}
    config.stash[BROKEN] = {}
    config.pluginmanager.register(_Recorder(config), "opsdrill-outcomes")


def _area(item: pytest.Item) -> str | None:
    """The first segment of the check id: pg, files, secrets, dns, mail, migration."""
    marker = item.get_closest_marker("check_id")
    return str(marker.args[0]).split(".", 1)[0] if marker and marker.args else None


def _no_bare_assertions(item: pytest.Item) -> Iterator[None]:
    """In a check, an AssertionError that is not ``CheckFailed`` is an assumption of ours
    that did not hold: broken, never a verdict on the target."""
    try:
        yield
    except AssertionError as exc:
        if isinstance(exc, CheckFailed) or _area(item) is None:
            raise
        raise OpsdrillBug(item.nodeid, exc) from exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from _no_bare_assertions(item))  # type: ignore[func-returns-value]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _no_bare_assertions(item))  # type: ignore[func-returns-value]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    return (yield from _no_bare_assertions(item))  # type: ignore[func-returns-value]


def outcome_of(report: pytest.TestReport, call: pytest.CallInfo[Any]) -> str:
    if report.skipped:
        return "skipped"
    if report.passed:
        return "passed"
    if call.excinfo is not None and call.excinfo.errisinstance(CheckFailed):
        return "failed"
    return "broken"


# trylast: the innermost wrapper, so Allure's (and every other) report hook sees the
# redacted traceback.
@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    result = yield
    report: pytest.TestReport = result.get_result()
    area = _area(item)
    if area is None:
        return
    report.user_properties.append((OUTCOME, outcome_of(report, call)))
    report.user_properties.append((AREA, area))
    if report.failed and report.longrepr is not None:
        # A long traceback prints every frame's arguments (a password handed to a
        # client, a token to a request): keep the first line for the summary, and the
        # traceback only as redacted text, in the terminal and in Allure alike.
        report.user_properties.append((WHY, redact(_why(report))))
        report.longrepr = redact(report.longreprtext)


def _outcome(report: pytest.TestReport) -> str | None:
    # a collection report (a module that fails to import) has no user_properties
    value = dict(getattr(report, "user_properties", ())).get(OUTCOME)
    return None if value is None else str(value)


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    """The terminal's word for a broken check is "broken", as in Allure, not "failed"."""
    if _outcome(report) == "broken" and report.failed:
        return WORD["broken"]
    return None


class _Recorder:
    """Collects each check's worst phase outcome as the reports arrive (on the controller,
    reports from xdist workers arrive here too, with their user_properties)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(getattr(report, "user_properties", ()))
        if OUTCOME not in props:
            return
        area, outcome = str(props[AREA]), str(props[OUTCOME])
        seen = self.config.stash[OUTCOMES]
        previous = seen.get(report.nodeid)
        if previous is None or RANK[outcome] > RANK[previous[1]]:
            seen[report.nodeid] = (area, outcome)
        if outcome == "broken" and report.failed:
            self.config.stash[BROKEN].setdefault(report.nodeid, str(props.get(WHY, "")))


def _why(report: pytest.TestReport) -> str:
    """The first line of what was raised: for our errors, what to fix."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(getattr(crash, "message", "") or report.longreprtext or "")
    first = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return first[:600]


def nothing_examined(outcomes: dict[str, tuple[str, str]]) -> bool:
    kinds = {outcome for _, outcome in outcomes.values()}
    return bool(outcomes) and kinds <= {"skipped"}


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    broken = config.stash[BROKEN]
    if broken:
        terminalreporter.section("broken: opsdrill could not judge these (fix and rerun)")
        for nodeid, why in broken.items():
            terminalreporter.line(f"BROKEN {nodeid} - {why}")
    if nothing_examined(config.stash[OUTCOMES]):
        terminalreporter.section("nothing was examined")
        terminalreporter.line(
            "opsdrill: every check was skipped, so nothing was verified (exit 2): the "
            "skip reasons above say which inventory sections are missing"
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workerinput"):
        return  # workers report to the controller; it decides and writes
    outcomes = config.stash[OUTCOMES]
    counts = Counter(outcomes.values())
    kinds = {outcome for _, outcome in outcomes.values()}
    only_broken = session.exitstatus == pytest.ExitCode.TESTS_FAILED and "failed" not in kinds
    if (kinds and only_broken) or (session.exitstatus == 0 and nothing_examined(outcomes)):
        session.exitstatus = BROKEN_EXIT
    path = config.getoption("metrics_file")
    if path and outcomes:
        metrics.write_checks(
            Path(path),
            counts,
            duration=time.monotonic() - config.stash[STARTED],
            all_green="passed" in kinds and kinds <= {"passed", "skipped"},
        )
