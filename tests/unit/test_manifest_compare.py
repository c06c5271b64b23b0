"""How a drill judges what a restore produced (opsdrill.backups.manifest.compare), unit by unit."""

from __future__ import annotations

from typing import Any

from opsdrill.backups.manifest import FORMAT, Manifest, compare, drift
from opsdrill.backups.pgstats import SnapshotStats, next_value, reuse_problem


def manifest(**parts: Any) -> Manifest:
    return Manifest(
        id="crm-20261202T000000Z",
        database="crm",
        taken_at="2026-12-02T00:00:00+00:00",
        finished_at="2026-12-02T00:00:01+00:00",
        object={"size": 1, "sha256": "x"},
        server={},
        tools={},
        tables=parts.get("tables", {}),
        sequences=parts.get("sequences", {}),
        large_objects=parts.get("large_objects", {"count": 0}),
        format=FORMAT,
    )


def seq(last: int, inc: int = 1, called: bool = True, **more: Any) -> dict[str, Any]:
    return {"last_value": last, "is_called": called, "increment": inc, **more}


def test_next_value_follows_is_called_and_direction() -> None:
    assert next_value(seq(10)) == 11
    assert next_value(seq(10, called=False)) == 10
    assert next_value(seq(-10, inc=-1)) == -11


def test_an_ascending_sequence_at_or_below_its_column_max_would_reuse_ids() -> None:
    owned = {"owned_by": "t.id", "column_max": 100, "column_min": 1}
    assert reuse_problem("s", seq(100, **owned)) is None  # next is 101
    assert "would hand out used ids" in (reuse_problem("s", seq(99, **owned)) or "")


def test_a_descending_sequence_is_judged_against_its_column_min() -> None:
    owned = {"owned_by": "t.id", "column_max": -1, "column_min": -40}
    assert reuse_problem("s", seq(-40, inc=-1, **owned)) is None  # next is -41
    problem = reuse_problem("s", seq(-39, inc=-1, **owned)) or ""
    assert "(descending): next value -40 is not below t.id's min -40" in problem
    # the old rule ("restored below the manifest is bad") got this the wrong way round
    restored = SnapshotStats(sequences={"s": seq(-45, inc=-1, **owned)})
    assert compare(manifest(sequences={"s": seq(-41, inc=-1)}), restored).exact


def test_a_sequence_read_before_the_dump_may_only_be_behind_the_dump() -> None:
    ahead = SnapshotStats(sequences={"s": seq(120)})
    assert compare(manifest(sequences={"s": seq(100)}), ahead).exact
    behind = compare(manifest(sequences={"s": seq(100)}), SnapshotStats(sequences={"s": seq(90)}))
    assert behind.mismatches == [
        "sequence s: restored at 90, behind the value 100 read before the dump started"
    ]
    # an older manifest (no increment recorded) read its sequences at another moment
    old = {"s": {"last_value": 100, "is_called": True}}
    assert compare(manifest(sequences=old), SnapshotStats(sequences={"s": seq(90)})).exact


def test_materialized_views_are_judged_as_the_restore_produces_them() -> None:
    view = {"kind": "materialized view", "populated": True}
    stale = compare(
        manifest(tables={"v": {"rows": 3, **view}}),
        SnapshotStats(tables={"v": {"rows": 5, **view}}),
    )
    assert stale.exact and "it held 3 at backup" in stale.notes[0]
    lost = compare(
        manifest(tables={"v": {"rows": 3, **view}}),
        SnapshotStats(tables={"v": {"rows": 0, "kind": "materialized view", "populated": False}}),
    )
    assert lost.mismatches == [
        "materialized view v: populated at backup, unpopulated (WITH NO DATA) after restore"
    ]


def test_large_objects_compare_count_and_bytes() -> None:
    want = manifest(large_objects={"count": 2, "bytes": 100})
    assert compare(want, SnapshotStats(large_objects={"count": 2, "bytes": 100})).exact
    short = compare(want, SnapshotStats(large_objects={"count": 2, "bytes": 90}))
    assert short.mismatches == ["large objects: manifest 100 bytes, restored 90"]


def test_drift_ignores_materialized_views() -> None:
    view = {"rows": 10, "kind": "materialized view", "populated": True}
    live = SnapshotStats(tables={"v": {**view, "rows": 1}})
    assert drift(manifest(tables={"v": view}), live, 10.0).suspicious == []
