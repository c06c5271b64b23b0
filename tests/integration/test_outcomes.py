"""Exit codes and Prometheus metrics files, for the operations and for the check run."""

from __future__ import annotations

import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from opsdrill import metrics
from tests.conftest import Env, opsdrill, run_checks


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def test_a_failed_run_keeps_the_last_success_and_other_targets(tmp_path: Path) -> None:
    path = tmp_path / "textfile" / "opsdrill.prom"
    with metrics.recording("backup", "crm") as run:
        metrics.add_bytes(1234)
    metrics.write_operation(path, run, ok=True)
    first = samples(path)
    crm = (("operation", "backup"), ("target", "crm"))
    success_at = first[("opsdrill_operation_last_success_timestamp_seconds", crm)]
    with metrics.recording("backup", "billing") as other:
        pass
    metrics.write_operation(path, other, ok=True)
    with metrics.recording("backup", "crm") as failed:
        pass
    metrics.write_operation(path, failed, ok=False)
    now = samples(path)
    assert now[("opsdrill_operation_success", crm)] == 0
    assert now[("opsdrill_operation_last_success_timestamp_seconds", crm)] == success_at
    assert now[("opsdrill_operation_bytes", crm)] == 0
    billing = (("operation", "backup"), ("target", "billing"))
    assert now[("opsdrill_operation_success", billing)] == 1
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not list(path.parent.glob("*.tmp*")), "written through a temporary file, renamed"


def test_backup_and_drill_write_their_metrics(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "ops.prom"
    inv = str(env.path)
    assert opsdrill("backup", "-i", inv, "-d", "crm", "--metrics-file", str(path)).returncode == 0
    done = opsdrill("restore", "-i", inv, "-d", "crm", "--drill", "--metrics-file", str(path))
    assert done.returncode == 0, done.stderr
    got = samples(path)
    for op in ("backup", "drill"):
        labels = (("operation", op), ("target", "crm"))
        assert got[("opsdrill_operation_success", labels)] == 1
        assert got[("opsdrill_operation_bytes", labels)] > 0
        assert got[("opsdrill_operation_duration_seconds", labels)] > 0
    text = path.read_text()
    assert all(v not in text for k, v in env.stack.secrets.items())


def test_an_unreachable_store_is_exit_2_and_a_failed_backup_metric(
    env: Env, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint=f"127.0.0.1:{port}"))
    path = tmp_path / "ops.prom"
    proc = opsdrill("backup", "-i", str(env.path), "-d", "crm", "--metrics-file", str(path))
    assert proc.returncode != 0
    labels = (("operation", "backup"), ("target", "crm"))
    got = samples(path)
    assert got[("opsdrill_operation_success", labels)] == 0
    assert ("opsdrill_operation_last_success_timestamp_seconds", labels) not in got

    run = run_checks(env.path, "check_pg_freshness.py", extra=("--metrics-file", str(path)))
    assert run.status("pg.backup.freshness") == "broken", run.output[-2000:]
    assert run.returncode == 2, run.output[-2000:]
    assert samples(path)[("opsdrill_checks", (("area", "pg"), ("outcome", "broken")))] == 1


def test_check_run_exit_codes_and_counts(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "checks.prom"
    # under xdist: the workers' outcomes reach the controller, which alone writes
    stale = run_checks(
        env.path, "check_pg_freshness.py", extra=("-n", "2", "--metrics-file", str(path))
    )
    assert stale.status("pg.backup.freshness") == "failed"
    assert stale.returncode == 1
    got = samples(path)
    assert got[("opsdrill_checks", (("area", "pg"), ("outcome", "failed")))] == 1
    assert ("opsdrill_checks_last_success_timestamp_seconds", ()) not in got

    env.backup()
    fresh = run_checks(env.path, "check_pg_freshness.py", extra=("--metrics-file", str(path)))
    assert fresh.returncode == 0, fresh.output[-2000:]
    got = samples(path)
    assert got[("opsdrill_checks", (("area", "pg"), ("outcome", "passed")))] == 1
    assert got[("opsdrill_checks", (("area", "pg"), ("outcome", "failed")))] == 0
    assert got[("opsdrill_checks_last_success_timestamp_seconds", ())] > 0


def test_a_malformed_inventory_is_exit_2_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[stores.s]\nendpoint = "http://x"\nbogus = 1\n')
    run = run_checks(bad, "check_pg_freshness.py")
    assert run.returncode == 2, run.output[-2000:]
    assert "stores.s.bogus: unknown key" in run.output
    assert "stores.s.bucket: Field required" in run.output


def test_an_inventory_without_mirrors_or_domains_skips_their_checks(env: Env) -> None:
    env.backup()
    env.rewrite(lambda d: [d.pop(k, None) for k in ("mirrors", "secrets", "sending_domains")])
    run = run_checks(env.path, "check_files_mirror.py", "check_pg_freshness.py")
    assert "INTERNALERROR" not in run.output, run.output[-2000:]
    assert run.returncode == 0, run.output[-2000:]
    assert run.status("pg.backup.freshness") == "passed"
