"""Progress on a terminal (bytes, rate, stage); silence in CI logs and cron mail."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stage: str, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.stage = stage
        self.interval = interval
        self.total = 0
        self.started = time.monotonic()
        self._last = 0.0

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self._draw(force=True)

    def add(self, nbytes: int) -> None:
        self.total += nbytes
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-6)
        mib = self.total / 1048576
        self.stream.write(f"\r{self.stage}: {mib:,.1f} MiB, {mib / elapsed:,.1f} MiB/s   ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
