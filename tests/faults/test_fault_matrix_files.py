"""Every files-mirror and secrets-bundle check can fail: sabotage, run the real checks,
assert the named check FAILS with a message naming the problem."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from minio.commonconfig import ENABLED
from minio.versioningconfig import SUSPENDED, VersioningConfig

from opsdrill.files.mirror import run_mirror
from opsdrill.secrets.bundle import backup_bundle
from tests.conftest import Env, Stack, derive
from tests.helpers.registry import proves

FILE_CHECKS = [
    "files.mirror.parity",
    "files.mirror.lag",
    "files.mirror.delete_protection",
    "files.mirror.overwrite_protection",
]
SECRET_CHECKS = [
    "secrets.bundle.freshness",
    "secrets.bundle.decrypts",
    "secrets.bundle.encryption_key",
    "secrets.bundle.required_keys",
]


def mirrored(stack: Stack, tmp_path: Path, files: int = 12) -> Env:
    env = derive(stack, tmp_path, own_files=files)
    summary = run_mirror(env.inv, "files")
    assert summary.ok and summary.copied == files, summary.line()
    return env


def test_healthy_mirror_and_bundle_pass_every_check(stack: Stack, tmp_path: Path) -> None:
    env = mirrored(stack, tmp_path)
    backup_bundle(env.inv, "app")
    run = env.run_checks(
        "check_files_mirror.py", "check_files_protection.py", "check_secrets_bundle.py"
    )
    for check_id in FILE_CHECKS + SECRET_CHECKS:
        run.assert_passes(check_id)
    assert "mirror:files" in run.output or run.returncode == 0


@proves(failed=["files.mirror.parity"])
def test_live_file_missing_off_site_fails_parity(stack: Stack, tmp_path: Path) -> None:
    env = mirrored(stack, tmp_path)
    s3, st = env.store("offsite-files")
    s3.remove_object(st.bucket, st.prefix + "docs/file-003.txt")
    run = env.run_checks("check_files_mirror.py")
    run.assert_fails("files.mirror.parity", "mirror:files", "1 missing", "docs/file-003.txt")


@proves(failed=["files.mirror.parity"])
def test_off_site_file_with_different_bytes_fails_parity(stack: Stack, tmp_path: Path) -> None:
    env = mirrored(stack, tmp_path)
    env.put("offsite-files", "docs/file-005.txt", b"silently corrupted off-site copy\n")
    run = env.run_checks("check_files_mirror.py")
    run.assert_fails("files.mirror.parity", "1 differing", "docs/file-005.txt")


@proves(failed=["files.mirror.lag"])
def test_unmirrored_file_older_than_rpo_fails_lag(stack: Stack, tmp_path: Path) -> None:
    env = mirrored(stack, tmp_path)
    env.put("live-files", "docs/new-upload.txt", b"uploaded after the last mirror run\n")
    env.rewrite(lambda d: d["mirrors"]["files"].update(rpo_minutes=0.0001))
    run = env.run_checks("check_files_mirror.py")
    run.assert_fails("files.mirror.lag", "1 not mirrored", "docs/new-upload.txt")


@proves(failed=["files.mirror.delete_protection"])
def test_mirror_that_propagates_deletes_fails_delete_protection(
    stack: Stack, tmp_path: Path
) -> None:
    env = mirrored(stack, tmp_path)
    env.rewrite(lambda d: d["mirrors"]["files"].update(delete_mode="propagate"))
    run = env.run_checks("check_files_protection.py")
    run.assert_fails(
        "files.mirror.delete_protection",
        "to survive its deletion on live",
        "delete_mode = 'propagate'",
    )
    run.assert_passes("files.mirror.overwrite_protection")


@proves(failed=["files.mirror.overwrite_protection"])
def test_target_without_versioning_fails_overwrite_protection(stack: Stack, tmp_path: Path) -> None:
    env = mirrored(stack, tmp_path)
    s3, st = env.store("offsite-files")
    s3.set_bucket_versioning(st.bucket, VersioningConfig(SUSPENDED))
    try:
        run = env.run_checks("check_files_protection.py")
    finally:
        s3.set_bucket_versioning(st.bucket, VersioningConfig(ENABLED))
    run.assert_fails(
        "files.mirror.overwrite_protection", "previous content", "destroys the last good copy"
    )


# Keys with "." and ".." segments (legal in S3, written by some upload code), next to the
# keys a normalising client would hit instead ("a/./b.txt" -> "a/b.txt").
DOT_KEYS = {
    "a/./b.txt": b"dot segment",
    "a/b.txt": b"the neighbour of a/./b.txt",
    "a/../c.txt": b"dot-dot segment",
    "c.txt": b"the neighbour of a/../c.txt",
    "./x": b"leading dot",
    "d/..": b"trailing dot-dot",
}


def boto(env: Env, store: str) -> tuple[Any, str, str]:
    """An independent S3 client (boto3) on ``store``, with its bucket and prefix."""
    import boto3
    from botocore.config import Config

    cfg = env.data["stores"][store]
    secrets_ = env.stack.secrets
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://{cfg['endpoint']}",
        aws_access_key_id=secrets_[cfg["access_key_env"]],
        aws_secret_access_key=secrets_[cfg["secret_key_env"]],
        region_name=cfg.get("region", "us-east-1"),
        config=Config(s3={"addressing_style": "path"}),
    )
    return s3, cfg["bucket"], cfg["prefix"].strip("/") + "/"


def mirrored_with_dot_keys(stack: Stack, tmp_path: Path) -> Env:
    env = derive(stack, tmp_path, own_files=2)
    live, bucket, prefix = boto(env, "live-files")
    for rel, body in DOT_KEYS.items():
        live.put_object(Bucket=bucket, Key=prefix + rel, Body=body)
    summary = run_mirror(env.inv, "files")
    assert summary.errors == [] and summary.copied == 2 + len(DOT_KEYS), summary.errors
    return env


def test_keys_with_dot_segments_are_off_site_and_pass_parity(stack: Stack, tmp_path: Path) -> None:
    env = mirrored_with_dot_keys(stack, tmp_path)
    run = env.run_checks("check_files_mirror.py")
    run.assert_outcome("files.mirror.parity", "passed", exit_code=0)
    run.assert_passes("files.mirror.lag")


@proves(failed=["files.mirror.parity"])
def test_a_dot_segment_key_missing_off_site_fails_parity_naming_it(
    stack: Stack, tmp_path: Path
) -> None:
    env = mirrored_with_dot_keys(stack, tmp_path)
    offsite, bucket, prefix = boto(env, "offsite-files")
    offsite.delete_object(Bucket=bucket, Key=prefix + "a/../c.txt")
    run = env.run_checks("check_files_mirror.py")
    msg = run.assert_fails("files.mirror.parity", "1 missing", "'a/../c.txt'")
    assert "'c.txt'" not in msg and "0 differing" in msg, msg


@proves(failed=["secrets.bundle.freshness"])
def test_stale_bundle_fails_freshness(env: Env) -> None:
    backup_bundle(env.inv, "app", now=datetime.now(UTC) - timedelta(days=3))
    run = env.run_checks("check_secrets_bundle.py")
    run.assert_fails("secrets.bundle.freshness", "secrets:app", "younger than 1440 min")


@proves(failed=["secrets.bundle.encryption_key"])
def test_rotated_encryption_key_fails_loudly(env: Env) -> None:
    backup_bundle(env.inv, "app")
    app_env = Path(env.data["secrets"]["app"]["env_file"])
    rotated = base64.b64encode(secrets.token_bytes(32)).decode()
    lines = [
        f"ENCRYPTION_KEY={rotated}" if line.startswith("ENCRYPTION_KEY=") else line
        for line in app_env.read_text().splitlines()
    ]
    app_env.write_text("\n".join(lines) + "\n")
    run = env.run_checks("check_secrets_bundle.py")
    msg = run.assert_fails("secrets.bundle.encryption_key", "ENCRYPTION_KEY", "differs")
    assert rotated not in msg and rotated not in run.output


@proves(failed=["secrets.bundle.decrypts"])
def test_bundle_encrypted_to_wrong_key_fails_decrypts(env: Env, tmp_path: Path) -> None:
    with env.encrypting_to_another_key(tmp_path) as other:
        backup_bundle(env.inv, "app")
    run = env.run_checks("check_secrets_bundle.py")
    run.assert_fails("secrets.bundle.decrypts", "decrypt", other.fingerprint)


@proves(failed=["secrets.bundle.required_keys"])
def test_missing_required_key_fails(env: Env) -> None:
    env.rewrite(
        lambda d: d["secrets"]["app"].update(
            required_keys=["ENCRYPTION_KEY", "DATABASE_URL", "S3_SECRET_KEY"]
        )
    )
    backup_bundle(env.inv, "app")
    run = env.run_checks("check_secrets_bundle.py")
    run.assert_fails("secrets.bundle.required_keys", "missing ['S3_SECRET_KEY']")


@proves(broken=["secrets.bundle.encryption_key"])
def test_unreadable_live_env_is_broken(env: Env) -> None:
    backup_bundle(env.inv, "app")

    def use_failing_command(d: dict[str, Any]) -> None:
        del d["secrets"]["app"]["env_file"]
        d["secrets"]["app"]["command"] = ["false"]

    env.rewrite(use_failing_command)
    run = env.run_checks("check_secrets_bundle.py")
    assert run.status("secrets.bundle.encryption_key") == "broken"
    assert "false" in run.message("secrets.bundle.encryption_key")


def _dead_endpoint(env: Env, store: str) -> int:
    from opsdrill_stack.procs import free_port

    port = free_port()
    env.rewrite(
        lambda d: d["stores"][store].update(endpoint=f"127.0.0.1:{port}", timeout_seconds=2.0)
    )
    return port


@proves(broken=FILE_CHECKS)
def test_an_off_site_store_that_does_not_answer_breaks_every_mirror_check(
    stack: Stack, tmp_path: Path
) -> None:
    env = mirrored(stack, tmp_path, files=3)
    port = _dead_endpoint(env, "offsite-files")
    run = env.run_checks("check_files_mirror.py", "check_files_protection.py")
    for check_id in FILE_CHECKS:
        run.assert_outcome(check_id, "broken", exit_code=2)
        msg = run.message(check_id)
        assert f"store offsite-files (http://127.0.0.1:{port}/" in msg, msg
        assert "fix: check stores.offsite-files.endpoint" in msg, msg


@proves(broken=SECRET_CHECKS)
def test_a_bundle_store_that_does_not_answer_breaks_every_bundle_check(env: Env) -> None:
    backup_bundle(env.inv, "app")
    store = env.data["secrets"]["app"]["store"]
    port = _dead_endpoint(env, store)
    run = env.run_checks("check_secrets_bundle.py")
    for check_id in SECRET_CHECKS:
        run.assert_outcome(check_id, "broken", exit_code=2)
        assert f"store {store} (http://127.0.0.1:{port}/" in run.message(check_id)


def test_a_bundle_check_with_nothing_to_look_for_skips_instead_of_passing(env: Env) -> None:
    env.rewrite(lambda d: d["secrets"]["app"].update(required_keys=[], fingerprint_keys=[]))
    backup_bundle(env.inv, "app")
    run = env.run_checks("check_secrets_bundle.py")
    for check_id, key in (
        ("secrets.bundle.required_keys", "required_keys"),
        ("secrets.bundle.encryption_key", "fingerprint_keys"),
    ):
        run.assert_outcome(check_id, "skipped", exit_code=0)
        assert f"secrets.app.{key} is empty in the inventory" in run.message(check_id)
