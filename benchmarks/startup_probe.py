"""A pytest plugin for bench_startup.py: writes when the first check of the process starts
(wall clock, ``time.time()``) to the file named by OPSDRILL_BENCH_FIRST_CHECK, one line per
process (xdist workers included), and when collection ended."""

from __future__ import annotations

import os
import time
from typing import Any

_written = False


def _write(kind: str) -> None:
    path = os.environ.get("OPSDRILL_BENCH_FIRST_CHECK")
    if path:
        with open(path, "a") as out:
            out.write(f"{kind} {time.time():.6f} {os.getpid()}\n")


def pytest_collection_finish(session: Any) -> None:
    _write("collected")


def pytest_runtest_call(item: Any) -> None:
    global _written
    if not _written:
        _written = True
        _write("first")
