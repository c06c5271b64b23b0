"""Which of our tests make which check fail, and which make it broken.

A fault test declares what it proves with ``@proves(failed=[...], broken=[...])``. The
claim is verified when the test runs (``tests/conftest.py``: every claimed check id must
show that Allure status in one of the test's check runs), and ``tests/test_registry.py``
fails when a check id of ``checks/`` lacks a test for either outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])
MARK = "proves"


def proves(*, failed: Iterable[str] = (), broken: Iterable[str] = ()) -> Callable[[F], F]:
    """Mark a test as the proof that it makes these checks fail / broken."""
    return pytest.mark.proves(failed=tuple(failed), broken=tuple(broken))  # type: ignore[no-any-return]
