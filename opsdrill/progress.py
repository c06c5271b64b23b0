"""Progress on a terminal (bytes, rate, stage); silence in CI logs and cron mail.

The progress line is redrawn in place (``\\r``, no newline), so the terminal's cursor
stays at its end. Whatever is printed next (an error, a warning) would land on that same
line: while a line is open, ``sys.stdout`` and ``sys.stderr`` end it first (``_EndLine``),
wherever the message comes from, and ``done()`` (also on leaving a ``with`` block, by an
exception too) or ``end_line()`` end it explicitly.
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO, cast

_LOCK = threading.RLock()
_open: Progress | None = None  # the progress whose line the cursor is on


class Progress:
    def __init__(self, stage: str, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.stage = stage
        self.interval = interval
        self.total = 0
        self.started = time.monotonic()
        self._last = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.done()

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
        with _LOCK:
            if _open is not self:
                end_line()
            self.stream.write(f"\r{self.stage}: {mib:,.1f} MiB, {mib / elapsed:,.1f} MiB/s   ")
            self.stream.flush()
            _opened(self)

    def done(self) -> None:
        """End this progress line (idempotent; nothing if none was drawn)."""
        with _LOCK:
            if _open is self:
                end_line()


def end_line() -> None:
    """End the open progress line, if any, so the next output starts a line of its own."""
    global _open
    with _LOCK:
        if _open is None:
            return
        progress, _open = _open, None
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if isinstance(stream, _EndLine):
                setattr(sys, name, stream.wrapped)
        try:
            progress.stream.write("\n")
            progress.stream.flush()
        except (OSError, ValueError):  # the terminal is gone (SIGHUP) or closed
            pass


def _opened(progress: Progress) -> None:
    global _open
    _open = progress
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _EndLine):
            setattr(sys, name, cast(TextIO, _EndLine(stream)))


class _EndLine:
    """``sys.stdout`` or ``sys.stderr`` while a progress line is open: the first write ends
    that line, then this stand-in puts the real stream back. Why a stand-in: an error is
    printed by whoever caught it (the CLI's handler, a warning), which cannot know that a
    progress line is open; this way no caller has to."""

    def __init__(self, wrapped: TextIO) -> None:
        self.wrapped = wrapped

    def write(self, text: str) -> int:
        if text:
            end_line()
        return self.wrapped.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)
