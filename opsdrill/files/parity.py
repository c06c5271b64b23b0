"""What the files-mirror checks judge, as findings: every live file off-site with the same
bytes (parity), and every live file older than the RPO off-site (lag).

Parity compares the sha256 of the bytes on both sides, never the digest the mirror
recorded in the metadata (that is only as honest as the mirror); the keys are hashed in
parallel (``workers`` of the mirror). Both take the stores as an object with the methods
``opsdrill.files.stores.MirrorStores`` has, so a unit test can hand in a fake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from opsdrill.findings import Finding

T = TypeVar("T")


class Stores(Protocol):
    def live_objects(self) -> dict[str, Any]: ...

    def target_objects(self) -> dict[str, Any]: ...

    def live_sha(self, rel: str) -> str: ...

    def target_sha(self, rel: str) -> str | None: ...

    def parallel(self, fn: Callable[[str], T], keys: list[str]) -> Iterator[tuple[str, T]]: ...


@dataclass
class Parity:
    live_objects: int
    missing: list[str] = field(default_factory=list)
    differing: list[dict[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def evidence(self, shown: int) -> dict[str, Any]:
        return {
            "live_objects": self.live_objects,
            "missing_count": len(self.missing),
            "differing_count": len(self.differing),
            "missing": self.missing[:shown],
            "differing": self.differing[:shown],
        }


def parity(stores: Stores) -> Parity:
    """Every live file (canaries excluded) off-site with the same sha256."""
    keys = sorted(stores.live_objects())
    found = Parity(len(keys))
    for rel, (live_sha, off_sha) in stores.parallel(
        lambda k: (stores.live_sha(k), stores.target_sha(k)), keys
    ):
        if off_sha is None:
            found.missing.append(rel)
        elif off_sha != live_sha:
            found.differing.append(
                {"key": rel, "live": live_sha[:16], "off_site": off_sha[:16] or "none"}
            )
    if found.missing or found.differing:
        named = found.missing + [d["key"] for d in found.differing]
        shown = ", ".join(repr(k) for k in named[:5])
        found.findings.append(
            Finding(
                "files.parity",
                f"expected all {len(keys)} live files off-site with the same sha256, found "
                f"{len(found.missing)} missing and {len(found.differing)} differing "
                f"(e.g. {shown})",
            )
        )
    return found


@dataclass
class Lag:
    rpo_minutes: float
    cutoff: datetime
    live_objects: int
    due: int
    newest_due: datetime | None
    late: list[tuple[datetime, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def evidence(self, shown: int) -> dict[str, Any]:
        return {
            "rpo_minutes": self.rpo_minutes,
            "cutoff": self.cutoff,
            "live_objects": self.live_objects,
            "due": self.due,
            "newest_due": self.newest_due,
            "late_count": len(self.late),
            "late": [{"key": k, "last_modified": t} for t, k in self.late[:shown]],
        }


def lag(stores: Stores, now: datetime, rpo_minutes: float) -> Lag:
    """Every live file last modified more than ``rpo_minutes`` before ``now`` is off-site
    with the same size (the listing only: parity compares the bytes)."""
    cutoff = now - timedelta(minutes=rpo_minutes)
    live = stores.live_objects()
    due = {k: o for k, o in live.items() if o.last_modified and o.last_modified <= cutoff}
    off = stores.target_objects()
    late = sorted(
        (o.last_modified, k) for k, o in due.items() if k not in off or off[k].size != o.size
    )
    found = Lag(
        rpo_minutes=rpo_minutes,
        cutoff=cutoff,
        live_objects=len(live),
        due=len(due),
        newest_due=max((o.last_modified for o in due.values()), default=None),
        late=late,
    )
    if late:
        oldest, key = late[0]
        found.findings.append(
            Finding(
                "files.lag",
                f"expected every live file older than {rpo_minutes:g} min off-site, found "
                f"{len(late)} not mirrored; oldest {key!r} from {oldest:%Y-%m-%d %H:%M}Z",
            )
        )
    return found
