"""Secrets bundles against a real S3 server (moto) and real gpg: the round trip, that the
off-site copy is OpenPGP to the right key, and that no value ever reaches a message."""

from __future__ import annotations

import base64
import io
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from minio import Minio

from opsdrill.config.envfile import read_env_file
from opsdrill.config.inventory import Inventory, load
from opsdrill.errors import (
    ConfigError,
    CredentialsRejected,
    OperationFailed,
    OpsdrillError,
    TargetUnreachable,
)
from opsdrill.gpg import GpgHome, inspect, sniff
from opsdrill.redact import MASK, redact
from opsdrill.s3 import client
from opsdrill.secrets.bundle import (
    BundleManifest,
    backup_bundle,
    compare_to_live,
    decrypt_bundle,
    fingerprint,
    list_bundles,
    missing_required,
    read_live_env,
    read_manifest,
    short,
)
from opsdrill_stack.gnupg_keys import Keypair, generate_keypair
from opsdrill_stack.s3server import S3Server

BUCKET = "envbundle-test"


@dataclass
class World:
    base: Path
    port: int
    backup_key: Keypair
    other_key: Keypair
    both_public: Path
    env_file: Path
    planted: dict[str, str]  # every secret value the tests must never see in a message

    def write_env(self, values: dict[str, str], tag: str) -> Path:
        path = self.base / f"{tag}-{uuid.uuid4().hex[:6]}.env"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# app environment\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
        return path

    def inventory(self, bundle: dict[str, Any] | None = None, **over: Any) -> Inventory:
        """A fresh inventory with its own store prefix, so tests never see each other."""
        store = {
            "endpoint": f"127.0.0.1:{self.port}",
            "bucket": BUCKET,
            "prefix": f"t-{uuid.uuid4().hex[:10]}",
            "secure": False,
            "access_key_env": "ENVB_S3_ACCESS",
            "secret_key_env": "ENVB_S3_SECRET",
            "timeout_seconds": 5.0,
            **over.get("store", {}),
        }
        data: dict[str, Any] = {
            "name": "envbundle-test",
            "env_file": str(self.base / "creds.env"),
            "stores": {"offsite": store},
            "gpg": {
                "recipients": [self.backup_key.fingerprint],
                "public_keys_file": str(self.both_public),
                "drill_private_key_file": str(self.backup_key.secret_file),
                "drill_passphrase_env": "ENVB_GPG_PASSPHRASE",
                **over.get("gpg", {}),
            },
            "secrets": {
                "app": {
                    "env_file": str(self.env_file),
                    "store": "offsite",
                    "required_keys": ["ENCRYPTION_KEY", "DATABASE_URL"],
                    **(bundle or {}),
                }
            },
        }
        data["secrets"]["app"] = {k: v for k, v in data["secrets"]["app"].items() if v is not None}
        path = self.base / f"inventory-{uuid.uuid4().hex[:8]}.toml"
        path.write_text(tomli_w.dumps(data))
        return load(path, environ={})

    def assert_clean(self, *texts: str) -> None:
        for text in texts:
            leaked = [k for k, v in self.planted.items() if v in text]
            assert not leaked, f"values of {leaked} shown in: {text[:200]!r}"
            assert MASK not in text, f"a secret had to be masked in: {text[:200]!r}"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="envbundle-helper-"))
    server = S3Server("s3", base)
    try:
        server.start()
        creds = {
            "ENVB_S3_ACCESS": "ak" + secrets.token_hex(8),
            "ENVB_S3_SECRET": "sk" + secrets.token_hex(16),
            "ENVB_GPG_PASSPHRASE": "pp" + secrets.token_hex(12),
            "ENVB_WRONG_PASSPHRASE": "wp" + secrets.token_hex(12),
        }
        (base / "creds.env").write_text("".join(f"{k}={v}\n" for k, v in creds.items()))
        (base / "creds.env").chmod(0o600)  # opsdrill warns about an env file others can read
        Minio(
            f"127.0.0.1:{server.port}",
            creds["ENVB_S3_ACCESS"],
            creds["ENVB_S3_SECRET"],
            secure=False,
        ).make_bucket(BUCKET)
        with ThreadPoolExecutor(2) as pool:  # seconds each, mostly waiting on gpg-agent
            jobs = [
                pool.submit(generate_keypair, base / "keys", f"envbundle {who}", passphrase)
                for who, passphrase in [
                    ("backup", creds["ENVB_GPG_PASSPHRASE"]),
                    ("other", "x" + secrets.token_hex(8)),
                ]
            ]
            backup_key, other_key = (job.result() for job in jobs)
        both = base / "keys" / "public.asc"
        both.write_text(backup_key.public_file.read_text() + other_key.public_file.read_text())
        db_password = secrets.token_urlsafe(18)
        planted = {
            "ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
            "DATABASE_URL": f"postgresql://app:{db_password}@db/crm",
            "SMTP_PASSWORD": secrets.token_urlsafe(18),
        }
        w = World(base, server.port, backup_key, other_key, both, base / "x", planted)
        w.env_file = w.write_env(planted, "app")
        w.planted = {**planted, "db password": db_password, **creds}
        yield w
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def latest(inv: Inventory) -> Any:
    refs = list_bundles(inv, "app")
    assert refs and refs[-1].complete, refs
    return refs[-1]


def test_round_trip(world: World) -> None:
    inv = world.inventory()
    manifest = backup_bundle(inv, "app")
    ref = latest(inv)
    assert ref.id == manifest.id and ref.data_key == manifest.object["key"]
    assert read_manifest(inv, "app", ref) == manifest
    assert BundleManifest.from_json(manifest.to_json()) == manifest
    values = decrypt_bundle(inv, "app", ref)
    assert values == read_env_file(world.env_file) == read_live_env(inv, "app")
    assert sorted(manifest.keys) == sorted(values)
    assert manifest.source == "env_file"
    assert manifest.object["recipients"] == [world.backup_key.fingerprint]
    assert missing_required(values, inv.bundle("app").required_keys) == []
    assert compare_to_live(manifest, values, ["ENCRYPTION_KEY", "DATABASE_URL"]) == []
    world.assert_clean(manifest.to_json().decode(), repr(manifest), repr(ref))
    assert redact(f"key={values['ENCRYPTION_KEY']}") == f"key={MASK}"  # registered


def test_malformed_env_line_is_named_by_number_only(world: World) -> None:
    bad = world.base / "bad.env"
    # a secret pasted on a line of its own with a word after it: python-dotenv cannot parse
    # it (a name alone, without the word, is valid dotenv: a key that is not set)
    secret = world.planted["SMTP_PASSWORD"]
    bad.write_text(f"ENCRYPTION_KEY=ok-{uuid.uuid4().hex}\n{secret} pasted\n")
    bad.chmod(0o600)
    inv = world.inventory({"env_file": str(bad)})
    for call in (read_live_env, backup_bundle):
        with pytest.raises(ConfigError, match=r"bad\.env:2: expected KEY=VALUE") as err:
            call(inv, "app")
        world.assert_clean(str(err.value))


def test_object_is_openpgp_to_the_backup_key(world: World) -> None:
    inv = world.inventory()
    manifest = backup_bundle(inv, "app")
    s3 = client(inv, inv.store("offsite"))
    response = s3.get_object(BUCKET, manifest.object["key"])
    try:
        blob = response.read()
    finally:
        response.close()
        response.release_conn()
    assert blob[0] in (0x84, 0x85, 0x86, 0x87, 0xC1)  # a PKESK packet header
    assert sniff(blob) == "openpgp"
    assert len(blob) == manifest.object["size"]
    world.assert_clean(blob.decode("latin-1"))
    assert b"ENCRYPTION_KEY" not in blob
    with GpgHome() as home:
        home.import_keys(world.backup_key.public_file, what="test key")
        (key,) = home.gpg.list_keys()
        info = inspect(blob[:4096], home)
    subkeys = [sub[0] for sub in key["subkeys"] if "e" in sub[1]]  # the encryption subkey
    assert info.encrypted_data
    assert info.recipient_key_ids == manifest.object["recipient_key_ids"] == subkeys


def test_command_source(world: World) -> None:
    inv = world.inventory({"env_file": None, "command": ["cat", str(world.env_file)]})
    assert read_live_env(inv, "app") == read_env_file(world.env_file)
    manifest = backup_bundle(inv, "app")
    assert manifest.source == "command: cat"
    assert decrypt_bundle(inv, "app", latest(inv)) == read_env_file(world.env_file)


@pytest.mark.parametrize(
    ("command", "timeout", "expect"),
    [
        (["false"], 30, "false: failed with exit code 1"),
        (["sh", "-c", 'cat "$0"; cat "$0" >&2; exit 3'], 30, "sh: failed with exit code 3"),
        (["sleep", "10"], 0.5, "sleep: did not finish within 0.5s"),
        (["sh", "-c", "sleep 10 & sleep 10"], 0.5, "sh: did not finish"),  # a child holds stdout
        (["/nonexistent/printenv"], 30, "/nonexistent/printenv: cannot run it"),
    ],
)
def test_failing_command_fails_fast_without_output(
    world: World, command: list[str], timeout: float, expect: str
) -> None:
    if command[0] == "sh" and "$0" in command[2]:
        command = [*command, str(world.env_file)]  # prints every secret, then fails
    inv = world.inventory(
        {"env_file": None, "command": command, "command_timeout_seconds": timeout}
    )
    for call in (read_live_env, backup_bundle):
        started = time.monotonic()
        with pytest.raises(TargetUnreachable) as err:
            call(inv, "app")
        assert time.monotonic() - started < 8  # killed at the timeout, not after sleep 10
        assert expect in str(err.value)
        world.assert_clean(str(err.value), repr(err.value))
    assert list_bundles(inv, "app") == []


def test_rotated_key_is_named_not_shown(world: World) -> None:
    inv = world.inventory()
    manifest = backup_bundle(inv, "app")
    rotated = {**world.planted, "ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode()}
    live_env = {k: rotated[k] for k in ("ENCRYPTION_KEY", "DATABASE_URL", "SMTP_PASSWORD")}
    live_inv = world.inventory({"env_file": str(world.write_env(live_env, "rotated"))})
    live = read_live_env(live_inv, "app")
    problems = compare_to_live(manifest, live, ["ENCRYPTION_KEY", "DATABASE_URL"])
    assert len(problems) == 1, problems
    assert problems[0].startswith("ENCRYPTION_KEY: off-site ")
    assert "differs from live" in problems[0] and "rotated and not backed up?" in problems[0]
    assert short(manifest.keys["ENCRYPTION_KEY"]) in problems[0]
    assert short(fingerprint(live["ENCRYPTION_KEY"], manifest.salt)) in problems[0]
    del live["DATABASE_URL"]
    assert compare_to_live(manifest, live, ["DATABASE_URL", "NOPE"]) == [
        "DATABASE_URL: not set on the live host",
        "NOPE: missing from the bundle and not set on the live host",
    ]
    assert compare_to_live(manifest, {"NEW_KEY": "v" * 8}, ["NEW_KEY"]) == [
        "NEW_KEY: missing from the bundle"
    ]
    world.assert_clean(*problems)
    assert not any(rotated["ENCRYPTION_KEY"] in p for p in problems)


def test_wrong_recipient_fails_and_wrong_passphrase_is_our_credential(world: World) -> None:
    """Encrypted to someone else: the bundle is wrong (OperationFailed, exit 1). A wrong
    passphrase: opsdrill's own credential refused (CredentialsRejected, exit 2), found
    before anything is downloaded and naming the variable."""
    inv = world.inventory(gpg={"recipients": [world.other_key.fingerprint]})
    manifest = backup_bundle(inv, "app")
    assert manifest.object["recipients"] == [world.other_key.fingerprint]
    with pytest.raises(OperationFailed) as err:
        decrypt_bundle(inv, "app", latest(inv))
    assert err.value.stage == "decrypt" and err.value.exit_code == 1
    assert "cannot decrypt" in str(err.value) and "none of them" in str(err.value)
    assert f"encrypted to {world.other_key.fingerprint}" in str(err.value)
    assert world.backup_key.fingerprint in str(err.value)  # names the drill key it tried
    world.assert_clean(str(err.value))

    wrong_pass = world.inventory(gpg={"drill_passphrase_env": "ENVB_WRONG_PASSPHRASE"})
    backup_bundle(wrong_pass, "app")
    with pytest.raises(CredentialsRejected) as refused:
        decrypt_bundle(wrong_pass, "app", latest(wrong_pass))
    assert refused.value.exit_code == 2
    assert world.backup_key.fingerprint in str(refused.value)
    assert "gpg.drill_passphrase_env = ENVB_WRONG_PASSPHRASE" in str(refused.value)
    world.assert_clean(str(refused.value))


def test_missing_required_key(world: World) -> None:
    partial = {k: world.planted[k] for k in ("ENCRYPTION_KEY", "SMTP_PASSWORD")}
    inv = world.inventory({"env_file": str(world.write_env(partial, "partial"))})
    manifest = backup_bundle(inv, "app")
    required = inv.bundle("app").required_keys
    assert missing_required(manifest.keys, required) == ["DATABASE_URL"]
    assert missing_required(read_live_env(inv, "app"), required) == ["DATABASE_URL"]
    assert missing_required(["DATABASE_URL"], ["ENCRYPTION_KEY", "DATABASE_URL"]) == [
        "ENCRYPTION_KEY"
    ]


def test_fingerprints_are_salted_per_bundle_and_stable_within(world: World) -> None:
    inv = world.inventory()
    now = datetime.now(UTC)
    first = backup_bundle(inv, "app", now=now - timedelta(minutes=5))
    second = backup_bundle(inv, "app", now=now)
    assert first.salt != second.salt
    assert first.keys["ENCRYPTION_KEY"] != second.keys["ENCRYPTION_KEY"]
    live = read_live_env(inv, "app")
    for manifest in (first, second):
        assert compare_to_live(manifest, live, sorted(live)) == []
        for key, value in live.items():
            assert manifest.keys[key] == fingerprint(value, manifest.salt)
    fp = first.keys["ENCRYPTION_KEY"]
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert short(fp) == fp[:19]


def test_now_sets_the_timestamp_and_layout(world: World) -> None:
    past = datetime(2024, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    inv = world.inventory()
    prefix = inv.store("offsite").prefix
    newer = backup_bundle(inv, "app", now=past + timedelta(days=1))
    older = backup_bundle(inv, "app", now=past)
    assert older.taken_at == "2024-01-02T03:04:05+00:00"
    assert re.fullmatch(r"app-20240102T030405Z-[0-9a-f]{6}", older.id), older.id
    assert older.object["key"] == f"{prefix}/secrets/app/2024/01/02/{older.id}.env.gpg"
    refs = list_bundles(inv, "app")
    assert [r.id for r in refs] == [older.id, newer.id]  # oldest first
    assert refs[0].taken_at == past.replace(microsecond=0)
    assert refs[0].manifest_key == f"{older.object['key'].removesuffix('.env.gpg')}.manifest.json"
    with pytest.raises(ValueError, match="timezone-aware"):
        backup_bundle(inv, "app", now=datetime(2024, 1, 1))

    # an empty store prefix and a sloppy bundle prefix still give clean keys
    tag = uuid.uuid4().hex[:8]
    bare = world.inventory({"prefix": f"/sec//{tag}/"}, store={"prefix": ""})
    bundle = backup_bundle(bare, "app", now=past)
    assert bundle.object["key"] == f"sec/{tag}/app/2024/01/02/{bundle.id}.env.gpg"
    assert [r.id for r in list_bundles(bare, "app")] == [bundle.id]


def test_incomplete_and_foreign_objects(world: World) -> None:
    inv = world.inventory(gpg={"recipients": [world.other_key.fingerprint]})
    prefix = inv.store("offsite").prefix
    s3 = client(inv, inv.store("offsite"))
    interrupted = backup_bundle(inv, "app", now=datetime(2024, 1, 1, tzinfo=UTC))
    s3.remove_object(BUCKET, f"{interrupted.object['key'].removesuffix('.env.gpg')}.manifest.json")
    for key in (
        f"{prefix}/secrets/app/notes.txt",
        f"{prefix}/secrets/app-other/2024/01/01/app-other-20240101T000000Z.env.gpg",
    ):
        s3.put_object(BUCKET, key, io.BytesIO(b"x"), 1)
    refs = list_bundles(inv, "app")
    assert [(r.id, r.complete) for r in refs] == [(interrupted.id, False)]
    with pytest.raises(OperationFailed, match="has no manifest") as err:
        read_manifest(inv, "app", refs[0])
    assert err.value.stage == "manifest"
    with pytest.raises(OperationFailed) as err:
        decrypt_bundle(inv, "app", refs[0])  # no manifest: names the packets' key ids
    assert err.value.stage == "decrypt"
    assert f"encrypted to key ids {interrupted.object['recipient_key_ids'][0]}" in str(err.value)


def test_empty_env_is_refused(world: World) -> None:
    empty = world.base / "empty.env"
    empty.write_text("# nothing here\n\n")
    empty.chmod(0o600)
    inv = world.inventory({"env_file": str(empty)})
    with pytest.raises(OperationFailed, match="holds no KEY=VALUE lines"):
        backup_bundle(inv, "app")
    assert list_bundles(inv, "app") == []


def test_unreachable_store_names_the_store_not_the_credentials(world: World) -> None:
    inv = world.inventory(store={"endpoint": "127.0.0.1:9", "timeout_seconds": 1.0})
    started = time.monotonic()
    with pytest.raises(TargetUnreachable, match="store offsite") as err:
        list_bundles(inv, "app")
    assert time.monotonic() - started < 30  # bounded by the store timeout, never a hang
    with pytest.raises(TargetUnreachable, match=r"^upload \S+\.env\.gpg: store offsite"):
        backup_bundle(inv, "app")  # the store's fault (exit 2), not a failed backup (1)
    missing = world.inventory(store={"bucket": "no-such-bucket-here"})
    with pytest.raises(TargetUnreachable, match="does not exist") as err2:
        list_bundles(missing, "app")
    assert "stores.offsite.bucket" in str(err2.value)
    errors: list[OpsdrillError] = [err.value, err2.value]
    world.assert_clean(*(str(e) for e in errors))
