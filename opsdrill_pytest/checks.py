"""Check metadata and failure reporting.

Every check declares a stable id, a severity and a runbook section. The decorator turns
that into Allure labels and marks (the runbook link is added at run time by the plugin's
``pytest_runtest_setup``, which knows ``--runbook-base-url``); ``fail`` builds the one-line
message operators read first:
``<target>: <what was expected>, found <what> (runbook: <link>)``, and ``fail_with`` does
so from the library's findings (``opsdrill.findings``): the library judges, the check
selects the codes it covers and fails with them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import allure
import pytest

from opsdrill.findings import Finding
from opsdrill.redact import redact

F = TypeVar("F", bound=Callable[..., Any])
RUNBOOK_BACKUP = "docs/runbooks/backup-and-restore.md"
SHOWN = 20  # evidence lists are capped; counts are always complete


class CheckFailed(AssertionError):
    """A verification failed (Allure: failed). Anything else raised means broken."""


class OpsdrillBug(RuntimeError):
    """An assumption inside opsdrill did not hold (a bare ``assert`` in a check or a
    fixture): opsdrill could not judge, so the check is broken, never failed."""

    def __init__(self, where: str, exc: AssertionError) -> None:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "assert failed"
        super().__init__(
            redact(
                f"{where}: opsdrill could not judge: an internal assumption did not hold "
                f"({detail}); this is a bug in opsdrill, not a verdict on the target"
            )
        )


@dataclass(frozen=True)
class Check:
    id: str
    severity: str  # blocker | critical | normal | minor
    runbook: str
    epic: str
    feature: str

    def __call__(self, fn: F) -> F:
        decorated = fn
        for deco in (
            allure.epic(self.epic),
            allure.feature(self.feature),
            allure.severity(getattr(allure.severity_level, self.severity.upper())),
            allure.tag(self.id),
            allure.label("check_id", self.id),
            # the runbook rides on check_id: a marker of its own would be one more keyword
            # that every `-k` expression matches ("-k ok" would select "runbook")
            pytest.mark.check_id(self.id, runbook=self.runbook),
        ):
            decorated = deco(decorated)
        return decorated

    def fail(self, target: str, message: str) -> NoReturn:
        raise CheckFailed(redact(f"{target}: {message} (check {self.id}; runbook: {self.runbook})"))

    def fail_with(
        self, target: str, findings: Sequence[Finding], *, note: str = "", limit: int = 10
    ) -> None:
        """Fail with every finding's message (each names where, what was expected and
        what was found); return when there is none."""
        if not findings:
            return
        shown = "; ".join(f.message for f in findings[:limit])
        more = len(findings) - limit
        if more > 0:
            shown += f"; ... {more} more (see the evidence)"
        self.fail(target, shown + (f" ({note})" if note else ""))


def _attaching() -> bool:
    """Whether anything records attachments (allure-pytest listens only with --alluredir):
    a run without a report skips building them, which for 100 domains' DNS answers is
    seconds (issue 16)."""
    import allure_commons

    return bool(allure_commons.plugin_manager.hook.attach_data.get_hookimpls())


def attach_json(name: str, data: Any) -> None:
    if not _attaching():
        return
    allure.attach(
        redact(json.dumps(data, indent=2, default=str)),
        name=name,
        attachment_type=allure.attachment_type.JSON,
    )


def attach_text(name: str, text: str) -> None:
    if not _attaching():
        return
    allure.attach(redact(text), name=name, attachment_type=allure.attachment_type.TEXT)


def table(rows: list[dict[str, Any]], limit: int = 200) -> str:
    """A plain-text table for evidence (readable in the report without a viewer)."""
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    shown = rows[:limit]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in shown)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in shown]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows")
    return "\n".join(lines)
