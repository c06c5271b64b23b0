"""Off-site backup of the application's env (the .env holding ENCRYPTION_KEY).

A restored database is useless without the key its columns were encrypted with. The env is
encrypted to the [gpg] recipients beside a manifest of salted value fingerprints (never
values), so a check can prove the off-site copy holds the live key without showing either.
Layout mirrors catalog.py: ``STORE_PREFIX/BUNDLE_PREFIX/NAME/YYYY/MM/DD/NAME-TS-NONCE.env.gpg``
+ ``...-NONCE.manifest.json`` (ids without the nonce, from before it, are read too); only
both count. The payload is the source text verbatim.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from minio import Minio

from opsdrill.backups import uploads
from opsdrill.backups.catalog import ID_PATTERN, MANIFEST_SUFFIX, backup_id, new_nonce, pair_objects
from opsdrill.config import envfile
from opsdrill.config.inventory import Gpg, Inventory, Store
from opsdrill.errors import ConfigError, OperationFailed
from opsdrill.gpg import GpgHome, import_drill_key, inspect
from opsdrill.redact import register
from opsdrill.s3 import S3_ERRORS, client, unreachable

FORMAT = "opsdrill-secrets-manifest/1"
DATA_SUFFIX = ".env.gpg"

GPG_TIMEOUT = 60.0
MAX_OBJECT = 4 * 1024 * 1024  # an env file is kilobytes; anything bigger is not one of ours
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEY = re.compile(ID_PATTERN + r"(?P<suffix>\.env\.gpg|\.manifest\.json)$")


@dataclass
class BundleManifest:
    """What was backed up, as key names and salted fingerprints: safe to show and store."""

    id: str
    name: str
    taken_at: str
    object: dict[str, Any]
    salt: str
    keys: dict[str, str]
    source: str
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BundleManifest:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not format {FORMAT}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class BundleRef:
    id: str
    name: str
    taken_at: datetime
    data_key: str | None = None
    manifest_key: str | None = None

    @property
    def complete(self) -> bool:
        return self.data_key is not None and self.manifest_key is not None


def fingerprint(value: str, salt: str) -> str:
    """Salted per bundle, so equal values cannot be matched across bundles by hash alone."""
    return "sha256:" + hashlib.sha256(f"{salt}\0{value}".encode()).hexdigest()


def short(fp: str) -> str:
    """Enough of a fingerprint to tell two apart in a report."""
    return "sha256:" + fp.removeprefix("sha256:")[:12]


def read_live_env(inv: Inventory, name: str) -> dict[str, str]:
    """The live environment; every value is registered so redact() masks it anywhere."""
    raw, _, where = _read_source(inv, name)
    return parse_env_bytes(raw, where)


def backup_bundle(inv: Inventory, name: str, *, now: datetime | None = None) -> BundleManifest:
    """Encrypt the live env to the recipients and upload it: data first, manifest last."""
    store_name, store, prefix, gpg = _where(inv, name)
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    taken_at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    raw, source, where = _read_source(inv, name)
    values = parse_env_bytes(raw, where)
    if not values:
        raise OperationFailed("read", f"{where} holds no KEY=VALUE lines (refusing to back it up)")
    with GpgHome() as home:
        home.import_keys(inv.resolve_path(gpg.public_keys_file), what="gpg.public_keys_file")
        key_ids = home.encryption_key_ids(gpg.recipients)
        blob = _gpg_run(home.encrypt_argv(list(key_ids)), raw, "encrypt")
        packets = inspect(blob, home)  # record the key ids really used, not the ones expected
    offered = {k for ids in key_ids.values() for k in ids}
    if not (packets.encrypted_data and set(packets.recipient_key_ids) <= offered):
        raise OperationFailed("encrypt", "gpg output is not encrypted to the recipients")
    salt = secrets.token_hex(16)
    # A nonce in the id, as for database backups: two runs in one second never share keys.
    bundle_id = backup_id(name, taken_at, new_nonce())
    base = f"{prefix}{taken_at:%Y/%m/%d}/{bundle_id}"
    manifest = BundleManifest(
        id=bundle_id,
        name=name,
        taken_at=taken_at.isoformat(),
        object={
            "key": base + DATA_SUFFIX,
            "store": store_name,
            "bucket": store.bucket,
            "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "recipients": sorted(key_ids),
            "recipient_key_ids": sorted(packets.recipient_key_ids),
        },
        salt=salt,
        keys={key: fingerprint(value, salt) for key, value in sorted(values.items())},
        source=source,
    )
    s3 = client(inv, store)
    _put(s3, store_name, store, base + DATA_SUFFIX, blob, "upload")
    try:
        _put(s3, store_name, store, base + MANIFEST_SUFFIX, manifest.to_json(), "manifest upload")
    except BaseException:
        with contextlib.suppress(Exception):  # without a manifest it never counts anyway
            s3.remove_object(store.bucket, base + DATA_SUFFIX)
        raise
    return manifest


def list_bundles(inv: Inventory, name: str) -> list[BundleRef]:
    """Every bundle of ``name`` in its store, complete or not, oldest first."""
    store_name, store, prefix, _ = _where(inv, name)
    try:
        objects = list(client(inv, store).list_objects(store.bucket, prefix, recursive=True))
    except S3_ERRORS as exc:
        raise unreachable(store_name, store, exc) from None
    return [
        BundleRef(
            pair.id,
            name,
            pair.taken_at,
            None if pair.data is None else str(pair.data.object_name),
            None if pair.manifest is None else str(pair.manifest.object_name),
        )
        for pair in pair_objects(objects, _KEY, name)
    ]


def read_manifest(inv: Inventory, name: str, ref: BundleRef) -> BundleManifest:
    store_name, store, _, _ = _where(inv, name)
    if ref.manifest_key is None:
        raise OperationFailed(
            "manifest", f"bundle {ref.id} has no manifest (an interrupted backup)"
        )
    raw = _get(client(inv, store), store_name, store, ref.manifest_key)
    try:
        manifest = BundleManifest.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise OperationFailed(
            "manifest", f"{ref.manifest_key}: not a valid secrets manifest ({exc})"
        ) from None
    if manifest.name != name:
        raise OperationFailed("manifest", f"{ref.manifest_key}: belongs to another bundle")
    return manifest


def decrypt_bundle(inv: Inventory, name: str, ref: BundleRef) -> dict[str, str]:
    """Prove the drill key opens the off-site copy; the values come back registered."""
    plain = decrypt_bundle_raw(inv, name, ref)
    try:
        return parse_env_bytes(plain, f"bundle {ref.id}")
    except ConfigError as exc:
        raise OperationFailed("decrypt", exc.message) from None


def decrypt_bundle_raw(inv: Inventory, name: str, ref: BundleRef) -> bytes:
    """The env file exactly as it was read (comments, quoting), for restoring onto a host.

    The drill key's passphrase is proven first, before anything is downloaded: a wrong one
    is ``CredentialsRejected`` naming ``gpg.drill_passphrase_env`` (opsdrill's credential),
    so a later decryption failure can only mean the bundle is not encrypted to that key
    (``OperationFailed``: the bundle is wrong).
    """
    store_name, store, _, _ = _where(inv, name)
    with GpgHome() as home:
        _, drill, passphrase = import_drill_key(home, inv)
        if ref.data_key is None:
            raise OperationFailed("decrypt", f"bundle {ref.id}: the encrypted object is missing")
        manifest = read_manifest(inv, name, ref) if ref.manifest_key else None
        blob = _get(client(inv, store), store_name, store, ref.data_key)
        if manifest is not None:
            want = (manifest.object["size"], manifest.object["sha256"])
            if want != (len(blob), hashlib.sha256(blob).hexdigest()):
                raise OperationFailed(
                    "verify", f"bundle {ref.id}: object differs from its manifest"
                )
        packets = inspect(blob, home)
        if not packets.encrypted_data:  # gpg --decrypt passes unencrypted data through
            raise OperationFailed("verify", f"bundle {ref.id}: the object is not encrypted")
        try:
            plain = _decrypt(home, blob, passphrase)
        except OperationFailed as exc:
            to = ", ".join(manifest.object.get("recipients") or []) if manifest else ""
            raise OperationFailed(
                "decrypt",
                f"bundle {ref.id}: the drill key {', '.join(drill)} cannot decrypt it: it was "
                f"encrypted to {to or 'key ids ' + ', '.join(packets.recipient_key_ids)} and "
                f"the drill key is none of them ({exc.message.removeprefix('decrypt: ')}; fix: "
                "back it up again to the [gpg] recipients, or point "
                "gpg.drill_private_key_file at a recipient's key)",
            ) from None
    parse_env_bytes(plain, f"bundle {ref.id}")  # registers every value for redaction
    return plain


def compare_to_live(manifest: BundleManifest, live: dict[str, str], keys: list[str]) -> list[str]:
    """Problems, one sentence each, naming keys and short fingerprints only."""
    problems = []
    for key in keys:
        off = manifest.keys.get(key)
        if off is None and key not in live:
            problems.append(f"{key}: missing from the bundle and not set on the live host")
        elif off is None:
            problems.append(f"{key}: missing from the bundle")
        elif key not in live:
            problems.append(f"{key}: not set on the live host")
        elif (now := fingerprint(live[key], manifest.salt)) != off:
            problems.append(
                f"{key}: off-site {short(off)}… differs from live {short(now)}… "
                "(rotated and not backed up?)"
            )
    return problems


def differs_from_manifest(values: Mapping[str, str], manifest: BundleManifest) -> list[str]:
    """The keys a decrypted bundle does not hold as its manifest records them: those whose
    value has another fingerprint, else those on one side only (sorted; empty: a match)."""
    wrong = sorted(
        k for k, v in values.items() if fingerprint(v, manifest.salt) != manifest.keys.get(k)
    )
    return wrong or sorted(set(values) ^ set(manifest.keys))


def missing_required(present: Iterable[str], required: list[str]) -> list[str]:
    """The required key names absent from ``present``, in the order they were required."""
    have = set(present)
    return [key for key in required if key not in have]


def _where(inv: Inventory, name: str) -> tuple[str, Store, str, Gpg]:
    """The bundle's store, its key prefix (no empty segments) and the [gpg] section."""
    bundle = inv.bundle(name)
    if inv.model.gpg is None:
        raise ConfigError(f"{inv.path}: a secrets bundle needs a [gpg] section (fix: add it)")
    if not _NAME.match(name):  # it goes into object keys
        raise ConfigError(f"{inv.path}: secrets.{name}: use only letters, digits, '.', '_', '-'")
    store = inv.store(bundle.store)
    parts = [seg for part in (store.prefix, bundle.prefix, name) for seg in part.split("/") if seg]
    return bundle.store, store, "/".join(parts) + "/", inv.model.gpg


def _read_source(inv: Inventory, name: str) -> tuple[bytes, str, str]:
    """(raw env, source label, where for errors) from the bundle's env file or command."""
    bundle = inv.bundle(name)
    if bundle.env_file is not None:
        path = inv.resolve_path(bundle.env_file)
        return envfile.read_env_bytes(path, f"secrets.{name}.env_file"), "env_file", str(path)
    assert bundle.command is not None
    argv0 = bundle.command[0]
    out = envfile.run_env_command(
        bundle.command, bundle.command_timeout_seconds, f"secrets.{name}.command {argv0}"
    )
    return out, f"command: {argv0}", f"output of {argv0}"


def parse_env_bytes(raw: bytes, where: str) -> dict[str, str]:
    """Parsed as the application's dotenv reads it (opsdrill.config.envfile); every value is
    registered for redaction."""
    values = envfile.parse_env_bytes(raw, where)
    for value in values.values():
        register(value)
    return values


def _decrypt(home: GpgHome, blob: bytes, passphrase: str) -> bytes:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, passphrase.encode() + b"\n")  # far below the pipe buffer size
        os.close(write_fd)
        return _gpg_run(home.decrypt_argv(read_fd), blob, "decrypt", pass_fds=(read_fd,))
    finally:
        os.close(read_fd)


def _gpg_run(argv: list[str], data: bytes, stage: str, pass_fds: tuple[int, ...] = ()) -> bytes:
    """gpg directly rather than python-gnupg, which has no timeout."""
    try:
        proc = subprocess.run(
            argv, input=data, capture_output=True, timeout=GPG_TIMEOUT, pass_fds=pass_fds
        )
    except subprocess.TimeoutExpired:
        raise OperationFailed(stage, f"gpg did not finish within {GPG_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        reason = lines[-1].removeprefix("gpg: ")[:200] if lines else "no message"
        raise OperationFailed(stage, f"gpg exited with code {proc.returncode}: {reason}")
    return proc.stdout


def _put(s3: Minio, store_name: str, store: Store, key: str, body: bytes, stage: str) -> None:
    """A store that cannot take the object is the store's ``unreachable`` error (exit 2),
    naming what was being done; nothing is a bundle until its manifest is stored."""
    kind = "application/json" if key.endswith(MANIFEST_SUFFIX) else "application/octet-stream"
    try:  # create-only, like a backup's objects: no run overwrites another's bundle
        uploads.put_new(s3, store.bucket, key, body, kind)
    except S3_ERRORS as exc:
        err = unreachable(store_name, store, exc)
        raise type(err)(f"{stage} {key}: {err.message}") from None


def _get(s3: Minio, store_name: str, store: Store, key: str) -> bytes:
    try:
        response = s3.get_object(store.bucket, key)
        try:
            raw = response.read(MAX_OBJECT + 1)
        finally:
            response.close()
            response.release_conn()
    except S3_ERRORS as exc:
        raise unreachable(store_name, store, exc) from None
    if len(raw) > MAX_OBJECT:
        raise OperationFailed("download", f"{key}: larger than {MAX_OBJECT} bytes: not a bundle")
    return bytes(raw)
