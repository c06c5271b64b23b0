"""Every check can be made to fail, and to be broken: the registry of fault tests.

A check id with no test that makes it fail might pass whatever the target looks like; one
with no test that makes it broken might call an unreachable target "failed" (or, worse,
"passed"). Fault tests declare what they prove with ``@proves`` (tests/helpers/registry.py) and a
fixture verifies the claim against the run's Allure results; this module checks that the
declarations cover every check id in ``opsdrill_checks/``, and that ``docs/checks.md`` lists them.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import registry
from tests.helpers.registry import ROOT, claims, render_catalogue


def test_every_check_has_a_test_that_fails_it_and_one_that_breaks_it() -> None:
    checks = registry.check_catalogue()
    proven = claims()
    assert len(checks) >= 39
    gaps = [
        f"{check_id}: no test makes it {outcome}"
        for check_id in sorted(checks)
        for outcome in ("failed", "broken")
        if not proven.get((check_id, outcome))
    ]
    assert not gaps, "\n".join(gaps)


def test_claims_name_real_check_ids() -> None:
    checks = registry.check_catalogue()
    unknown = sorted({check_id for check_id, _ in claims() if check_id not in checks})
    assert not unknown, f"@proves names check ids that do not exist: {unknown}"


def test_the_catalogue_in_docs_is_current() -> None:
    path = ROOT / "docs" / "checks.md"
    assert path.read_text() == render_catalogue(), (
        "docs/checks.md is stale: regenerate it with `.venv/bin/python -m tests.helpers.registry`"
    )


def test_render_lists_each_check_with_its_tests(tmp_path: Path) -> None:
    text = render_catalogue()
    assert "| `pg.backup.freshness` | critical |" in text
    assert "test_stale_backup_fails_freshness" in text
