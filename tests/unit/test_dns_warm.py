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
        used = {
            n
            for n in ("spf", "dmarc", "mx", "migration_spf")
            if f"dns_target.{n}()" in source or f"migration_target.{n}()" in source
        }
        assert used == set(names), module


class _Counting:
    """dnspython's side of a DnsResolver, as a stand-in: counts what is sent."""

    def __init__(self, fail: int = 0) -> None:
        self.asked: list[tuple[str, str]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, qname: str, rdtype: str) -> Any:
        from opsdrill.dns.resolver import DnsAnswer
        from opsdrill.errors import TargetUnreachable

        with self.lock:
            self.asked.append((qname, rdtype))
            failing = len(self.asked) <= self.fail
        time.sleep(0.02)  # long enough for the other threads to ask the same meanwhile
        if failing:
            raise TargetUnreachable(f"DNS {qname} {rdtype}: timed out")
        return DnsAnswer(qname, rdtype, "NOERROR", ("v=spf1 -all",), ((b"v=spf1 -all",),))


def _resolver(remember: bool, sent: _Counting) -> Any:
    from opsdrill.dns import DnsResolver

    resolver = DnsResolver(["127.0.0.1"], 53, 1.0, remember=remember)
    resolver._resolve = sent  # type: ignore[method-assign]
    return resolver


def test_a_check_run_asks_each_question_once_however_many_threads_ask_it() -> None:
    """One run reads one snapshot: a provider's include shared by 100 domains is one query,
    also when the 16 warming threads ask it at the same moment."""
    from concurrent.futures import ThreadPoolExecutor

    sent = _Counting()
    resolver = _resolver(True, sent)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: resolver.query("_spf.Provider.example.", "txt"), range(8))
        )
    assert sent.asked == [("_spf.provider.example", "TXT")]
    assert all(a is answers[0] for a in answers)
    assert resolver.query("_spf.provider.example", "TXT") is answers[0]


def test_a_failed_question_is_asked_again_and_an_unremembering_resolver_always_asks() -> None:
    import pytest

    from opsdrill.errors import TargetUnreachable

    sent = _Counting(fail=1)
    resolver = _resolver(True, sent)
    with pytest.raises(TargetUnreachable):
        resolver.query("example.com", "TXT")
    assert resolver.query("example.com", "TXT").records == ("v=spf1 -all",)
    assert len(sent.asked) == 2
    plain = _Counting()
    resolver = _resolver(False, plain)
    resolver.query("example.com", "TXT")
    resolver.query("example.com", "TXT")
    assert len(plain.asked) == 2
