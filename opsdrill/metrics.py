"""Prometheus text files for node_exporter's textfile collector.

Operations run from cron and the check suite runs from CI: neither is scraped while it
runs, so each writes its outcome to a ``.prom`` file that node_exporter serves between
runs. Several jobs may share one file (say, a backup per database), so a write merges with
what the file already holds, under a lock, and replaces it atomically (prometheus_client
writes a temporary file and renames it). A failed run keeps the previous
``last_success`` timestamp: that is what an alert on "no success for 2 h" needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

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
    old = read(path).get("opsdrill_checks", {})
    checks: dict[Labels, float] = {key: 0.0 for key in old}
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
    """Our own earlier output (unknown metrics are dropped: the file is ours)."""
    if not path.exists():
        return {}
    samples: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if sample.name in HELP:
                key = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def merge_into(path: Path, update: Samples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        samples = read(path)
        for name, values in update.items():
            if name == "opsdrill_checks":
                samples[name] = dict(values)  # a check run replaces the whole table
            else:
                samples.setdefault(name, {}).update(values)
        registry = CollectorRegistry()
        for name, values in sorted(samples.items()):
            label_names = sorted({k for labels in values for k, _ in labels})
            gauge = Gauge(name, HELP[name], label_names, registry=registry)
            for labels, value in values.items():
                (gauge.labels(**dict(labels)) if label_names else gauge).set(value)
        write_to_textfile(str(path), registry)
        os.chmod(path, 0o644)  # node_exporter runs as its own user


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
