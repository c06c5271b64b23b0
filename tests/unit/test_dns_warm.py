"""The DNS checks' analyses run concurrently once per run (opsdrill_pytest.dns: plan, then
warm at the first check that reads one), each exactly once, and an error stays where the
check that reads it reports it."""

from __future__ import annotations

import threading
import time
from typing import Any

from opsdrill_pytest.dns import ANALYSES_BY_MODULE, SharedResolver, plan_analyses


class Shared(SharedResolver):
    resolver = object()  # type: ignore[assignment]  # no DNS: the analyses are stand-ins


def test_planned_analyses_run_concurrently_once_and_errors_do_not_escape() -> None:
    shared = Shared(inv=None)  # type: ignore[arg-type]
    running = 0
    peak = 0
    calls: list[int] = []
    lock = threading.Lock()

    def analysis(n: int) -> Any:
        def run() -> None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
                calls.append(n)
            time.sleep(0.05)
            with lock:
                running -= 1
            if n == 3:
                raise RuntimeError("a resolver error: the check reading it reports it")

        return run

    shared.plan([analysis(n) for n in range(20)])
    started = time.monotonic()
    shared.warm()
    assert sorted(calls) == list(range(20))
    assert peak > 1, "the analyses ran one after another"
    assert time.monotonic() - started < 20 * 0.05
    shared.warm()  # planned work is done once
    assert len(calls) == 20


def test_nothing_planned_means_nothing_runs() -> None:
    shared = Shared(inv=None)  # type: ignore[arg-type]
    shared.warm()
    plan_analyses([("check_dns_spf", object())])  # not a DNS target: ignored


def test_every_dns_check_module_reads_only_the_analyses_planned_for_it() -> None:
    """The plan names each module's analyses: a check reading one more would analyse it
    alone, late; here the modules' sources are read for the calls they make."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "opsdrill_checks"
    for module, names in ANALYSES_BY_MODULE.items():
        source = (root / f"{module}.py").read_text()
        used = {n for n in ("spf", "dmarc", "mx", "migration_spf") if f"dns_target.{n}()" in source}
        assert used == set(names), module
