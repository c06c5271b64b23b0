"""Inventory validation: every problem at once, naming the file, the key and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opsdrill.errors import ConfigError
from opsdrill.inventory import load
from tests.conftest import opsdrill

GOOD = """
name = "prod"
environment = "production"

[stores.offsite]
endpoint = "minio.example.net:9000"
bucket = "crm-backups"
prefix = "pg"
access_key_env = "T_S3_ACCESS"
secret_key_env = "T_S3_SECRET"

[gpg]
recipients = ["0123456789ABCDEF0123456789ABCDEF01234567"]
public_keys_file = "keys.asc"

[databases.crm]
dsn = "postgresql://backup@db.internal:5432/crm"
password_env = "T_DB_PASSWORD"
rpo_minutes = 60
"""
ENV = {
    "T_S3_ACCESS": "access-key-1",
    "T_S3_SECRET": "secret-key-1",
    "T_DB_PASSWORD": "db-password-1",
}


def write(tmp_path: Path, text: str, keys: bool = True) -> Path:
    if keys:
        (tmp_path / "keys.asc").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


def error_of(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, environ=ENV if environ is None else environ)
    return info.value.message


def test_good_inventory_loads_and_resolves_secrets(tmp_path: Path) -> None:
    inv = load(write(tmp_path, GOOD), environ=ENV)
    assert inv.name == "prod"
    assert inv.database("crm").rpo_minutes == 60
    assert inv.secret("T_DB_PASSWORD") == "db-password-1"
    assert "db-password-1" not in repr(inv)
    assert inv.store_for("crm")[0] == "offsite"


def test_unknown_key_is_named_with_fix(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("rpo_minutes = 60", "rpo_minuts = 60"))
    msg = error_of(path)
    assert f"{path}: databases.crm.rpo_minuts: unknown key" in msg
    assert "fix: remove it or check its spelling" in msg


def test_wrong_type_is_named(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD.replace("rpo_minutes = 60", 'rpo_minutes = "hourly"')))
    assert "databases.crm.rpo_minutes" in msg and "'hourly'" in msg


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("rpo_minutes = 60", "rpo_minutes = -1\nbogus = 1").replace(
        'bucket = "crm-backups"', 'bucket = "x"'
    )
    msg = error_of(write(tmp_path, text))
    assert "rpo_minutes" in msg and "bogus" in msg and "stores.offsite.bucket" in msg
    assert len(msg.splitlines()) == 3


def test_missing_env_var_names_variable_and_fix(tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "T_DB_PASSWORD"}
    msg = error_of(write(tmp_path, GOOD), env)
    assert "databases.crm.password_env: environment variable T_DB_PASSWORD is not set" in msg
    assert "fix: export T_DB_PASSWORD=" in msg


def test_password_inside_dsn_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    text = GOOD.replace("postgresql://backup@", "postgresql://backup:hunter2hunter2@")
    msg = error_of(write(tmp_path, text))
    assert "databases.crm.dsn: contains a password" in msg
    assert "hunter2hunter2" not in msg


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "\n[databases.crm\n")
    msg = error_of(path)
    assert str(path) in msg and "not valid TOML" in msg


def test_missing_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope.toml")
    assert "inventory file not found" in msg


def test_bad_fingerprint_and_scheme_in_endpoint(tmp_path: Path) -> None:
    text = GOOD.replace("0123456789ABCDEF0123456789ABCDEF01234567", "DEADBEEF").replace(
        '"minio.example.net:9000"', '"https://minio.example.net:9000"'
    )
    msg = error_of(write(tmp_path, text))
    assert "gpg.recipients" in msg and "not a full OpenPGP fingerprint" in msg
    assert "stores.offsite.endpoint" in msg and "without a scheme" in msg


def test_encryption_without_gpg_section_is_an_error(tmp_path: Path) -> None:
    text = GOOD.split("[gpg]")[0] + GOOD.split('public_keys_file = "keys.asc"')[1]
    msg = error_of(write(tmp_path, text))
    assert "encrypt = true needs a [gpg] section" in msg


def test_unknown_store_reference(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD + 'store = "elsewhere"\n'))
    assert "databases.crm.store: no store 'elsewhere'" in msg


def test_missing_key_file(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD, keys=False))
    assert "gpg.public_keys_file: file" in msg and "not found" in msg


def test_env_file_supplies_missing_variables(tmp_path: Path) -> None:
    (tmp_path / "secrets.env").write_text(
        "# comment\nexport T_DB_PASSWORD='from-file-pw'\nT_S3_ACCESS=a-key\nT_S3_SECRET=s-key\n"
    )
    inv = load(write(tmp_path, 'env_file = "secrets.env"\n' + GOOD), environ={})
    assert inv.secret("T_DB_PASSWORD") == "from-file-pw"
    # the environment wins over the file
    inv = load(tmp_path / "inventory.toml", environ={"T_DB_PASSWORD": "from-env-pw"})
    assert inv.secret("T_DB_PASSWORD") == "from-env-pw"


def test_cli_inventory_check_exit_codes(tmp_path: Path) -> None:
    from opsdrill.stack.gnupg_keys import generate_keypair

    key = generate_keypair(tmp_path / "k", "backup", "passphrase-1234")
    path = write(
        tmp_path,
        GOOD.replace("0123456789ABCDEF0123456789ABCDEF01234567", key.fingerprint).replace(
            '"keys.asc"', f'"{key.public_file}"'
        ),
    )
    env = {**os.environ, **ENV}
    ok = opsdrill("inventory", "check", str(path), env=env)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = write(tmp_path, path.read_text().replace("rpo_minutes", "rpo"))
    proc = opsdrill("inventory", "check", str(bad), env=env)
    assert proc.returncode == 2
    assert "databases.crm.rpo: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_retention_daily_must_cover_hourly(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD + "\n[retention]\nhourly_days = 7\ndaily_days = 3\n"))
    assert "retention" in msg and "daily_days (3) must be at least hourly_days (7)" in msg


def test_backup_scope_needs_no_drill_secrets(tmp_path: Path) -> None:
    text = (
        GOOD.replace(
            'public_keys_file = "keys.asc"',
            'public_keys_file = "keys.asc"\ndrill_private_key_file = "drill.asc"\n'
            'drill_passphrase_env = "T_GPG_PASS"',
        )
        + '\n[databases.crm.sandbox]\ndsn = "postgresql://x@sandbox/postgres"\n'
        'password_env = "T_SANDBOX_PW"\n'
    )
    path = write(tmp_path, text)
    inv = load(path, environ=ENV, scope="backup")  # a backup host holds no drill key
    assert inv.database("crm").sandbox is not None
    msg = error_of(path)
    assert "T_GPG_PASS is not set" in msg and "T_SANDBOX_PW is not set" in msg
    assert "gpg.drill_private_key_file: file" in msg
    env = {k: v for k, v in ENV.items() if k != "T_DB_PASSWORD"}
    assert load(path, environ=env, scope="store").name == "prod"  # list/prune: S3 only


def test_empty_key_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    (tmp_path / "keys.asc").write_text("")
    assert "gpg.public_keys_file: file" in error_of(path) and "is empty" in error_of(path)


def test_documented_example_inventory_is_valid() -> None:
    """docs/inventory.example.toml must stay in step with the schema."""
    import tomllib

    from opsdrill.inventory import InventoryModel

    root = Path(__file__).resolve().parent.parent
    model = InventoryModel.model_validate(
        tomllib.loads((root / "docs" / "inventory.example.toml").read_text())
    )
    assert {"crm"} == set(model.databases) and {"files"} == set(model.mirrors)
    assert {"app"} == set(model.secrets)
