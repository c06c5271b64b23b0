""".env files: one reader for every one opsdrill reads, with python-dotenv's semantics.

The inventory's ``env_file``, the application's .env the secrets bundle backs up and the
one the EMAIL_REDIRECT_TO check reads must all give the values the application's own
dotenv gives, byte for byte the same file; a malformed line is named by its number only
(it may hold a secret), non-UTF-8 bytes by their offset; an env file others can read is
warned about.
"""

from __future__ import annotations

import io
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from dotenv import dotenv_values
from dotenv.parser import parse_stream

from opsdrill.config.envfile import read_env_file
from opsdrill.config.inventory import load
from opsdrill.errors import ConfigError
from opsdrill.mail.appenv import read_app_env
from opsdrill.secrets.bundle import read_live_env
from tests.conftest import opsdrill, run_checks

# What the inventory below needs from its env_file, after each fixture's own lines.
CREDS = b"T_S3_ACCESS=a-key-1\nT_S3_SECRET=s-key-1\n"
INVENTORY = """
env_file = "{env_file}"

[stores.offsite]
endpoint = "minio.example.net:9000"
bucket = "crm-backups"
access_key_env = "T_S3_ACCESS"
secret_key_env = "T_S3_SECRET"

[gpg]
recipients = ["0123456789ABCDEF0123456789ABCDEF01234567"]
public_keys_file = "keys.asc"

[secrets.app]
env_file = "{env_file}"
store = "offsite"

[app_environment.crm]
env_file = "{env_file}"
"""

# Each shape a real .env takes that a hand-written KEY=VALUE split reads wrongly.
SHAPES: dict[str, bytes] = {
    "byte-order mark": b"\xef\xbb\xbfENCRYPTION_KEY=k-bom-1\nOTHER=x\n",
    "export and a tab": b"export\tENCRYPTION_KEY=k-tab-1\nexport  TWO=2\n",
    "inline comment": b"ENCRYPTION_KEY=k-comment-1 # rotated 2024-05\nHASH=a#b\nE= # none\n",
    "quotes with escapes": (
        b"ENCRYPTION_KEY=\"k\\\"q\\\\1\"\nSINGLE='it\\'s'\nNEWLINE=\"a\\nb\"\nRAW='a\\nb'\n"
    ),
    "multi-line quoted value": b'ENCRYPTION_KEY="-----BEGIN-----\nabc\n-----END-----"\nAFTER=1\n',
    "CRLF line ends": b"ENCRYPTION_KEY=k-crlf-1\r\nB=2\r\n",
    "spaces around": b"  ENCRYPTION_KEY = k-spaced-1  \n\n# c\n   \nC='  kept  '\n",
    "dollar signs stay literal": b'ENCRYPTION_KEY=pa${HOME}ss\nD="$USER-${X:-y}"\n',
    "a key without a value": b"ENCRYPTION_KEY=k-bare-1\nBARE\n",
    "no final newline": b"ENCRYPTION_KEY=k-last-1\nLAST=z",
}


def dotenv_reads(raw: bytes) -> dict[str, str]:
    """What python-dotenv itself makes of these bytes (a key without a value is not set,
    as load_dotenv treats it; no ${VAR} expansion: values are taken literally)."""
    values = dotenv_values(stream=io.StringIO(raw.decode("utf-8")), interpolate=False)
    return {k: v for k, v in values.items() if v is not None}


def write(tmp_path: Path, raw: bytes, mode: int = 0o600) -> Path:
    env_file = tmp_path / f"app-{uuid.uuid4().hex[:6]}.env"
    env_file.write_bytes(raw)
    env_file.chmod(mode)
    (tmp_path / "keys.asc").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(INVENTORY.format(env_file=env_file))
    inventory.chmod(0o600)
    return env_file


def readers(tmp_path: Path) -> dict[str, Callable[[Path], dict[str, str]]]:
    """Every way opsdrill reads an env file, each returning what it read."""
    inventory = tmp_path / "inventory.toml"

    def inventory_env_file(path: Path) -> dict[str, str]:
        inv = load(inventory, environ={})
        return {k: inv.env[k] for k in inv.from_env_file}

    return {
        "read_env_file": read_env_file,
        "inventory env_file": inventory_env_file,
        "secrets bundle": lambda path: read_live_env(load(inventory, environ={}), "app"),
        "app environment": lambda path: read_app_env(env_file=path),
    }


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_reader_reads_what_python_dotenv_reads(tmp_path: Path, shape: str) -> None:
    raw = SHAPES[shape] + b"\n" + CREDS
    want = dotenv_reads(raw)
    assert "ENCRYPTION_KEY" in want, want
    env_file = write(tmp_path, raw)
    for name, read in readers(tmp_path).items():
        assert read(env_file) == want, f"{name} reads {shape!r} differently from python-dotenv"


def test_a_malformed_line_is_named_by_its_number_never_shown(tmp_path: Path) -> None:
    secret = f"Tr0ub4dor&3-{uuid.uuid4().hex[:8]}"
    raw = b"A=1\n\n# note\n" + f"{secret} pasted here\n".encode() + b"B=2\n" + CREDS
    assert any(b.error for b in parse_stream(io.StringIO(raw.decode())))  # dotenv agrees
    env_file = write(tmp_path, raw)
    for name, read in readers(tmp_path).items():
        with pytest.raises(ConfigError) as err:
            read(env_file)
        assert f"{env_file}:4: expected KEY=VALUE" in err.value.message, (name, err.value)
        assert secret not in err.value.message and "pasted" not in err.value.message


def test_an_unterminated_quote_is_named_by_its_line(tmp_path: Path) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex[:8]}"
    env_file = write(tmp_path, CREDS + f'TOKEN="{secret}\nC=3\n'.encode())
    for name, read in readers(tmp_path).items():
        with pytest.raises(ConfigError) as err:
            read(env_file)
        assert f"{env_file}:3: expected KEY=VALUE" in err.value.message, (name, err.value)
        assert secret not in err.value.message


def test_non_utf8_names_the_file_and_byte_offset_without_crashing(tmp_path: Path) -> None:
    raw = CREDS + b"SECRET=caf\xe9-s3cret-value\n"
    offset = raw.index(b"\xe9")
    env_file = write(tmp_path, raw)
    for name, read in readers(tmp_path).items():
        with pytest.raises(ConfigError) as err:
            read(env_file)
        msg = err.value.message
        assert str(env_file) in msg and f"byte {offset}" in msg and "not UTF-8" in msg, name
        assert "s3cret" not in msg


def test_cli_reports_a_broken_env_file_without_a_traceback(tmp_path: Path) -> None:
    env_file = write(tmp_path, CREDS + b"SECRET=caf\xe9-s3cret-value\n")
    proc = opsdrill("inventory", "check", str(tmp_path / "inventory.toml"))
    assert proc.returncode == 2, proc.stderr
    assert f"{env_file}: not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout


# -- an env file holding secrets that others can read ----------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_every_reader_warns_when_others_can_read_it(tmp_path: Path, mode: int) -> None:
    exposed = write(tmp_path, b"ENCRYPTION_KEY=k-1\n" + CREDS, mode)
    private = tmp_path / "private.env"
    private.write_bytes(CREDS)
    private.chmod(0o600)
    inventory = tmp_path / "inventory.toml"
    text = INVENTORY.format(env_file=exposed)
    # the inventory's own env_file exposed, the application's private; then the reverse
    as_creds = text.replace(f'"{exposed}"', f'"{private}"').replace(
        f'env_file = "{private}"', f'env_file = "{exposed}"', 1
    )
    as_app = text.replace(f'env_file = "{exposed}"', f'env_file = "{private}"', 1)
    for name, inv_text, read in [
        ("inventory env_file", as_creds, lambda: load(inventory, environ={})),
        ("secrets bundle", as_app, lambda: read_live_env(load(inventory, environ={}), "app")),
        ("app environment", as_app, lambda: read_app_env(env_file=exposed)),
    ]:
        inventory.write_text(inv_text)
        with pytest.warns(UserWarning) as caught:
            read()
        shown = [str(w.message) for w in caught]
        assert any(str(exposed) in m and f"chmod 600 {exposed}" in m for m in shown), name
        assert not any(str(private) in m for m in shown), (name, shown)


def test_no_warning_for_a_private_env_file(tmp_path: Path) -> None:
    env_file = write(tmp_path, b"ENCRYPTION_KEY=k-1\n" + CREDS, 0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for read in readers(tmp_path).values():
            read(env_file)


def test_cli_and_check_run_warn_about_a_readable_env_file(tmp_path: Path) -> None:
    env_file = write(tmp_path, b"ENCRYPTION_KEY=k-1\n" + CREDS, 0o644)
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(INVENTORY.split("[gpg]")[0].format(env_file=env_file))
    env = {k: v for k, v in os.environ.items() if not k.startswith("T_")}
    proc = opsdrill("inventory", "check", str(inventory), env=env)
    assert proc.returncode == 0, proc.stderr
    assert str(env_file) in proc.stderr and f"chmod 600 {env_file}" in proc.stderr
    # a check run (every check skips: the inventory names no target they examine)
    run = run_checks(inventory, "check_dns_mx.py")
    assert f"chmod 600 {env_file}" in run.output, run.output[-3000:]
    env_file.chmod(0o600)
    proc = opsdrill("inventory", "check", str(inventory), env=env)
    assert proc.returncode == 0 and "chmod" not in proc.stderr, proc.stderr
