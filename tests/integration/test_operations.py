"""Operations fail loud and leave nothing that looks like a good backup."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opsdrill.backups.backup import run_backup
from opsdrill.errors import OperationFailed, TargetUnreachable
from tests.conftest import ROOT, Env, Stack, derive, opsdrill
from tests.helpers.faults import CuttingProxy, failing_gpg_dir


def object_keys(env: Env) -> list[str]:
    s3, store = env.s3()
    prefix = env.data["stores"]["offsite"]["prefix"]
    return [o.object_name for o in s3.list_objects(store.bucket, prefix=prefix, recursive=True)]


def test_backup_then_list_restore_drill_and_prune_via_cli(env: Env) -> None:
    inv = str(env.path)
    first = opsdrill("backup", "-i", inv)
    assert first.returncode == 0, first.stderr
    assert "backup crm-" in first.stdout and "rows in" in first.stdout
    listed = opsdrill("list", "-i", inv)
    assert "complete" in listed.stdout
    drill = opsdrill("restore", "-i", inv, "-d", "crm", "--drill")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "manifest match: exact" in drill.stdout
    pruned = opsdrill("prune", "-i", inv, "--dry-run")
    assert pruned.returncode == 0 and pruned.stdout.startswith("keep")
    assert len(object_keys(env)) == 2  # data + manifest


def test_gpg_failure_mid_stream_leaves_no_object(env: Env, tmp_path: Path) -> None:
    real = shutil.which("gpg")
    assert real
    bindir = failing_gpg_dir(tmp_path, real)
    child_env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = opsdrill("backup", "-i", str(env.path), env=child_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "encrypt (gpg)" in proc.stderr and "simulated failure" in proc.stderr
    assert object_keys(env) == []


def test_bad_database_password_exits_nonzero_with_no_object(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSDRILL_WRONG_PW", "definitely-not-the-password")
    env.rewrite(lambda d: d["databases"]["crm"].update(password_env="OPSDRILL_WRONG_PW"))
    proc = opsdrill("backup", "-i", str(env.path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "database crm" in proc.stderr and "password authentication failed" in proc.stderr
    assert "definitely-not-the-password" not in proc.stderr + proc.stdout
    assert object_keys(env) == []


def test_pg_dump_failure_names_the_stage(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import opsdrill.backups.backup as backup_mod

    real_stage = backup_mod.Stage

    def sabotaged(name: str, argv: list[str], **kw: object) -> object:
        if name == "pg_dump":
            argv = [*argv, "--table=no_such_table_anywhere", "--strict-names"]
        return real_stage(name, argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(backup_mod, "Stage", sabotaged)
    with pytest.raises(OperationFailed) as info:
        run_backup(env.inv, "crm")
    assert info.value.stage == "pg_dump"
    assert "no matching tables" in info.value.message
    assert object_keys(env) == []


def test_dropped_s3_connection_leaves_no_object(env: Env) -> None:
    port = int(env.data["stores"]["offsite"]["endpoint"].rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_after=100_000)
    try:
        env.rewrite(
            lambda d: d["stores"]["offsite"].update(
                endpoint=f"127.0.0.1:{proxy.port}", timeout_seconds=5.0
            )
        )
        with pytest.raises(TargetUnreachable) as info:  # the store's fault: exit 2
            run_backup(env.inv, "crm")
        assert "upload of" in info.value.message
        assert "stores.offsite.endpoint" in info.value.message
    finally:
        proxy.close()
    env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint=f"127.0.0.1:{port}"))
    assert object_keys(env) == []


def restore_into_sandbox(
    env: Env, *extra: str, stdin: str | None = None, tty_input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """A production-style restore whose target server is the stack's sandbox."""
    sandbox = env.data["databases"]["crm"]["sandbox"]
    args = [
        "restore",
        "-i",
        str(env.path),
        "-d",
        "crm",
        "--into",
        sandbox["dsn"],
        "--into-password-env",
        sandbox["password_env"],
        "--no-owner",
        *extra,
    ]
    child_env = {**os.environ, **env.stack.secrets}
    if tty_input is None:
        return opsdrill(*args, env=child_env, stdin=stdin)
    return run_on_tty(args, child_env, tty_input)


def run_on_tty(
    args: list[str], env: dict[str, str], typed: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a pseudo-terminal as stdin, typing ``typed`` at its prompt."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsdrill", *args],
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(master, typed.encode() + b"\n")
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(master)
        os.close(slave)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_production_restore_refuses_without_a_terminal(env: Env) -> None:
    env.backup()
    proc = restore_into_sandbox(env, stdin="")
    assert proc.returncode == 2
    assert "refusing a production restore without a terminal" in proc.stderr


def test_production_restore_asks_for_the_database_name(env: Env) -> None:
    env.backup()
    wrong = restore_into_sandbox(env, "--new-name", "crm_never_created", tty_input="prod")
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr  # refused, not a failed restore
    assert "Not confirmed" in wrong.stderr and "nothing was changed" in wrong.stderr
    right = restore_into_sandbox(env, "--new-name", "crm_restored_tty", tty_input="crm")
    assert right.returncode == 0, right.stdout + right.stderr
    assert "Type the database name (crm)" in right.stdout


def test_production_restore_into_new_database_verifies_and_keeps_old(env: Env) -> None:
    env.backup()
    proc = restore_into_sandbox(env, "--confirm", "crm", "--new-name", "crm_restored_test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "match the manifest exactly" in proc.stdout
    # the sandbox has no "crm": only the rename that applies is suggested
    assert "There is no database 'crm' on" in proc.stdout
    assert "RENAME TO crm_old" not in proc.stdout
    again = restore_into_sandbox(env, "--confirm", "crm", "--new-name", "crm_restored_test")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "never writes into an existing database" in again.stderr
    wrong = restore_into_sandbox(env, "--confirm", "prod")
    assert wrong.returncode == 2 and "does not match --database" in wrong.stderr
    assert "nothing was changed" in wrong.stderr


def test_help_documents_every_command() -> None:
    top = opsdrill("--help")
    for command in ("inventory", "stack", "backup", "list", "prune", "restore"):
        assert command in top.stdout
        sub = opsdrill(command, "--help")
        assert sub.returncode == 0 and "usage: opsdrill" in sub.stdout
    assert "Exit codes" in top.stdout


@pytest.mark.parametrize(("compression", "encrypt"), [("gzip", True), ("zstd", False)])
def test_other_formats_back_up_and_drill(env: Env, compression: str, encrypt: bool) -> None:
    env.rewrite(lambda d: d["databases"]["crm"].update(compression=compression, encrypt=encrypt))
    manifest = env.backup()
    assert manifest.object["compression"] == compression
    assert manifest.object["encrypted"] is encrypt
    suffix = {"gzip": ".gz", "zstd": ".zst"}[compression] + (".gpg" if encrypt else "")
    assert manifest.object["key"].endswith(".dump" + suffix)
    drill = opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "manifest match: exact" in drill.stdout


def test_stack_up_status_down_via_cli() -> None:
    import json
    import tempfile

    from opsdrill_stack.procs import pid_alive

    base = Path(tempfile.mkdtemp(prefix="opsdrill-cli-stack-"))
    try:
        up = opsdrill("stack", "up", "--dir", str(base))
        assert up.returncode == 0, up.stderr
        assert (base / "inventory.toml").is_file()
        assert (base / "secrets.env").stat().st_mode & 0o077 == 0
        status = opsdrill("stack", "status", "--dir", str(base))
        assert status.returncode == 0 and "pg_live: running" in status.stdout
        check = opsdrill("inventory", "check", str(base / "inventory.toml"))
        assert check.returncode == 0, check.stderr
        pids = [
            c["pid"] for c in json.loads((base / "stack.json").read_text())["components"].values()
        ]
    finally:
        down = opsdrill("stack", "down", "--dir", str(base))
    assert down.returncode == 0, down.stderr
    assert not base.exists()
    assert not [pid for pid in pids if pid_alive(pid)]
    assert opsdrill("stack", "status", "--dir", str(base)).returncode == 1


def test_inventory_check_proves_the_drill_key_decrypts(env: Env, tmp_path: Path) -> None:
    ok = opsdrill("inventory", "check", str(env.path))
    assert ok.returncode == 0 and "OK for all" in ok.stdout, ok.stderr
    passphrase_env = env.data["gpg"]["drill_passphrase_env"]
    recipients = list(env.data["gpg"]["recipients"])
    env.rewrite(lambda d: d["gpg"].update(drill_passphrase_env="LEAKTEST_WRONG_PASS"))
    bad = opsdrill(
        "inventory",
        "check",
        str(env.path),
        env={**os.environ, "LEAKTEST_WRONG_PASS": "not-the-passphrase"},
    )
    assert bad.returncode == 2
    assert "did not accept opsdrill's passphrase" in bad.stderr
    assert "gpg.drill_passphrase_env = LEAKTEST_WRONG_PASS" in bad.stderr
    assert "not-the-passphrase" not in bad.stderr
    from opsdrill_stack.gnupg_keys import generate_keypair

    env.rewrite(lambda d: d["gpg"].update(drill_passphrase_env=passphrase_env))
    keypair = generate_keypair(tmp_path / "k", "other", "pw-other-1234")
    env.rewrite(
        lambda d: d["gpg"].update(
            recipients=[keypair.fingerprint], public_keys_file=str(keypair.public_file)
        )
    )
    foreign = opsdrill("inventory", "check", str(env.path))
    assert foreign.returncode == 2, foreign.stdout + foreign.stderr
    assert "cannot decrypt backups encrypted to" in foreign.stderr
    assert "is none of them" in foreign.stderr
    other = keypair.public_file
    env.rewrite(lambda d: d["gpg"].update(public_keys_file=str(other), recipients=recipients))
    missing = opsdrill("inventory", "check", str(env.path), "--for", "backup")
    assert missing.returncode == 2 and "is not in gpg.public_keys_file" in missing.stderr


def test_wrong_drill_passphrase_is_explained(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.backup()
    monkeypatch.setenv("LEAKTEST_WRONG_PASS", "not-the-passphrase")
    env.rewrite(lambda d: d["gpg"].update(drill_passphrase_env="LEAKTEST_WRONG_PASS"))
    proc = opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill")
    # opsdrill's own credential, not a fault of the backup: exit 2, naming what to fix
    assert proc.returncode == 2, proc.stderr
    assert "did not accept opsdrill's passphrase" in proc.stderr
    assert "gpg.drill_passphrase_env = LEAKTEST_WRONG_PASS, set in the environment" in proc.stderr
    assert "not-the-passphrase" not in proc.stdout + proc.stderr


def test_failed_production_restore_drops_its_partial_database(env: Env) -> None:
    env.backup()
    ref = env.refs()[-1]
    s3, store = env.s3()
    resp = s3.get_object(store.bucket, ref.data_key)
    body = resp.read()
    resp.close()
    resp.release_conn()
    import io

    s3.put_object(store.bucket, ref.data_key, io.BytesIO(body[:-100]), len(body) - 100)
    proc = restore_into_sandbox(env, "--confirm", "crm", "--new-name", "crm_partial")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "verify: object is" in proc.stderr and "truncated" in proc.stderr
    assert "partial database 'crm_partial' was dropped" in proc.stderr
    again = restore_into_sandbox(env, "--confirm", "crm", "--new-name", "crm_partial")
    assert "already exists" not in again.stderr


def test_drill_works_while_live_is_down(env: Env) -> None:
    from opsdrill_stack.procs import free_port

    env.backup()
    env.rewrite(
        lambda d: d["databases"]["crm"].update(
            dsn=f"postgresql://opsdrill@127.0.0.1:{free_port()}/crm"
        )
    )
    proc = opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "manifest match: exact" in proc.stdout
    assert "unreachable: drift not compared" in proc.stdout


def test_unreachable_store_exits_2_for_list(env: Env) -> None:
    from opsdrill_stack.procs import free_port

    env.rewrite(
        lambda d: d["stores"]["offsite"].update(
            endpoint=f"127.0.0.1:{free_port()}", timeout_seconds=2.0
        )
    )
    proc = opsdrill("list", "-i", str(env.path))
    assert proc.returncode == 2, proc.stderr
    assert "store offsite (" in proc.stderr and "unreachable: connection refused" in proc.stderr
    assert "stores.offsite.endpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_mirror_and_restore_files_via_cli(stack: Stack, tmp_path: Path) -> None:
    env = derive(stack, tmp_path, own_files=5)
    inv = str(env.path)
    first = opsdrill("mirror", "-i", inv)
    assert first.returncode == 0, first.stderr
    assert "examined 5, copied 5" in first.stdout
    again = opsdrill("mirror", "-i", inv)
    assert "copied 0" in again.stdout and "skipped 5" in again.stdout
    restored = opsdrill("mirror-restore", "-i", inv, "-m", "files", "--to-store", "restored-files")
    assert restored.returncode == 0, restored.stderr
    s3, st = env.store("restored-files")
    keys = sorted(
        o.object_name for o in s3.list_objects(st.bucket, prefix=st.prefix, recursive=True)
    )
    assert keys == [f"{st.prefix}docs/file-{i:03d}.txt" for i in range(5)]
    refused = opsdrill("mirror-restore", "-i", inv, "-m", "files", "--to-store", "restored-files")
    assert refused.returncode == 2 and "already holds objects" in refused.stderr


def test_secrets_backup_and_restore_onto_a_host_via_cli(env: Env, tmp_path: Path) -> None:
    inv = str(env.path)
    backed = opsdrill("secrets", "backup", "-i", inv)
    assert backed.returncode == 0, backed.stderr
    assert "ENCRYPTION_KEY sha256:" in backed.stdout
    target = tmp_path / "restored.env"
    restored = opsdrill("secrets", "restore", "-i", inv, "-b", "app", "--to", str(target))
    assert restored.returncode == 0, restored.stderr
    assert target.read_text() == Path(env.data["secrets"]["app"]["env_file"]).read_text()
    assert target.stat().st_mode & 0o777 == 0o600
    again = opsdrill("secrets", "restore", "-i", inv, "-b", "app", "--to", str(target))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
