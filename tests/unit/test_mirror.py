"""``opsdrill mirror`` against two real S3 servers (moto processes): live and off-site.

Each test mirrors its own prefix, so tests do not depend on each other's order.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED
from minio.error import S3Error
from minio.versioningconfig import VersioningConfig

from opsdrill.config.inventory import Inventory, load
from opsdrill.errors import ConfigError, OperationFailed, RefusedError, TargetUnreachable
from opsdrill.files import copying, mirror, s3_exact, spool
from opsdrill.files.copying import SHA_META, MirrorSummary
from opsdrill.files.mirror import run_mirror, target_key
from opsdrill.files.restore import restore_mirror
from opsdrill_stack.procs import free_port
from opsdrill_stack.s3server import S3Server

LIVE, OFFSITE, RESTORED, PLAIN = "live-files", "offsite-files", "restored-files", "plain-offsite"
MiB = 1024 * 1024
CANARY = ".opsdrill-canary/"


def _small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of 5 MiB (S3's smallest), for the mirror's read and its upload alike: a few
    MiB then take the paths of an object over one part."""
    monkeypatch.setattr(mirror, "PART_SIZE", 5 * MiB)
    monkeypatch.setattr(copying, "PART_SIZE", 5 * MiB)


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def read(s3: Minio, bucket: str, key: str, version_id: str | None = None) -> bytes:
    response = s3.get_object(bucket, key, version_id=version_id)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def read_all(s3: Minio, bucket: str, prefix: str) -> dict[str, bytes]:
    objects = s3.list_objects(bucket, prefix=prefix, recursive=True)
    return {o.object_name[len(prefix) :]: read(s3, bucket, o.object_name) for o in objects}


def versions(s3: Minio, bucket: str, key: str) -> list[Any]:
    return [o for o in s3.list_objects(bucket, prefix=key, include_version=True)]


@dataclass
class World:
    live: Minio
    offsite: Minio
    live_endpoint: str
    offsite_endpoint: str
    base: Path
    secrets: dict[str, str]

    def inventory(
        self,
        tag: str,
        *,
        delete_mode: str = "keep",
        restored_prefix: str | None = None,
        live_endpoint: str | None = None,
        target_bucket: str = OFFSITE,
    ) -> Inventory:
        def store(endpoint: str, bucket: str, prefix: str, who: str) -> dict[str, Any]:
            return {
                "endpoint": endpoint,
                "bucket": bucket,
                "prefix": prefix,
                "secure": False,
                "access_key_env": f"MIRROR_TEST_{who}_ACCESS",
                "secret_key_env": f"MIRROR_TEST_{who}_SECRET",
                "timeout_seconds": 5.0,
            }

        data = {
            "name": "mirror-test",
            "env_file": str(self.base / "secrets.env"),
            "stores": {
                "live": store(live_endpoint or self.live_endpoint, LIVE, f"{tag}/", "LIVE"),
                # no trailing slash: the prefix still names the folder "mirror/<tag>/"
                "offsite": store(self.offsite_endpoint, target_bucket, f"mirror/{tag}", "OFFSITE"),
                "restored": store(
                    self.offsite_endpoint, RESTORED, restored_prefix or f"{tag}/", "OFFSITE"
                ),
            },
            "mirrors": {
                "files": {
                    "source": "live",
                    "target": "offsite",
                    "workers": 4,
                    "delete_mode": delete_mode,
                }
            },
        }
        path = self.base / f"inventory-{tag}-{uuid.uuid4().hex[:8]}.toml"
        path.write_text(tomli_w.dumps(data))
        return load(path)

    def seed(self, tag: str, objects: dict[str, bytes]) -> None:
        for rel, body in objects.items():
            self.live.put_object(LIVE, f"{tag}/{rel}", io.BytesIO(body), len(body))

    def target(self, inv: Inventory, rel: str) -> str:
        return target_key(inv, "files", rel)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="mirror-helper-"))
    servers = [S3Server("live", base), S3Server("offsite", base)]
    values = {
        f"MIRROR_TEST_{who}_{what}": secrets.token_hex(12)
        for who in ("LIVE", "OFFSITE")
        for what in ("ACCESS", "SECRET")
    }
    (base / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    (base / "secrets.env").chmod(0o600)
    try:
        for server in servers:
            server.start()
        live, offsite = (
            Minio(
                f"127.0.0.1:{server.port}",
                access_key=values[f"MIRROR_TEST_{who}_ACCESS"],
                secret_key=values[f"MIRROR_TEST_{who}_SECRET"],
                secure=False,
            )
            for server, who in zip(servers, ("LIVE", "OFFSITE"), strict=True)
        )
        live.make_bucket(LIVE)
        offsite.make_bucket(OFFSITE)
        offsite.set_bucket_versioning(OFFSITE, VersioningConfig(ENABLED))
        offsite.make_bucket(PLAIN)  # never versioned: a mirror must refuse it
        yield World(
            live,
            offsite,
            f"127.0.0.1:{servers[0].port}",
            f"127.0.0.1:{servers[1].port}",
            base,
            values,
        )
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mirrored(world: World) -> tuple[Inventory, dict[str, bytes], MirrorSummary]:
    """The realistic data set, mirrored once: shared read-only by the tests that use it."""
    data = {
        f"reports/{i % 4}/day-{i:02d}/r{i}.json": (f'{{"row": {i}}}\n' * (i + 1)).encode()
        for i in range(50)
    }
    data |= {
        "docs/Zoë résumé.pdf": os.urandom(3000),
        "a b/c d.txt": b"spaces in both parts of the key",
        "empty": b"",
        f"{CANARY}canary-1": b"canary: the delete-protection check watches this",
    }
    world.seed("base", data)
    big = os.urandom(20 * MiB)
    world.live.put_object(LIVE, "base/big/blob.bin", io.BytesIO(big), len(big), part_size=5 * MiB)
    data["big/blob.bin"] = big
    inv = world.inventory("base")
    return inv, data, run_mirror(inv, "files")


def test_first_run_copies_everything_with_its_sha256(mirrored: Any, world: World) -> None:
    inv, data, first = mirrored
    assert first.errors == []
    n = len(data)
    assert (first.examined, first.copied, first.skipped, first.same_content) == (n, n, 0, 0)
    assert first.bytes_copied == sum(len(b) for b in data.values())
    assert "-" in world.live.stat_object(LIVE, "base/big/blob.bin").etag  # not an MD5
    for rel, body in data.items():
        stat = world.offsite.stat_object(OFFSITE, world.target(inv, rel))
        assert stat.metadata[f"x-amz-meta-{SHA_META}"] == sha(body), rel
    assert read_all(world.offsite, OFFSITE, "mirror/base/") == data | {
        ".opsdrill-mirror/index-files.json": read(
            world.offsite, OFFSITE, mirror.index_key(inv, "files")
        )
    }
    assert first.line().startswith(f"mirror files: examined {n}, copied {n} (20.0 MiB), skipped 0")


def test_second_run_only_lists(mirrored: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    inv, data, _ = mirrored
    calls = {"get_object": 0, "stat_object": 0, "put_object": 0}
    for method in calls:
        original = getattr(Minio, method)

        def counted(self: Minio, *a: Any, _m: str = method, _f: Any = original, **k: Any) -> Any:
            calls[_m] += 1
            return _f(self, *a, **k)

        monkeypatch.setattr(Minio, method, counted)
    second = run_mirror(inv, "files")
    assert second.ok
    assert (second.examined, second.skipped, second.copied) == (len(data), len(data), 0)
    assert calls == {"get_object": 1, "stat_object": 0, "put_object": 0}  # 1: the index


def test_restore_reproduces_the_source(mirrored: Any, world: World) -> None:
    inv, data, _ = mirrored
    summary = restore_mirror(inv, "files", to_store="restored")
    assert summary.ok, summary.errors
    expected = {rel: body for rel, body in data.items() if not rel.startswith(CANARY)}
    assert (summary.examined, summary.copied) == (len(expected), len(expected))
    assert read_all(world.offsite, RESTORED, "base/") == expected  # no index, no canary
    stat = world.offsite.stat_object(RESTORED, "base/big/blob.bin")
    assert stat.metadata[f"x-amz-meta-{SHA_META}"] == sha(data["big/blob.bin"])
    with pytest.raises(RefusedError, match="already holds objects"):
        restore_mirror(inv, "files", to_store="restored")


def test_changed_object_is_recopied_and_history_kept(world: World) -> None:
    inv = world.inventory("hist")
    world.seed("hist", {"a.txt": b"version one", "b.txt": b"unchanged"})
    assert run_mirror(inv, "files").copied == 2
    before = datetime.now(UTC)
    time.sleep(1.1)  # S3 stamps have one-second resolution
    world.seed("hist", {"a.txt": b"version two, longer"})
    second = run_mirror(inv, "files")
    assert (second.copied, second.skipped, second.errors) == (1, 1, [])

    kept = versions(world.offsite, OFFSITE, world.target(inv, "a.txt"))
    assert sorted(read(world.offsite, OFFSITE, v.object_name, v.version_id) for v in kept) == [
        b"version one",
        b"version two, longer",
    ]
    old = world.inventory("hist", restored_prefix="hist-old/")
    assert restore_mirror(old, "files", to_store="restored", as_of=before).ok
    assert read_all(world.offsite, RESTORED, "hist-old/") == {
        "a.txt": b"version one",
        "b.txt": b"unchanged",
    }
    now = world.inventory("hist", restored_prefix="hist-now/")
    assert restore_mirror(now, "files", to_store="restored").ok
    assert read(world.offsite, RESTORED, "hist-now/a.txt") == b"version two, longer"


def test_identical_bytes_with_a_new_etag_are_not_recopied(world: World) -> None:
    inv = world.inventory("same")
    body = os.urandom(6 * MiB)
    world.live.put_object(LIVE, "same/blob", io.BytesIO(body), len(body), part_size=8 * MiB)
    etag = world.live.stat_object(LIVE, "same/blob").etag
    assert run_mirror(inv, "files").copied == 1
    world.live.put_object(LIVE, "same/blob", io.BytesIO(body), len(body), part_size=5 * MiB)
    assert world.live.stat_object(LIVE, "same/blob").etag != etag  # multipart now

    second = run_mirror(inv, "files")
    assert (second.same_content, second.copied, second.errors) == (1, 0, [])
    assert len(versions(world.offsite, OFFSITE, world.target(inv, "blob"))) == 1
    assert run_mirror(inv, "files").skipped == 1  # the index learnt the new ETag


def test_source_deletes_are_kept_unless_propagate(world: World) -> None:
    inv = world.inventory("del")
    world.seed("del", {"keep.txt": b"keep", "gone.txt": b"gone"})
    run_mirror(inv, "files")
    world.live.remove_object(LIVE, "del/gone.txt")
    kept = run_mirror(inv, "files")
    assert (kept.deleted, kept.skipped, kept.errors) == (0, 1, [])
    assert read(world.offsite, OFFSITE, world.target(inv, "gone.txt")) == b"gone"

    wrong = world.inventory("del", delete_mode="propagate", restored_prefix="del-now/")
    propagated = run_mirror(wrong, "files")
    assert (propagated.deleted, propagated.errors) == (1, [])
    assert "deleted 1" in propagated.line()
    with pytest.raises(S3Error, match="NoSuchKey"):
        world.offsite.stat_object(OFFSITE, world.target(inv, "gone.txt"))
    # the old version is still there, but a restore as of now leaves the deleted key out
    assert restore_mirror(wrong, "files", to_store="restored").copied == 1
    assert read_all(world.offsite, RESTORED, "del-now/") == {"keep.txt": b"keep"}


def test_a_failing_object_is_reported_after_copying_the_others(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    inv = world.inventory("fail")
    objects = {f"f{i}.txt": b"x" * i for i in range(10)}
    world.seed("fail", objects | {"gone.txt": b"gone", "edited.txt": b"before"})
    original = mirror.relative_keys

    def list_then_change(s3: Minio, bucket: str, prefix: str, **kw: Any) -> Any:
        listing = original(s3, bucket, prefix, **kw)
        if bucket == LIVE:  # as on a live bucket, between listing and copying
            world.live.remove_object(LIVE, "fail/gone.txt")
            world.seed("fail", {"edited.txt": b"after"})
        return listing

    monkeypatch.setattr(mirror, "relative_keys", list_then_change)
    summary = run_mirror(inv, "files")
    assert not summary.ok
    assert summary.errors == [
        "fail/edited.txt: changed since it was listed; the next run copies it",
        "fail/gone.txt: S3 error NoSuchKey: The specified key does not exist.",
    ]
    assert (summary.examined, summary.copied) == (12, 10)
    assert "errors 2" in summary.line()
    assert read_all(world.offsite, OFFSITE, "mirror/fail/").keys() >= objects.keys()
    monkeypatch.undo()
    again = run_mirror(inv, "files")
    assert (again.ok, again.copied, again.skipped, again.examined) == (True, 1, 10, 11)


def test_a_change_during_the_upload_pass_removes_the_bad_copy(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_parts(monkeypatch)  # so 6 MiB takes the streaming path
    monkeypatch.setattr(spool, "room_for", lambda size: False)  # read twice, not spooled
    inv = world.inventory("race")
    world.seed("race", {"blob": os.urandom(6 * MiB)})
    # as if the hash pass had seen other bytes than the upload pass sent
    monkeypatch.setattr(mirror, "object_sha256", lambda *a, **k: "0" * 64)
    summary = run_mirror(inv, "files")
    assert summary.errors == [
        "race/blob: changed while being copied; the bad copy was removed, the next run retries"
    ]
    assert versions(world.offsite, OFFSITE, world.target(inv, "blob")) == []
    monkeypatch.undo()
    assert run_mirror(inv, "files").copied == 1


def test_memory_stays_flat_for_a_large_object(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_parts(monkeypatch)
    inv = world.inventory("mem")
    blob = os.urandom(24 * MiB)
    world.live.put_object(LIVE, "mem/blob", io.BytesIO(blob), len(blob), part_size=5 * MiB)
    del blob
    tracemalloc.start()
    try:
        summary = run_mirror(inv, "files", workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (summary.copied, summary.bytes_copied) == (1, 24 * MiB)
    # minio holds the previous part while reading the next: about 3 parts; never the object
    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB for a 24 MiB object"


def test_unreachable_source_stops_the_run(world: World) -> None:
    down = world.inventory("down", live_endpoint=f"127.0.0.1:{free_port()}")
    with pytest.raises(TargetUnreachable, match="store live") as caught:
        run_mirror(down, "files")
    assert not any(value in str(caught.value) for value in world.secrets.values())


def test_objects_a_store_failed_are_not_failed_objects(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection dropped for one object says nothing about its data: it is counted in
    store_errors, the run's exit code is 2 (not 1), and the message names the store, or
    says both answer again."""
    inv = world.inventory("flaky")
    world.seed("flaky", {"a.txt": b"dropped", "b.txt": b"copied"})
    real = Minio.put_object

    def flaky(self: Minio, bucket: str, key: str, *args: Any, **kw: Any) -> Any:
        if key.endswith("/a.txt"):
            raise urllib3.exceptions.ProtocolError("Connection aborted.")
        return real(self, bucket, key, *args, **kw)

    monkeypatch.setattr(Minio, "put_object", flaky)
    summary = run_mirror(inv, "files")
    assert (summary.copied, summary.store_errors, summary.exit_code) == (1, 1, 2)
    assert summary.errors == ["flaky/a.txt: ProtocolError: Connection aborted."]
    assert summary.unreachable is not None and "answer again now" in summary.unreachable
    monkeypatch.undo()
    assert run_mirror(inv, "files").exit_code == 0


def test_unversioned_target_gets_new_objects_but_no_overwrites(world: World) -> None:
    inv = world.inventory("plain", target_bucket=PLAIN)
    world.seed("plain", {"a.txt": b"first", "b.txt": b"bee"})
    assert run_mirror(inv, "files").copied == 2
    world.seed("plain", {"a.txt": b"second", "c.txt": b"new"})
    second = run_mirror(inv, "files")
    assert second.copied == 1
    assert second.errors == [
        "plain/a.txt: not overwritten: the target bucket is not versioned, so this would "
        "destroy the previous off-site copy (fix: enable versioning on it)"
    ]
    assert read(world.offsite, PLAIN, world.target(inv, "a.txt")) == b"first"


def test_summary_line_and_prefixes() -> None:
    summary = MirrorSummary(
        "files", examined=312, copied=5, skipped=307, bytes_copied=int(12.3 * MiB), seconds=1.2
    )
    assert summary.line() == (
        "mirror files: examined 312, copied 5 (12.3 MiB), skipped 307, same content 0, "
        "errors 0 in 1.2s"
    )
    assert summary.ok and summary.exit_code == 0
    # an object at fault is a failure (1); objects a store failed alone: could not do it (2)
    assert MirrorSummary("files", errors=["a: x", "b: y"], store_errors=1).exit_code == 1
    assert MirrorSummary("files", errors=["a: x"], store_errors=1).exit_code == 2
    assert [copying.normalise_prefix(p) for p in ("", "/", "files", "files/", "/a/b/")] == [
        "",
        "",
        "files/",
        "files/",
        "a/b/",
    ]


def test_the_index_is_checked_and_may_be_empty(world: World) -> None:
    inv = world.inventory("idx")
    world.seed("idx", {"only.txt": b"only"})
    run_mirror(inv, "files")
    world.live.remove_object(LIVE, "idx/only.txt")
    assert run_mirror(inv, "files").examined == 0  # saves an index with no entries
    assert run_mirror(inv, "files").ok  # ...which loads
    junk = b'{"format": 1, "objects": []}'
    world.offsite.put_object(OFFSITE, mirror.index_key(inv, "files"), io.BytesIO(junk), len(junk))
    with pytest.raises(OperationFailed, match="not an opsdrill mirror index"):
        run_mirror(inv, "files")
    with pytest.raises(ConfigError, match="workers"):
        run_mirror(inv, "files", workers=0)
    with pytest.raises(ConfigError, match="timezone"):
        restore_mirror(inv, "files", to_store="restored", as_of=datetime(2024, 1, 1))


# Keys with "." and ".." path segments: legal in S3, written by some upload code. Their
# neighbours are the keys a normalising client would hit instead ("a/./b.txt" -> "a/b.txt").
DOT_KEYS = {
    "a/./b.txt": b"dot segment",
    "a/b.txt": b"the neighbour a normalised 'a/./b.txt' would overwrite",
    "a/../c.txt": b"dot-dot segment",
    "c.txt": b"the neighbour a normalised 'a/../c.txt' would overwrite",
    "./x": b"leading dot",
    "..": b"the whole key is a dot-dot",
    "d/..": b"trailing dot-dot",
    "e/.": b"trailing dot",
    "p/../../q": b"climbs above the prefix when normalised",
}


def boto(endpoint: str, world: World, who: str) -> Any:
    """An independent S3 client (boto3, as the upload code that writes such keys might be)
    for planting and reading keys the code under test must handle exactly."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=f"http://{endpoint}",
        aws_access_key_id=world.secrets[f"MIRROR_TEST_{who}_ACCESS"],
        aws_secret_access_key=world.secrets[f"MIRROR_TEST_{who}_SECRET"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def boto_read_all(s3: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k[len(prefix) :]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_keys_with_dot_segments_are_mirrored_and_restored_exactly(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_parts(monkeypatch)  # the big one goes multipart
    live = boto(world.live_endpoint, world, "LIVE")
    offsite = boto(world.offsite_endpoint, world, "OFFSITE")
    data = DOT_KEYS | {"big/./blob.bin": os.urandom(11 * MiB)}
    for rel, body in data.items():
        live.put_object(Bucket=LIVE, Key=f"dots/{rel}", Body=body)
    assert sorted(boto_read_all(live, LIVE, "dots/")) == sorted(data)  # planted as written

    inv = world.inventory("dots")
    first = run_mirror(inv, "files")
    assert (first.errors, first.copied, first.exit_code) == ([], len(data), 0)
    copied = boto_read_all(offsite, OFFSITE, "mirror/dots/")
    copied.pop(".opsdrill-mirror/index-files.json")
    assert copied == data
    stat = offsite.head_object(Bucket=OFFSITE, Key="mirror/dots/a/../c.txt")
    assert stat["Metadata"][SHA_META] == sha(DOT_KEYS["a/../c.txt"])
    again = run_mirror(inv, "files")
    assert (again.errors, again.skipped, again.copied) == ([], len(data), 0)

    live.put_object(Bucket=LIVE, Key="dots/a/./b.txt", Body=b"changed")
    changed = run_mirror(inv, "files")
    assert (changed.errors, changed.copied) == ([], 1)
    history = offsite.list_object_versions(Bucket=OFFSITE, Prefix="mirror/dots/a/./b.txt")
    assert len([v for v in history["Versions"] if v["Key"] == "mirror/dots/a/./b.txt"]) == 2

    restored = world.inventory("dots", restored_prefix="dots-restored/")
    summary = restore_mirror(restored, "files", to_store="restored")
    assert (summary.errors, summary.copied) == ([], len(data))
    assert boto_read_all(offsite, RESTORED, "dots-restored/") == data | {"a/./b.txt": b"changed"}


def test_keys_a_target_store_cannot_hold_fail_alone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that refuses such names (MinIO answers XMinioInvalidObjectName): everything
    else is mirrored, and the errors name exactly the refused keys and why."""
    live = boto(world.live_endpoint, world, "LIVE")
    for rel, body in DOT_KEYS.items():
        live.put_object(Bucket=LIVE, Key=f"refused/{rel}", Body=body)
    real = Minio._execute

    def refuses_dot_segments(self: Minio, method: str, bucket: str | None = None,
                             key: str | None = None, *a: Any, **kw: Any) -> Any:  # fmt: skip
        if bucket == OFFSITE and key and s3_exact.has_dot_segment(key) and method == "PUT":
            raise S3Error(
                None, "XMinioInvalidObjectName",  # type: ignore[arg-type]
                "Object name contains unsupported characters.", key, "req", "host",
            )  # fmt: skip
        return real(self, method, bucket, key, *a, **kw)

    monkeypatch.setattr(Minio, "_execute", refuses_dot_segments)
    summary = run_mirror(world.inventory("refused"), "files")
    dotted = sorted(k for k in DOT_KEYS if s3_exact.has_dot_segment(k))
    assert summary.copied == len(DOT_KEYS) - len(dotted)
    assert [e.split(": ", 1)[0] for e in summary.errors] == [f"refused/{k}" for k in dotted]
    assert all("cannot hold this key name" in e for e in summary.errors), summary.errors
    assert summary.exit_code == 1


def test_dot_segment_keys_in_an_unversioned_target_and_propagate_mode(world: World) -> None:
    """The paths that look before writing (HEAD of a key that is not there yet) and the
    test-only propagate mode (DELETE) keep such keys exact too."""
    live = boto(world.live_endpoint, world, "LIVE")
    offsite = boto(world.offsite_endpoint, world, "OFFSITE")
    for rel in ("a/../c.txt", "c.txt"):
        live.put_object(Bucket=LIVE, Key=f"dots-plain/{rel}", Body=rel.encode())
    plain = run_mirror(world.inventory("dots-plain", target_bucket=PLAIN), "files")
    assert (plain.errors, plain.copied) == ([], 2)
    copied = boto_read_all(offsite, PLAIN, "mirror/dots-plain/")
    copied.pop(".opsdrill-mirror/index-files.json")
    assert copied == {"a/../c.txt": b"a/../c.txt", "c.txt": b"c.txt"}
    live.delete_object(Bucket=LIVE, Key="dots-plain/a/../c.txt")
    wrong = world.inventory("dots-plain", target_bucket=PLAIN, delete_mode="propagate")
    propagated = run_mirror(wrong, "files")
    assert (propagated.errors, propagated.deleted) == ([], 1)
    left = boto_read_all(offsite, PLAIN, "mirror/dots-plain/")
    assert sorted(left) == [".opsdrill-mirror/index-files.json", "c.txt"]


@pytest.mark.parametrize("key", ["known/plain.bin", "known/a/../dotted.bin"])
def test_a_declared_payload_hash_is_signed_instead_of_hashing_again(
    world: World, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mirror hands its own sha256 to the client for a single PUT: the request carries
    it as the signed payload hash, and the body is not hashed a second time. (AWS and MinIO
    refuse a body that does not match it; moto, the stack's server, does not check.)"""
    import minio.api

    inv = world.inventory("known")
    client = s3_exact.exact_client(inv, inv.store("offsite"))
    body = os.urandom(4096)
    hashed: list[int] = []
    real_hash = minio.api.sha256_hash
    monkeypatch.setattr(
        minio.api, "sha256_hash", lambda data: hashed.append(len(data or b"")) or real_hash(data)
    )
    sent: list[Any] = []
    real_urlopen = client._http.urlopen
    monkeypatch.setattr(
        client._http, "urlopen",
        lambda method, url, **kw: sent.append((method, kw["headers"])) or real_urlopen(
            method, url, **kw
        ),
    )  # fmt: skip
    s3_exact.put(
        client, OFFSITE, key, io.BytesIO(body), len(body), "application/octet-stream",
        {SHA_META: sha(body)}, 5 * MiB, sha256=sha(body),
    )  # fmt: skip
    (headers,) = [h for method, h in sent if method == "PUT"]
    assert headers["x-amz-content-sha256"] == sha(body)
    assert "x-amz-content-sha256" in headers["Authorization"]  # among the signed headers
    assert headers["Content-Length"] == str(len(body))
    assert len(body) not in hashed
    stored = s3_exact.get(client, OFFSITE, key, None, None)
    try:
        assert stored.read() == body
    finally:
        stored.close()
        stored.release_conn()


def _counting_gets(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    gets: dict[str, int] = {}
    real_get = s3_exact.get

    def get(s3: Minio, bucket: str, key: str, *args: Any) -> Any:
        gets[key] = gets.get(key, 0) + 1
        return real_get(s3, bucket, key, *args)

    monkeypatch.setattr(s3_exact, "get", get)
    return gets


def test_an_object_over_one_part_is_read_once_through_a_private_spool(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sha256 must be in the metadata before the upload starts: the object is spooled
    while hashed (0600, in the run's 0700 directory) and sent from there, then removed."""
    _small_parts(monkeypatch)
    inv = world.inventory("spool")
    blob = os.urandom(12 * MiB)
    world.live.put_object(LIVE, "spool/blob", io.BytesIO(blob), len(blob), part_size=5 * MiB)
    gets = _counting_gets(monkeypatch)
    seen: list[tuple[Path, int, int]] = []
    real_write = spool._write

    def write(response: Any, path: Path) -> tuple[int, str]:
        seen.append((path, path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777))
        return real_write(response, path)

    monkeypatch.setattr(spool, "_write", write)
    summary = run_mirror(inv, "files")
    assert (summary.ok, summary.copied) == (True, 1), summary.errors
    assert gets == {"spool/blob": 1}
    [(path, mode, dir_mode)] = seen
    assert (mode, dir_mode) == (0o600, 0o700)
    assert not path.exists() and not path.parent.exists()  # the run's directory went too
    stat = world.offsite.stat_object(OFFSITE, world.target(inv, "blob"))
    assert stat.metadata[f"x-amz-meta-{SHA_META}"] == sha(blob)
    assert read(world.offsite, OFFSITE, world.target(inv, "blob")) == blob


def test_without_room_to_spool_an_object_is_read_twice_and_copied_right(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_parts(monkeypatch)
    monkeypatch.setattr(spool, "RESERVE_BYTES", 2**62)  # no filesystem keeps that free
    inv = world.inventory("noroom")
    blob = os.urandom(6 * MiB)
    world.seed("noroom", {"blob": blob})
    gets = _counting_gets(monkeypatch)
    summary = run_mirror(inv, "files")
    assert (summary.ok, summary.copied, gets) == (True, 1, {"noroom/blob": 2})
    assert read(world.offsite, OFFSITE, world.target(inv, "blob")) == blob


def test_a_disk_that_fills_up_while_spooling_costs_a_second_read_not_the_object(
    world: World,
) -> None:
    """A real write failure (the file size limit: EFBIG, as ENOSPC would be) in a run of
    its own: the object is read again and copied, and no spool is left."""
    inv = world.inventory("full")
    blob = os.urandom(20 * MiB)  # over the mirror's 16 MiB part: spooled
    world.seed("full", {"blob": blob})
    tmp = world.base / "tmp-full"
    tmp.mkdir()
    script = f"""
import resource, signal, sys
from opsdrill.config.inventory import load
from opsdrill.files import mirror, s3_exact
gets = []
real_get = s3_exact.get
s3_exact.get = lambda s3, bucket, key, *a: gets.append(key) or real_get(s3, bucket, key, *a)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, resource.RLIM_INFINITY))
summary = mirror.run_mirror(load({str(inv.path)!r}), "files")
print(summary.ok, summary.copied, gets, summary.errors)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True 1 ['full/blob', 'full/blob', 'full/blob'] []"
    assert list(tmp.iterdir()) == []
    stat = world.offsite.stat_object(OFFSITE, world.target(inv, "blob"))
    assert stat.metadata[f"x-amz-meta-{SHA_META}"] == sha(blob)
    assert read(world.offsite, OFFSITE, world.target(inv, "blob")) == blob


def test_sigterm_stops_the_mirror_soon_and_leaves_no_spool(world: World) -> None:
    """SIGTERM as soon as the run's private directory exists (the jobs are being queued):
    the copy under way finishes, no other starts, the command exits 143 at once, and the
    directory, with the spool, is gone."""
    inv = world.inventory("term")
    world.seed("term", {f"small/{i:04d}": os.urandom(64 * 1024) for i in range(300)})
    blob = os.urandom(20 * MiB)  # spooled
    world.seed("term", {"big/blob": blob})
    tmp = world.base / "tmp-term"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    # one worker: the big object first (largest first), then 300 small ones one by one
    argv = [sys.executable, "-m", "opsdrill", "mirror", "-i", str(inv.path), "--workers", "1"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not any(tmp.glob("opsdrill-mirror-*")) and time.monotonic() < deadline:
            time.sleep(0.01)  # made just before the copies are queued
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, err.decode()
    assert time.monotonic() - sent < 5
    assert list(tmp.iterdir()) == []
    copied = list(world.offsite.list_objects(OFFSITE, "mirror/term/", recursive=True))
    # the one copy under way (the big object: largest first) finished; no other started.
    # An interrupt while the jobs were still being queued waited for all of them (fixed).
    assert len(copied) <= 2, f"{len(copied)} objects copied: the run went on after SIGTERM"
