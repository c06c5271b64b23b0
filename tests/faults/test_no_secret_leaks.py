"""No password, key or passphrase reaches terminal output, exceptions or Allure results,
on the happy path or on failure paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Env, opsdrill

PLANTED = "planted-Secret-7f3a9c-do-not-leak"


def scan(texts: dict[str, str], secrets: list[str]) -> list[str]:
    return [
        f"{secret[:12]}... in {where}"
        for where, text in texts.items()
        for secret in secrets
        if secret in text
    ]


def test_secrets_never_leak(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from opsdrill.config.envfile import read_env_file

    app_env = read_env_file(Path(env.data["secrets"]["app"]["env_file"]))
    # every app value that is a real secret (hosts and addresses are not)
    app_secrets = [
        v for k, v in app_env.items() if k in {"ENCRYPTION_KEY", "DATABASE_URL", "SMTP_PASSWORD"}
    ]
    secrets = [*env.stack.secrets.values(), *app_secrets, PLANTED]
    assert len(secrets) >= 8
    outputs: dict[str, str] = {}
    env.backup()
    for args in (
        ["backup"],
        ["list"],
        ["prune", "--dry-run"],
        ["mirror"],
        ["secrets", "backup"],
        ["secrets", "list", "-b", "app"],
    ):
        proc = opsdrill(*args, "-i", str(env.path))
        outputs[" ".join(args)] = proc.stdout + proc.stderr
    drill = opsdrill("restore", "-i", str(env.path), "-d", "crm", "--drill")
    outputs["drill"] = drill.stdout + drill.stderr
    run = env.run_checks()
    outputs["checks"] = run.output
    for path in run.results_dir.iterdir():
        outputs[f"allure:{path.name}"] = path.read_text(errors="replace")

    # failure paths: a wrong sandbox password and a wrong S3 secret, both planted values
    monkeypatch.setenv("LEAKTEST_PLANTED", PLANTED)
    env.rewrite(lambda d: d["databases"]["crm"]["sandbox"].update(password_env="LEAKTEST_PLANTED"))
    failing = env.run_checks("check_pg_drill.py", extra=())
    assert failing.returncode != 0
    outputs["failing checks"] = failing.output
    for path in failing.results_dir.iterdir():
        outputs[f"allure-failing:{path.name}"] = path.read_text(errors="replace")
    proc = opsdrill(
        "restore",
        "-i",
        str(env.path),
        "-d",
        "crm",
        "--drill",
        env={**os.environ, "LEAKTEST_PLANTED": PLANTED},
    )
    assert proc.returncode == 2 and "password authentication failed" in proc.stderr
    outputs["failing drill"] = proc.stdout + proc.stderr
    env.rewrite(lambda d: d["stores"]["offsite"].update(secret_key_env="LEAKTEST_PLANTED"))
    proc = opsdrill("backup", "-i", str(env.path), env={**os.environ, "LEAKTEST_PLANTED": PLANTED})
    outputs["failing backup"] = proc.stdout + proc.stderr

    assert scan(outputs, secrets) == []
    assert any("pg:crm" in text for text in outputs.values())
