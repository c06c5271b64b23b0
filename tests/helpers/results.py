"""Reading one check's Allure result out of a check run (tests/conftest.py: CheckRun)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.conftest import CheckRun


def labels(res: dict[str, Any]) -> dict[str, str]:
    return {lab["name"]: lab["value"] for lab in res["labels"] if lab["name"] != "tag"}


def result(run: CheckRun, check_id: str, target: str) -> dict[str, Any]:
    """The result of ``check_id`` on ``target``; failing, every result the run had."""
    for res in run.results:
        lab = labels(res)
        if lab.get("check_id") == check_id and lab.get("target") == target:
            return res
    got = sorted(f"{labels(r).get('check_id')}[{labels(r).get('target')}]" for r in run.results)
    raise AssertionError(f"no result for {check_id}[{target}]; got {got}\n{run.output[-3000:]}")


def message(res: dict[str, Any]) -> str:
    return str(res.get("statusDetails", {}).get("message", ""))
