"""The backup manifest and the comparisons a drill makes against it.

A backup without a manifest is never counted as good: the manifest is what proves which
rows the dump holds (counts taken inside the very snapshot pg_dump used), so a drill can
demand an exact match instead of "it restored without errors".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from opsdrill.backups.pgstats import SnapshotStats, reuse_problem

FORMAT = "opsdrill-backup-manifest/1"


class ManifestInvalid(ValueError):
    """The bytes are not a manifest this version can trust."""


@dataclass
class Manifest:
    id: str
    database: str
    taken_at: str
    finished_at: str
    object: dict[str, Any]
    server: dict[str, Any]
    tools: dict[str, str]
    tables: dict[str, dict[str, Any]]
    sequences: dict[str, dict[str, Any]]
    large_objects: dict[str, Any]
    duration_seconds: float = 0.0
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and check the shape every reader relies on; ``ManifestInvalid`` names
        what is wrong (an empty, truncated or foreign file is a bad backup)."""
        if not raw.strip():
            raise ManifestInvalid("it is empty")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestInvalid(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ManifestInvalid(f"expected a JSON object, found {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ManifestInvalid(f"unknown format {str(data.get('format'))[:80]!r}")
        required = [
            k for k, f in cls.__dataclass_fields__.items() if f.default is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise ManifestInvalid(f"fields missing: {', '.join(missing)}")
        for key in ("object", "server", "tools", "tables", "sequences", "large_objects"):
            if not isinstance(data[key], dict):
                raise ManifestInvalid(f"{key}: expected an object")
        obj = data["object"]
        if not isinstance(obj.get("size"), int) or not isinstance(obj.get("sha256"), str):
            raise ManifestInvalid("object.size and object.sha256 are missing or malformed")
        bad = [
            t
            for t, v in data["tables"].items()
            if not isinstance(v, dict) or not isinstance(v.get("rows"), int)
        ]
        if bad:
            raise ManifestInvalid(f"tables without a row count: {', '.join(sorted(bad)[:5])}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def taken(self) -> datetime:
        return datetime.fromisoformat(self.taken_at)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "taken_at": self.taken_at,
            "object": {
                k: self.object.get(k)
                for k in ("key", "size", "sha256", "compression", "encrypted", "recipients")
            },
            "server_version": self.server.get("version"),
            "tables": len(self.tables),
            "rows": sum(t["rows"] for t in self.tables.values()),
            "sequences": len(self.sequences),
            "large_objects": self.large_objects.get("count", 0),
            "duration_seconds": self.duration_seconds,
        }


@dataclass
class Comparison:
    """Restored database vs manifest: every table, every sequence, large objects."""

    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the diff table for evidence

    @property
    def exact(self) -> bool:
        return not self.mismatches


def compare(manifest: Manifest, restored: SnapshotStats) -> Comparison:
    """What a restore really produced, against what the manifest says the dump holds.

    Tables: exact row counts (and content hashes when recorded). Materialized views: a
    restore refreshes each view that was populated from the restored tables, so its rows
    are what the view's query gives over the restored data, not what a possibly stale view
    held at backup time; it must be populated again (or stay unpopulated). Sequences: the
    restored value is the one the dump carried; it is judged against the restored data
    (``reuse_problem``), the manifest's own reading being only another moment's. Large
    objects: count, total bytes and content hash where recorded.
    """
    result = Comparison()
    for name in sorted(set(manifest.tables) | set(restored.tables)):
        want = manifest.tables.get(name)
        got = restored.tables.get(name)
        row = {
            "table": name,
            "manifest_rows": want and want["rows"],
            "restored_rows": got and got["rows"],
            "status": "ok",
        }
        if want is None:
            row["status"] = "unexpected table"
            result.mismatches.append(f"{name}: restored but not in the manifest")
        elif got is None:
            row["status"] = "missing table"
            result.mismatches.append(f"{name}: in the manifest, missing after restore")
        elif want.get("kind") == "materialized view" or got.get("kind") == "materialized view":
            row["status"] = _judge_view(name, want, got, result)
        elif want["rows"] != got["rows"]:
            row["status"] = "row count differs"
            result.mismatches.append(
                f"{name}: manifest {want['rows']} rows, restored {got['rows']}"
            )
        elif "content_hash" in want and want.get("content_hash") != got.get("content_hash"):
            row["status"] = "content differs"
            result.mismatches.append(f"{name}: same row count, different content hash")
        result.rows.append(row)
    _compare_sequences(manifest, restored, result)
    _compare_large_objects(manifest, restored, result)
    return result


def _judge_view(name: str, want: dict[str, Any], got: dict[str, Any], result: Comparison) -> str:
    was, now = bool(want.get("populated", True)), bool(got.get("populated", True))
    if was != now:
        state = {True: "populated", False: "unpopulated (WITH NO DATA)"}
        result.mismatches.append(
            f"materialized view {name}: {state[was]} at backup, {state[now]} after restore"
        )
        return "populated state differs"
    if not was:
        result.notes.append(f"materialized view {name}: unpopulated, restored unpopulated")
        return "unpopulated, as at backup"
    if want["rows"] != got["rows"]:
        result.notes.append(
            f"materialized view {name}: refreshed by the restore from the restored tables: "
            f"{got['rows']} rows; it held {want['rows']} at backup (stale since its last "
            "REFRESH); not a mismatch"
        )
        return "refreshed (was stale at backup)"
    result.notes.append(
        f"materialized view {name}: refreshed by the restore, {got['rows']} rows as at backup"
    )
    return "refreshed"


def _compare_sequences(manifest: Manifest, restored: SnapshotStats, result: Comparison) -> None:
    for name in sorted(set(manifest.sequences) | set(restored.sequences)):
        want_seq = manifest.sequences.get(name)
        got_seq = restored.sequences.get(name)
        if want_seq is None or got_seq is None:
            where = "the manifest" if want_seq is None else "the restored database"
            result.mismatches.append(f"sequence {name}: missing from {where}")
            continue
        problem = reuse_problem(name, got_seq)
        if problem:
            result.mismatches.append(problem)
        elif "increment" in want_seq and _behind(got_seq, want_seq):
            # Manifests that record the increment read their sequences before pg_dump
            # started (pgstats.read_sequences): the dump's value can only be at or past it.
            # Behind it, the dump lost the value (a standalone sequence has no column to
            # judge reuse by; this is its only evidence). Older manifests read later: racy.
            result.mismatches.append(
                f"sequence {name}: restored at {got_seq['last_value']}, behind the value "
                f"{want_seq['last_value']} read before the dump started"
            )
        elif got_seq["last_value"] != want_seq["last_value"]:
            result.notes.append(
                f"sequence {name}: restored {got_seq['last_value']} (the dump's reading), "
                f"manifest {want_seq['last_value']} (read at another moment: sequences are "
                "not transactional)"
                + (
                    f"; no id of {got_seq['owned_by']} would be reused"
                    if "owned_by" in got_seq
                    else ""
                )
            )


def _behind(got: dict[str, Any], want: dict[str, Any]) -> bool:
    ascending = int(got.get("increment", 1)) > 0
    if ascending:
        return int(got["last_value"]) < int(want["last_value"])
    return int(got["last_value"]) > int(want["last_value"])


def _compare_large_objects(manifest: Manifest, restored: SnapshotStats, result: Comparison) -> None:
    want, got = manifest.large_objects, restored.large_objects
    if want.get("count", 0) != got.get("count", 0):
        result.mismatches.append(
            f"large objects: manifest {want.get('count', 0)}, restored {got.get('count', 0)}"
        )
    elif "bytes" in want and want["bytes"] != got.get("bytes"):
        result.mismatches.append(
            f"large objects: manifest {want['bytes']} bytes, restored {got.get('bytes')}"
        )
    elif want.get("content_hash") not in (None, got.get("content_hash")):
        result.mismatches.append("large objects: same count, different content hash")


@dataclass
class Drift:
    """Live database vs the backup: how much changed since, and what shrank suspiciously."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    suspicious: list[str] = field(default_factory=list)


def drift(manifest: Manifest, live: SnapshotStats, max_shrink_percent: float) -> Drift:
    result = Drift()
    for name in sorted(set(manifest.tables) | set(live.tables)):
        if "materialized view" in (
            manifest.tables.get(name, {}).get("kind"),
            live.tables.get(name, {}).get("kind"),
        ):
            continue  # a view shrinks when its source does: the tables tell the story
        before = manifest.tables.get(name, {}).get("rows")
        now = live.tables.get(name, {}).get("rows")
        delta = None if before is None or now is None else now - before
        row = {"table": name, "backup_rows": before, "live_rows": now, "delta": delta}
        result.rows.append(row)
        if now is None:
            result.suspicious.append(f"{name}: in the backup, gone from live")
        elif before and delta is not None and delta < 0:
            shrink = -delta * 100.0 / before
            row["shrink_percent"] = round(shrink, 2)
            if shrink > max_shrink_percent:
                result.suspicious.append(
                    f"{name}: live has {now} rows, backup {before} "
                    f"({shrink:.1f}% fewer; tolerance {max_shrink_percent:g}%)"
                )
    return result
