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

from opsdrill.pg import SnapshotStats

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
        elif want["rows"] != got["rows"]:
            row["status"] = "row count differs"
            result.mismatches.append(
                f"{name}: manifest {want['rows']} rows, restored {got['rows']}"
            )
        elif "content_hash" in want and want.get("content_hash") != got.get("content_hash"):
            row["status"] = "content differs"
            result.mismatches.append(f"{name}: same row count, different content hash")
        result.rows.append(row)
    for name in sorted(set(manifest.sequences) | set(restored.sequences)):
        want_seq = manifest.sequences.get(name)
        got_seq = restored.sequences.get(name)
        if want_seq is None or got_seq is None:
            where = "the manifest" if want_seq is None else "the restored database"
            result.mismatches.append(f"sequence {name}: missing from {where}")
        elif got_seq["last_value"] < want_seq["last_value"]:
            result.mismatches.append(
                f"sequence {name}: manifest last_value {want_seq['last_value']}, "
                f"restored {got_seq['last_value']} (would hand out used ids)"
            )
        elif got_seq != want_seq:
            # Sequences are not transactional: nextval() during the dump moves them past
            # the snapshot. Ahead is harmless (no id reuse); behind is a real mismatch.
            result.notes.append(
                f"sequence {name}: restored last_value {got_seq['last_value']} is ahead of "
                f"manifest {want_seq['last_value']} (advanced while the dump ran)"
            )
    want_lo = manifest.large_objects.get("count", 0)
    got_lo = restored.large_objects.get("count", 0)
    if want_lo != got_lo:
        result.mismatches.append(f"large objects: manifest {want_lo}, restored {got_lo}")
    elif manifest.large_objects.get("content_hash") not in (
        None,
        restored.large_objects.get("content_hash"),
    ):
        result.mismatches.append("large objects: same count, different content hash")
    return result


@dataclass
class Drift:
    """Live database vs the backup: how much changed since, and what shrank suspiciously."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    suspicious: list[str] = field(default_factory=list)


def drift(manifest: Manifest, live: SnapshotStats, max_shrink_percent: float) -> Drift:
    result = Drift()
    for name in sorted(set(manifest.tables) | set(live.tables)):
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
