"""The cold-restore runbook, executed: its marked shell blocks run in order, unchanged,
against a stack that lost its database server, its files bucket and its .env.

Only two blocks are replaced, because they are about the operator's machine rather than
opsdrill: the install (CI already runs `make setup`) and the settings (where things are,
and the secrets the operator types). Every opsdrill command is the runbook's own text, so
a runbook that drifted from the CLI fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from minio import Minio

from opsdrill.files.mirror import run_mirror
from opsdrill.secrets.bundle import backup_bundle
from opsdrill_stack.postgres import SUPERUSER, PgCluster
from tests.conftest import ROOT, Stack, derive

RUNBOOK = ROOT / "docs" / "runbooks" / "backup-and-restore.md"
SECTION = "## Cold restore (lost server)"
FENCE = re.compile(r"^```sh (cold-restore[\w-]*)\n(.*?)^```$", re.M | re.S)
# The production inventory keeps only what a backup host describes; the mail and DNS
# sections of the stack's inventory are not part of this procedure.
PROD_KEYS = ("name", "environment", "env_file", "stores", "gpg", "retention", "databases")


def runbook_blocks() -> list[tuple[str, str]]:
    text = RUNBOOK.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    section = text[start:end]
    untagged = re.findall(r"^```(?:sh|bash|shell)\s*$", section, re.M)
    assert not untagged, "every shell block of the cold restore must be tagged cold-restore*"
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(section)]


def test_runbook_blocks_are_tagged_and_ordered() -> None:
    tags = [tag for tag, _ in runbook_blocks()]
    assert tags[:2] == ["cold-restore-install", "cold-restore-settings"]
    assert set(tags[2:]) == {"cold-restore"} and len(tags) >= 7


@pytest.fixture
def new_server() -> Iterator[tuple[PgCluster, str]]:
    """The replacement database server: a fresh, empty cluster."""
    password = uuid.uuid4().hex
    cluster = PgCluster("new", Path(tempfile.mkdtemp(prefix="opsdrill-new-db-")))
    os.chmod(cluster.base, 0o755)
    try:
        cluster.init(password)
        cluster.start()
        yield cluster, password
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(cluster.base)], check=False)


@pytest.mark.slow
def test_cold_restore_runbook_runs_and_the_checks_prove_it(
    stack: Stack, tmp_path: Path, new_server: tuple[PgCluster, str]
) -> None:
    # What production had before the outage: a backup, a mirrored bucket, a secrets bundle.
    env = derive(stack, tmp_path, own_files=4)
    env.backup()
    assert run_mirror(env.inv, "files").ok
    backup_bundle(env.inv, "app")

    cluster, admin_password = new_server
    data, secrets = env.data, stack.secrets
    offsite, files = data["stores"]["offsite"], data["stores"]["offsite-files"]
    live_files = data["stores"]["live-files"]
    new_bucket = f"new-files-{uuid.uuid4().hex[:8]}"
    Minio(
        live_files["endpoint"],
        secrets[live_files["access_key_env"]],
        secrets[live_files["secret_key_env"]],
        secure=False,
    ).make_bucket(new_bucket)
    restored_env = tmp_path / "srv" / ".env"
    restored_env.parent.mkdir()

    # The production inventory after step 11's edit: database and files on the new servers.
    prod = {k: v for k, v in data.items() if k in PROD_KEYS}
    db = prod["databases"]["crm"]
    db["dsn"] = f"postgresql://{SUPERUSER}@127.0.0.1:{cluster.port}/crm"
    db["password_env"] = "NEW_PG_ADMIN_PASSWORD"
    prod["stores"]["new-files"] = {**live_files, "bucket": new_bucket, "prefix": ""}
    prod["mirrors"] = {"files": {**data["mirrors"]["files"], "source": "new-files"}}
    prod["secrets"] = {"app": {**data["secrets"]["app"], "env_file": str(restored_env)}}
    prod_path = tmp_path / "prod.toml"
    prod_path.write_text(tomli_w.dumps(prod))

    keys_dir = stack.inventory_path.parent
    settings = {
        "ESCROW_FPR": data["gpg"]["recipients"][0],
        "OFFSITE_ENDPOINT": offsite["endpoint"],
        "OFFSITE_SECURE": "false",
        "PG_BUCKET": offsite["bucket"],
        "PG_PREFIX": offsite["prefix"],
        "SECRETS_PREFIX": data["secrets"]["app"]["prefix"],
        "FILES_BUCKET": files["bucket"],
        "FILES_PREFIX": files["prefix"],
        "NEW_PG_HOST": "127.0.0.1",
        "NEW_PG_PORT": str(cluster.port),
        "NEW_PG_ADMIN": SUPERUSER,
        "NEW_MINIO_ENDPOINT": live_files["endpoint"],
        "NEW_MINIO_SECURE": "false",
        "NEW_FILES_BUCKET": new_bucket,
        "APP_ENV_PATH": str(restored_env),
        "PROD_INVENTORY": str(prod_path),
        "OPSDRILL_HOME": str(ROOT),
    }
    typed_secrets = {
        "OFFSITE_ACCESS_KEY": secrets[offsite["access_key_env"]],
        "OFFSITE_SECRET_KEY": secrets[offsite["secret_key_env"]],
        "BACKUP_GPG_PASSPHRASE": secrets[data["gpg"]["drill_passphrase_env"]],
        "NEW_PG_ADMIN_PASSWORD": admin_password,
        "NEW_MINIO_ACCESS_KEY": secrets[live_files["access_key_env"]],
        "NEW_MINIO_SECRET_KEY": secrets[live_files["secret_key_env"]],
        # the production inventory's other secrets, as the ops host has them
        **{k: v for k, v in secrets.items() if k.startswith("OPSDRILL_")},
    }
    workdir = tmp_path / "restore"
    replaced = {
        "cold-restore-install": f"export PATH={shlex.quote(str(ROOT / '.venv' / 'bin'))}:$PATH",
        "cold-restore-settings": "\n".join(
            [
                f"mkdir -p {workdir} && cd {workdir} && umask 077",
                f"cp {shlex.quote(str(keys_dir / data['gpg']['drill_private_key_file']))} "
                "escrow.sec.asc",
                *(f"{k}={shlex.quote(v)}" for k, v in settings.items()),
                "export OPSDRILL_HOME",
            ]
        ),
    }
    script = ["set -eo pipefail"]
    for tag, body in runbook_blocks():
        script.append(replaced.get(tag, body))
    run_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "OPSDRILL_", "PG", "ALLURE"))
    }
    results = tmp_path / "allure-results"
    run_env.update(typed_secrets, ALLURE_RESULTS=str(results), PYTEST_WORKERS="1")
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        timeout=900,
        env=run_env,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for value in typed_secrets.values():
        assert value not in output, "a typed secret was printed"
    # Step 8 restored and verified the database; step 10b the files and the .env.
    assert "match the manifest exactly" in output, output[-3000:]
    assert restored_env.read_text() == (tmp_path / "app.env").read_text()
    assert oct(restored_env.stat().st_mode & 0o777) == "0o600"
    # Step 11's `scripts/verify` ran every check against the restored production: all green,
    # and the ones that prove this restore among them.
    statuses: dict[str, list[str]] = {}
    for path in results.glob("*-result.json"):
        res = json.loads(path.read_text())
        check_id = next(lab["value"] for lab in res["labels"] if lab["name"] == "check_id")
        statuses.setdefault(check_id, []).append(res["status"])
    not_green = {k: v for k, v in statuses.items() if set(v) - {"passed", "skipped"}}
    assert not not_green, f"{not_green}\n{output[-3000:]}"
    for check in ("pg.drill.restore", "files.mirror.parity", "secrets.bundle.encryption_key"):
        assert statuses.get(check) == ["passed"], (check, statuses.get(check))
