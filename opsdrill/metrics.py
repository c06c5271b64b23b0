"""Prometheus text files for node_exporter's textfile collector.

Operations run from cron and the check suite runs from CI: neither is scraped while it
runs, so each writes its outcome to a ``.prom`` file that node_exporter serves between
runs. Several jobs may share one file (say, a backup per database), so a write merges with
what the file already holds, under a lock, and replaces it atomically (prometheus_client
writes a temporary file and renames it). A failed run keeps the previous
``last_success`` timestamp: that is what an alert on "no success for 2 h" needs.

A file we cannot read back (truncated by a full disk, edited by hand, not UTF-8) is
replaced by this run's metrics, with a warning naming it: the metrics are a report on the
operation, so they must never fail it, nor stay broken for every later run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


PREFIX = "opsdrill_"
HELP = {
    "opsdrill_operation_success": "1 if the last run of the operation succeeded, else 0",
    "opsdrill_operation_last_run_timestamp_seconds": "when the operation last finished",
    "opsdrill_operation_last_success_timestamp_seconds": "when the operation last succeeded",
    "opsdrill_operation_duration_seconds": "wall time of the last run",
    "opsdrill_operation_bytes": "bytes written off-site (or restored) by the last run",
    "opsdrill_checks": "checks of the last run by area and outcome",
    "opsdrill_checks_last_run_timestamp_seconds": "when the check suite last finished",
    "opsdrill_checks_last_success_timestamp_seconds": "when every check last passed",
    "opsdrill_checks_duration_seconds": "wall time of the last check run",
}
Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]
_AREA = ["area", "outcome"]  # the label names of opsdrill_checks, sorted
# What prometheus_client's parser and Gauge raise on text that is not ours or not whole
# (UnicodeDecodeError is a ValueError).
_UNREADABLE = (ValueError, IndexError, KeyError, TypeError)


@dataclass
class OperationRun:
    """What one CLI invocation did; commands add bytes as they go."""

    operation: str
    target: str
    started: float = field(default_factory=time.monotonic)
    bytes: int = 0


_current: OperationRun | None = None


@contextlib.contextmanager
def recording(operation: str, target: str) -> Iterator[OperationRun]:
    global _current
    _current = OperationRun(operation, target)
    try:
        yield _current
    finally:
        _current = None


def add_bytes(count: int) -> None:
    """Called by commands; a no-op unless a --metrics-file run is being recorded."""
    if _current is not None:
        _current.bytes += count


def write_operation(path: Path, run: OperationRun, ok: bool) -> None:
    labels: Labels = (("operation", run.operation), ("target", run.target))
    now = time.time()
    update: Samples = {
        "opsdrill_operation_success": {labels: 1.0 if ok else 0.0},
        "opsdrill_operation_last_run_timestamp_seconds": {labels: now},
        "opsdrill_operation_duration_seconds": {labels: time.monotonic() - run.started},
        "opsdrill_operation_bytes": {labels: float(run.bytes)},
    }
    if ok:
        update["opsdrill_operation_last_success_timestamp_seconds"] = {labels: now}
    merge_into(path, update)


def write_checks(
    path: Path, counts: Mapping[tuple[str, str], int], duration: float, all_green: bool
) -> None:
    """counts: (area, outcome) -> number of checks. Areas and outcomes absent now are 0."""
    now = time.time()
    try:
        old = read(path).get("opsdrill_checks", {})
    except _UNREADABLE:
        old = {}  # merge_into warns and replaces it
    # only our own label sets: a file not written by us must not break this run's table
    checks: dict[Labels, float] = {key: 0.0 for key in old if [k for k, _ in key] == _AREA}
    for (area, outcome), n in counts.items():
        checks[(("area", area), ("outcome", outcome))] = float(n)
    update: Samples = {
        "opsdrill_checks": checks,
        "opsdrill_checks_last_run_timestamp_seconds": {(): now},
        "opsdrill_checks_duration_seconds": {(): duration},
    }
    if all_green:
        update["opsdrill_checks_last_success_timestamp_seconds"] = {(): now}
    merge_into(path, update)


def read(path: Path) -> Samples:
    """Our own earlier output (unknown metrics are dropped: the file is ours). Raises one
    of ``_UNREADABLE`` when the file is not Prometheus text."""
    if not path.exists():
        return {}
    # imported here, as in the two functions below: only a run that writes metrics pays for
    # prometheus_client (~20 ms of every command's start-up otherwise)
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(path.read_text(encoding="utf-8")):
        for sample in family.samples:
            if sample.name in HELP:
                key = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def merge_into(path: Path, update: Samples) -> None:
    if not path.parent.exists():
        # node_exporter reads this directory: not the 0700 the CLI's umask 077 would give
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
    with _locked(path):
        try:
            registry = _registry(_merged(read(path), update))
        except _UNREADABLE as exc:
            warnings.warn(
                f"metrics file {path} is not Prometheus text opsdrill can read "
                f"({type(exc).__name__}); replacing it with this run's metrics",
                stacklevel=3,
            )
            registry = _registry(_merged({}, update))
        from prometheus_client import write_to_textfile

        write_to_textfile(str(path), registry)
        os.chmod(path, 0o644)  # node_exporter runs as its own user


def _merged(samples: Samples, update: Samples) -> Samples:
    for name, values in update.items():
        if name == "opsdrill_checks":
            samples[name] = dict(values)  # a check run replaces the whole table
        else:
            samples.setdefault(name, {}).update(values)
    return samples


def _registry(samples: Samples) -> CollectorRegistry:
    """The samples as gauges; raises when one metric's samples have different label names
    (a file that is not ours)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    for name, values in sorted(samples.items()):
        label_names = sorted({k for labels in values for k, _ in labels})
        gauge = Gauge(name, HELP[name], label_names, registry=registry)
        for labels, value in values.items():
            (gauge.labels(**dict(labels)) if label_names else gauge).set(value)
    return registry


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
