"""Unit tests for the pieces with no server behind them."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from opsdrill.backups.manifest import Manifest, compare, drift
from opsdrill.backups.pgstats import SnapshotStats
from opsdrill.errors import ConfigError, OperationFailed, OpsdrillError
from opsdrill.gpg import sniff
from opsdrill.pipeline import HashingReader, Pipeline, Stage
from opsdrill.redact import redact, register


def manifest(**tables: int) -> Manifest:
    return Manifest(
        id="crm-20261128T100000Z",
        database="crm",
        taken_at="2026-11-28T10:00:00+00:00",
        finished_at="2026-11-28T10:00:05+00:00",
        object={"key": "k", "size": 1, "sha256": "0" * 64, "compression": "zstd"},
        server={},
        tools={},
        tables={t: {"rows": n} for t, n in tables.items()},
        sequences={"crm.s": {"last_value": 10, "is_called": True}},
        large_objects={"count": 1},
    )


def stats(seq: int = 10, lo: int = 1, **tables: int) -> SnapshotStats:
    return SnapshotStats(
        {t: {"rows": n} for t, n in tables.items()},
        {"crm.s": {"last_value": seq, "is_called": True}},
        {"count": lo},
    )


def test_compare_exact() -> None:
    assert compare(manifest(a=3, b=0), stats(a=3, b=0)).exact


def test_compare_names_each_difference() -> None:
    result = compare(manifest(a=3, b=1), stats(seq=9, lo=0, a=2, c=5))
    text = "\n".join(result.mismatches)
    assert "a: manifest 3 rows, restored 2" in text
    assert "b: in the manifest, missing after restore" in text
    assert "c: restored but not in the manifest" in text
    # an old-format manifest read its sequences at another moment than the dump: a
    # difference is a note (tests/unit/test_manifest_compare.py judges the new format)
    assert "crm.s" not in text
    assert "large objects: manifest 1, restored 0" in text


def test_sequence_ahead_is_a_note_not_a_mismatch() -> None:
    result = compare(manifest(a=1), stats(seq=12, a=1))
    assert result.exact and "read at another moment" in result.notes[0]


def test_content_hash_mismatch() -> None:
    m = manifest(a=2)
    m.tables["a"]["content_hash"] = "1"
    s = stats(a=2)
    s.tables["a"]["content_hash"] = "2"
    assert "same row count, different content hash" in compare(m, s).mismatches[0]


def test_drift_flags_only_shrink_beyond_tolerance() -> None:
    d = drift(manifest(a=100, b=100, c=100), stats(a=95, b=50, d=1), max_shrink_percent=10)
    assert len(d.suspicious) == 2
    assert "b: live has 50 rows, backup 100 (50.0% fewer" in d.suspicious[0]
    assert "c: in the backup, gone from live" in d.suspicious[1]


def test_manifest_round_trip_and_format_check() -> None:
    m = manifest(a=1)
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(ValueError, match="unknown format"):
        Manifest.from_json(b'{"format": "other"}')


def test_redact_masks_registered_and_inline_secrets() -> None:
    register("s3cr3t-value-xyz")
    text = redact("pw s3cr3t-value-xyz in postgresql://u:pa55word@h/db and password=abc123")
    assert "s3cr3t-value-xyz" not in text and "pa55word" not in text and "abc123" not in text
    assert "***" in text
    assert "s3cr3t-value-xyz" not in str(OpsdrillError("oops s3cr3t-value-xyz"))


def test_pipeline_streams_and_hashes() -> None:
    pipe = Pipeline(
        [
            Stage("gen", ["sh", "-c", "yes opsdrill | head -c 3000000"]),
            Stage("compress", ["gzip", "-c"]),
        ]
    )
    reader = HashingReader(pipe)
    total = 0
    while chunk := reader.read(65536):
        total += len(chunk)
    pipe.close()
    assert total == reader.size > 0 and reader.finished


def test_pipeline_names_culprit_not_victims() -> None:
    pipe = Pipeline(
        [
            Stage("producer", ["sh", "-c", "yes | head -c 50000000"]),
            Stage("middle", ["cat"]),
            Stage("dies", ["sh", "-c", "head -c 1000 >/dev/null; echo boom >&2; exit 3"]),
        ]
    )
    reader = HashingReader(pipe)
    with pytest.raises(OperationFailed) as info:
        while reader.read(65536):
            pass
    pipe.close()
    assert info.value.stage == "dies" and "exited 3: boom" in info.value.message


def test_pipeline_missing_binary_is_a_setup_problem_exit_2() -> None:
    with pytest.raises(ConfigError, match="is not installed or not on PATH") as info:
        Pipeline([Stage("x", ["/nonexistent/binary"])])
    assert info.value.exit_code == 2


def test_sniff_formats() -> None:
    assert sniff(b"\x28\xb5\x2f\xfdxx") == "zstd"
    assert sniff(b"\x1f\x8bxx") == "gzip"
    assert sniff(b"PGDMP\x01") == "pgdump"
    assert sniff(b"\x84\x5e\x03") == "openpgp"
    assert sniff(b"hello") == "plaintext"


def test_pipeline_stderr_never_touches_the_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (issue 11) took the stderr capture files with it ("tee exited 1: no
    error output"): a TMPDIR that cannot hold a file must not cost a stage its words."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/full-disk")
    pipe = Pipeline(
        [Stage("tee", ["sh", "-c", "echo 'tee: /x/dump: No space left on device' >&2; exit 1"])]
    )
    try:
        with pytest.raises(OperationFailed, match="No space left on device"):
            pipe.wait()
    finally:
        pipe.close()


def test_pipeline_keeps_the_last_words_of_a_chatty_stage() -> None:
    """Megabytes of stderr neither block the stage (the pipe is drained) nor fill memory
    (the last few KB are kept): the last line is what explains the failure."""
    from opsdrill.pipeline import STDERR_TAIL

    chatty = "head -c 5000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'last words' >&2; exit 4"
    pipe = Pipeline([Stage("chatty", ["sh", "-c", chatty])])
    try:
        with pytest.raises(OperationFailed) as info:
            pipe.wait()
        assert info.value.message.endswith("last words")
        assert len(pipe.stderr_of(0, limit=10**9)) <= STDERR_TAIL
    finally:
        pipe.close()


def test_pipeline_children_create_private_files(tmp_path: Path) -> None:
    """The restore spool is a plaintext dump: what a stage creates is 0600 whatever the
    umask opsdrill was started with (it was 0644)."""
    old = os.umask(0o022)
    try:
        pipe = Pipeline([Stage("tee", ["tee", str(tmp_path / "spool")])], stdin=subprocess.PIPE)
        assert pipe.procs[0].stdin is not None
        pipe.procs[0].stdin.write(b"plaintext dump")
        pipe.procs[0].stdin.close()
        pipe.wait()
        pipe.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o600


def test_a_failed_container_fallback_still_names_the_major_that_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a Docker engine up but no image to be had, the error says first that
    PostgreSQL 17 tools are missing, then why the container could not stand in (the
    message depended on whether a test had left an engine running)."""
    from opsdrill import containers, pgtools
    from opsdrill.errors import ConfigError

    def unpullable(pattern: str, major: int, tool: str, key: str) -> pgtools.PgTools:
        raise ConfigError(f"{key}.tools_container: image postgres:{major} could not be pulled")

    monkeypatch.setattr(containers, "engine_answers", lambda: True)
    monkeypatch.setattr(pgtools, "_in_container", unpullable)
    with pytest.raises(ConfigError) as caught:
        pgtools.choose(
            17,
            "pg_restore",
            key="databases.crm",
            pg_bin_dir=None,
            container="postgres:{major}",
            why="the backup",
        )
    message = caught.value.message
    assert message.startswith("databases.crm: the backup runs PostgreSQL 17, and no pg_restore")
    assert "could not be pulled" in message
