"""A metrics file opsdrill cannot read (truncated by a full disk, written by hand, not
UTF-8) is replaced, with a warning naming it: it must never turn a successful operation
into a failed one, nor stay broken for every later run."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from opsdrill import metrics
from tests.conftest import Env, opsdrill

GARBAGE = {
    "not prometheus text": b"this is { not prometheus text\n",
    "truncated": b"# TYPE opsdrill_operation_success gauge\n"
    b'opsdrill_operation_success{operation="ba',
    "not UTF-8": b"\xff\xfe\x00g\x00a\x00r\x00b\x00a\x00g\x00e\n",
    "a value that is no number": b'opsdrill_operation_success{operation="x",target="y"} yes\n',
    # parses, but its label sets cannot be one gauge: rendering it would fail every write
    "labels that do not fit": (
        b'opsdrill_operation_success{operation="backup",target="crm"} 1\n'
        b'opsdrill_operation_success{operation="backup"} 1\n'
    ),
}


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def test_a_garbage_metrics_file_does_not_fail_a_backup_and_is_replaced(
    env: Env, tmp_path: Path
) -> None:
    path = tmp_path / "textfile" / "opsdrill.prom"
    path.parent.mkdir()
    path.write_bytes(GARBAGE["not prometheus text"])
    proc = opsdrill("backup", "-i", str(env.path), "-d", "crm", "--metrics-file", str(path))
    assert proc.returncode == 0, proc.stderr
    assert str(path) in proc.stderr and "replac" in proc.stderr, proc.stderr
    got = samples(path)  # valid Prometheus text again
    labels = (("operation", "backup"), ("target", "crm"))
    assert got[("opsdrill_operation_success", labels)] == 1
    assert got[("opsdrill_operation_last_success_timestamp_seconds", labels)] > 0
    # and the next run merges with it as usual, without a warning
    again = opsdrill("backup", "-i", str(env.path), "-d", "crm", "--metrics-file", str(path))
    assert again.returncode == 0 and str(path) not in again.stderr, again.stderr


@pytest.mark.parametrize("shape", list(GARBAGE))
def test_every_unreadable_shape_is_replaced_with_a_warning(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "opsdrill.prom"
    path.write_bytes(GARBAGE[shape])
    with metrics.recording("backup", "crm") as run:
        metrics.add_bytes(10)
    with pytest.warns(UserWarning, match="replac") as caught:
        metrics.write_operation(path, run, ok=True)
    assert any(str(path) in str(w.message) for w in caught)
    labels = (("operation", "backup"), ("target", "crm"))
    assert samples(path)[("opsdrill_operation_bytes", labels)] == 10


def test_a_check_run_replaces_an_unreadable_file_too(tmp_path: Path) -> None:
    path = tmp_path / "checks.prom"
    path.write_bytes(GARBAGE["truncated"])
    with pytest.warns(UserWarning, match="replac"):
        metrics.write_checks(path, {("backups", "passed"): 3}, duration=1.5, all_green=True)
    got = samples(path)
    assert got[("opsdrill_checks", (("area", "backups"), ("outcome", "passed")))] == 3
    assert got[("opsdrill_checks_last_success_timestamp_seconds", ())] > 0
