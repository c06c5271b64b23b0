"""Every operation exits by one rule (``opsdrill --help``, README "Exit codes"):

0 success; 1 the operation ran and failed because of the data or the target; 2 opsdrill
could not do its job (configuration, a target unreachable or timed out, its own credentials
refused, a tool missing, a guard refused, not confirmed, an internal error); 75 the cron
wrapper's lock is held; 130 interrupted.

Each case runs the real CLI in a subprocess against the local stack (real PostgreSQL, moto
S3 servers, gpg) and asserts the exit code, that stderr names what to fix, and that no
secret reaches stdout or stderr.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from opsdrill.cli import EXIT_CODES, build_parser
from opsdrill.config.envfile import read_env_file
from opsdrill.redact import MASK
from opsdrill_stack.procs import free_port, port_open, stop_pid, wait_for
from tests.conftest import ROOT, Env, Stack, derive, opsdrill
from tests.helpers.faults import CuttingProxy, failing_gpg_dir
from tests.integration.test_operations import object_keys, restore_into_sandbox

SCRIPTS = ROOT / "scripts" / "backup"
WRONG = "wrong-" + uuid.uuid4().hex  # a planted wrong credential: must never be shown


def secrets_of(env: Env) -> list[str]:
    """The stack's credentials and the application's secret values."""
    app = read_env_file(Path(env.data["secrets"]["app"]["env_file"]))
    return [
        *env.stack.secrets.values(),
        *(v for k, v in app.items() if k in {"ENCRYPTION_KEY", "DATABASE_URL", "SMTP_PASSWORD"}),
        WRONG,
    ]


def expect(env: Env, proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """Exit ``code``; stderr has every fragment (what to fix); no secret, no traceback."""
    shown = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{shown[-3000:]}"
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in shown, shown[-3000:]
    leaked = [s[:6] + "..." for s in secrets_of(env) if s and s in shown]
    assert not leaked, f"secrets shown: {leaked}\n{shown[-3000:]}"


def cli(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess; the inventory's env_file supplies the secrets."""
    return opsdrill(*args, env={**os.environ, **(extra_env or {})})


def dead_endpoint() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


# What each store-touching subcommand needs on its command line, and which inventory
# store it reaches first.
STORE_COMMANDS: dict[str, tuple[list[str], str]] = {
    "backup": (["backup"], "offsite"),
    "list": (["list"], "offsite"),
    "prune": (["prune"], "offsite"),
    "prune --dry-run": (["prune", "--dry-run"], "offsite"),
    "restore --drill": (["restore", "-d", "crm", "--drill"], "offsite"),
    "mirror": (["mirror"], "offsite-files"),
    "mirror-restore": (
        ["mirror-restore", "-m", "files", "--to-store", "restored-files"],
        "offsite-files",
    ),
    "secrets backup": (["secrets", "backup"], "offsite"),
    "secrets list": (["secrets", "list", "-b", "app"], "offsite"),
    "secrets restore": (
        ["secrets", "restore", "-b", "app", "--to", "{tmp}/restored.env"],
        "offsite",
    ),
}


def argv(env: Env, command: str, tmp_path: Path) -> list[str]:
    args, _ = STORE_COMMANDS[command]
    first = 2 if args[0] == "secrets" else 1
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    return [*args[:first], "-i", str(env.path), *args[first:]]


# ---------------------------------------------------------------------------- exit 0


def test_every_operation_succeeds_with_0(stack: Stack, tmp_path: Path) -> None:
    env = derive(stack, tmp_path, own_files=2)
    inv = str(env.path)
    for args in (
        ["inventory", "check", inv],
        ["backup", "-i", inv],
        ["list", "-i", inv],
        ["prune", "-i", inv, "--dry-run"],
        ["prune", "-i", inv],
        ["restore", "-i", inv, "-d", "crm", "--drill"],
        ["mirror", "-i", inv],
        ["mirror-restore", "-i", inv, "-m", "files", "--to-store", "restored-files"],
        ["secrets", "backup", "-i", inv],
        ["secrets", "list", "-i", inv, "-b", "app"],
        ["secrets", "restore", "-i", inv, "-b", "app", "--to", str(tmp_path / "r.env")],
    ):
        proc = cli(*args)
        expect(env, proc, 0)
        assert proc.stdout.strip(), f"{args[0]} printed nothing"


# ---------------------------------------------------------------------------- exit 2


@pytest.mark.parametrize("command", list(STORE_COMMANDS))
def test_store_down_is_2_for_every_subcommand(env: Env, tmp_path: Path, command: str) -> None:
    store = STORE_COMMANDS[command][1]
    endpoint = env.data["stores"][store]["endpoint"]
    env.rewrite(lambda d: d["stores"][store].update(endpoint=dead_endpoint(), timeout_seconds=5))
    proc = cli(*argv(env, command, tmp_path))
    expect(env, proc, 2, f"store {store} (", "unreachable", f"stores.{store}.endpoint")
    env.rewrite(lambda d: d["stores"][store].update(endpoint=endpoint))
    if command == "backup":
        assert object_keys(env) == []


def test_store_dropped_mid_upload_is_2_and_leaves_nothing(env: Env) -> None:
    endpoint = env.data["stores"]["offsite"]["endpoint"]
    proxy = CuttingProxy(int(endpoint.rsplit(":", 1)[1]), cut_after=100_000)
    try:
        env.rewrite(
            lambda d: d["stores"]["offsite"].update(
                endpoint=f"127.0.0.1:{proxy.port}", timeout_seconds=5.0
            )
        )
        proc = cli("backup", "-i", str(env.path))
    finally:
        proxy.close()
    expect(env, proc, 2, "upload of", "store offsite (", "stores.offsite.endpoint")
    assert "nothing from this run counts as a backup" in proc.stderr
    env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint=endpoint))
    assert object_keys(env) == []


def test_store_dropped_mid_download_is_2(env: Env) -> None:
    env.backup()
    endpoint = env.data["stores"]["offsite"]["endpoint"]
    # the listing and the manifest are a few kB; the object is far bigger than this
    proxy = CuttingProxy(int(endpoint.rsplit(":", 1)[1]), cut_after=300_000, direction="down")
    try:
        env.rewrite(
            lambda d: d["stores"]["offsite"].update(
                endpoint=f"127.0.0.1:{proxy.port}", timeout_seconds=5.0
            )
        )
        proc = cli("restore", "-i", str(env.path), "-d", "crm", "--drill")
    finally:
        proxy.close()
    expect(env, proc, 2, "store offsite (", "stores.offsite.endpoint")


def test_store_dropped_mid_prune_is_2(env: Env) -> None:
    env.rewrite(lambda d: d["retention"].update(min_keep=1))  # the old one is not kept
    env.backup(now=datetime.now(UTC) - timedelta(days=60))  # past the policy: to delete
    env.backup()
    endpoint = env.data["stores"]["offsite"]["endpoint"]
    port = int(endpoint.rsplit(":", 1)[1])

    def through(proxy: CuttingProxy, *args: str) -> subprocess.CompletedProcess[str]:
        env.rewrite(
            lambda d: d["stores"]["offsite"].update(
                endpoint=f"127.0.0.1:{proxy.port}", timeout_seconds=5.0
            )
        )
        try:
            return cli(*args, "-i", str(env.path))
        finally:
            proxy.close()
            env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint=endpoint))

    measuring = CuttingProxy(port, cut_after=2**40)
    assert through(measuring, "prune", "--dry-run").returncode == 0
    # prune sends the same requests as its dry run (listing, clock, manifests), then its
    # first DELETE is cut
    proc = through(CuttingProxy(port, cut_after=measuring.sent), "prune")
    expect(env, proc, 2, "prune stopped at", "after 0 deletions", "stores.offsite.endpoint")
    assert len(object_keys(env)) == 4  # nothing deleted; the next run does it
    assert cli("prune", "-i", str(env.path)).returncode == 0
    assert len(object_keys(env)) == 2


def test_store_dropped_mid_mirror_is_2(stack: Stack, tmp_path: Path) -> None:
    env = derive(stack, tmp_path, own_files=1)
    env.put("live-files", "big/blob", os.urandom(3 * 2**20))
    endpoint = env.data["stores"]["offsite-files"]["endpoint"]
    # the listings and the index are a few kB; the 3 MiB upload is cut
    proxy = CuttingProxy(int(endpoint.rsplit(":", 1)[1]), cut_after=500_000)
    try:
        env.rewrite(
            lambda d: d["stores"]["offsite-files"].update(
                endpoint=f"127.0.0.1:{proxy.port}", timeout_seconds=5.0
            )
        )
        proc = cli("mirror", "-i", str(env.path), "--workers", "1")
    finally:
        proxy.close()
    expect(env, proc, 2, "error: ", "object(s) not copied", "stores.offsite-files.endpoint")


@pytest.fixture(scope="module")
def signing_s3() -> Iterator[tuple[str, str]]:
    """A real S3 server (moto with IAM authentication on) that checks request signatures,
    and the id of an access key it knows. The local stack's moto accepts any key."""
    import boto3

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "2"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: port_open(port), 30, "moto")
        iam = boto3.client(
            "iam",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
            region_name="us-east-1",
        )
        iam.create_user(UserName="opsdrill")  # the two unauthenticated actions
        key = iam.create_access_key(UserName="opsdrill")["AccessKey"]["AccessKeyId"]
        yield f"127.0.0.1:{port}", str(key)
    finally:
        stop_pid(proc.pid, timeout=5)


@pytest.mark.parametrize(
    "command", ["backup", "list", "prune", "restore --drill", "secrets backup", "secrets list"]
)
def test_wrong_s3_secret_key_is_2_naming_the_variable(
    env: Env, tmp_path: Path, signing_s3: tuple[str, str], command: str
) -> None:
    endpoint, key_id = signing_s3
    env.rewrite(
        lambda d: d["stores"]["offsite"].update(
            endpoint=endpoint,
            access_key_env="EXITCODES_S3_ACCESS",
            secret_key_env="EXITCODES_S3_SECRET",
        )
    )
    keys = {"EXITCODES_S3_ACCESS": key_id, "EXITCODES_S3_SECRET": WRONG}
    proc = cli(*argv(env, command, tmp_path), extra_env=keys)
    expect(
        env,
        proc,
        2,
        "refused opsdrill's credentials",
        "SignatureDoesNotMatch",
        "stores.offsite.secret_key_env = EXITCODES_S3_SECRET",
    )


def test_wrong_database_password_is_2_naming_the_variable(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXITCODES_PG_PASSWORD", WRONG)
    env.rewrite(lambda d: d["databases"]["crm"].update(password_env="EXITCODES_PG_PASSWORD"))
    proc = cli("backup", "-i", str(env.path))
    expect(
        env,
        proc,
        2,
        "database crm (",
        "password authentication failed",
        "databases.crm.password_env = EXITCODES_PG_PASSWORD",
    )
    assert object_keys(env) == []


def test_wrong_sandbox_password_is_2_naming_the_variable(env: Env) -> None:
    env.backup()
    env.rewrite(
        lambda d: d["databases"]["crm"]["sandbox"].update(password_env="EXITCODES_PG_PASSWORD")
    )
    proc = cli(
        *("restore", "-i", str(env.path), "-d", "crm", "--drill"),
        extra_env={"EXITCODES_PG_PASSWORD": WRONG},
    )
    expect(env, proc, 2, "databases.crm.sandbox.password_env = EXITCODES_PG_PASSWORD")


@pytest.mark.parametrize("which", ["live", "sandbox"])
def test_database_down_is_2_naming_the_dsn(env: Env, which: str) -> None:
    dsn = f"postgresql://opsdrill@{dead_endpoint()}/crm"
    if which == "live":
        env.rewrite(lambda d: d["databases"]["crm"].update(dsn=dsn))
        proc = cli("backup", "-i", str(env.path))
        expect(env, proc, 2, "database crm (", "cannot connect", "databases.crm.dsn")
    else:
        env.backup()
        env.rewrite(lambda d: d["databases"]["crm"]["sandbox"].update(dsn=dsn))
        proc = cli("restore", "-i", str(env.path), "-d", "crm", "--drill")
        expect(env, proc, 2, "sandbox for crm (", "cannot connect", "databases.crm.sandbox.dsn")


@pytest.mark.parametrize(
    "args",
    [
        ["backup"],
        ["list"],
        ["prune"],
        ["restore", "-d", "crm", "--drill"],
        ["mirror"],
        ["secrets", "list", "-b", "app"],
        ["inventory", "check"],
    ],
    ids=" ".join,
)
def test_malformed_inventory_is_2_naming_the_file(tmp_path: Path, args: list[str]) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\n[stores.offsite\nendpoint = 1\n')
    if args[0] == "inventory":
        proc = opsdrill(*args, str(broken))
    else:
        first = 2 if args[0] == "secrets" else 1
        proc = opsdrill(*args[:first], "-i", str(broken), *args[first:])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(broken) in proc.stderr and "Traceback" not in proc.stderr


def test_inventory_with_a_wrong_key_is_2_naming_the_key(env: Env) -> None:
    env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint="http://127.0.0.1:9"))
    proc = cli("backup", "-i", str(env.path))
    expect(env, proc, 2, "stores.offsite.endpoint")


@pytest.mark.parametrize("command", ["restore --drill", "secrets restore", "inventory check"])
def test_wrong_drill_passphrase_is_2_naming_the_variable(
    env: Env, tmp_path: Path, command: str
) -> None:
    env.backup()
    assert cli("secrets", "backup", "-i", str(env.path)).returncode == 0
    env.rewrite(lambda d: d["gpg"].update(drill_passphrase_env="EXITCODES_GPG_PASSPHRASE"))
    args = (
        ["inventory", "check", str(env.path)]
        if command == "inventory check"
        else argv(env, command, tmp_path)
    )
    proc = cli(*args, extra_env={"EXITCODES_GPG_PASSPHRASE": WRONG})
    expect(
        env,
        proc,
        2,
        "did not accept opsdrill's passphrase",
        "gpg.drill_passphrase_env = EXITCODES_GPG_PASSPHRASE, set in the environment",
    )
    assert not (tmp_path / "restored.env").exists()


def test_missing_drill_passphrase_is_2(env: Env) -> None:
    env.backup()
    env.rewrite(lambda d: d["gpg"].pop("drill_passphrase_env"))
    proc = cli("restore", "-i", str(env.path), "-d", "crm", "--drill")
    expect(env, proc, 2, "gpg.drill_passphrase_env (not set")


def test_missing_tool_is_2(env: Env, tmp_path: Path) -> None:
    """zstd not installed: found before pg_dump starts, not as a failed stage."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("gpg", "gpgconf", "gpg-agent"):
        found = shutil.which(tool)
        assert found, tool
        (bindir / tool).symlink_to(found)
    proc = cli("backup", "-i", str(env.path), extra_env={"PATH": str(bindir)})
    expect(env, proc, 2, "compress (zstd): zstd not found", "install")
    assert object_keys(env) == []


def test_not_confirmed_is_2_and_changes_nothing(env: Env) -> None:
    env.backup()
    typed = restore_into_sandbox(env, "--new-name", "crm_never_created", tty_input="prod")
    expect(env, typed, 2, "Not confirmed", "nothing was changed", "type crm")
    flag = restore_into_sandbox(env, "--new-name", "crm_never_created", "--confirm", "prod")
    expect(env, flag, 2, "does not match --database 'crm'", "nothing was changed")
    sandbox = env.data["databases"]["crm"]["sandbox"]
    with psycopg.connect(
        sandbox["dsn"], password=env.stack.secrets[sandbox["password_env"]], autocommit=True
    ) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = 'crm_never_created'"
        ).fetchone()
    assert row == (0,)


def test_safety_guards_are_2(stack: Stack, tmp_path: Path) -> None:
    env = derive(stack, tmp_path, own_files=1)
    inv = str(env.path)
    assert cli("mirror", "-i", inv).returncode == 0
    restore = ("mirror-restore", "-i", inv, "-m", "files", "--to-store", "restored-files")
    assert cli(*restore).returncode == 0
    expect(env, cli(*restore), 2, "already holds objects", "fix:")
    live = env.data["databases"]["crm"]["dsn"]
    env.rewrite(lambda d: d["databases"]["crm"]["sandbox"].update(dsn=live))
    proc = cli("restore", "-i", inv, "-d", "crm", "--drill")
    expect(env, proc, 2, "is the live server", "sandbox.dsn")


def test_unexpected_internal_error_is_2_and_redacted(env: Env) -> None:
    """A bug in opsdrill is not a verdict on the target: 2, printed without secrets."""
    proc = _list_run_as(
        env,
        "from opsdrill.cli.common import inventory_for\n"
        "def replacement(args):\n"
        "    inv = inventory_for(args)\n"
        "    raise RuntimeError('bug near ' + inv.secret('OPSDRILL_OFFSITE_SECRET_KEY'))\n",
    )
    expect(env, proc, 2, "opsdrill: unexpected RuntimeError: bug near", MASK)


def test_interrupted_is_130(env: Env) -> None:
    proc = _list_run_as(env, "def replacement(args):\n    raise KeyboardInterrupt\n")
    expect(env, proc, 130, "opsdrill: interrupted")


def _list_run_as(env: Env, replacement: str) -> subprocess.CompletedProcess[str]:
    """``opsdrill list -i INV`` through the real CLI, its command replaced by the function
    ``replacement`` defines: how the CLI turns what a command raised into an exit code."""
    code = (
        f"import sys, opsdrill.cli as cli\n{replacement}"
        "cli.cmd_list = replacement\nsys.exit(cli.main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "list", "-i", str(env.path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------------------- exit 1


def flip_a_byte(env: Env, key: str, store: str = "offsite") -> None:
    s3, st = env.store(store)
    response = s3.get_object(st.bucket, key)
    try:
        body = bytearray(response.read())
    finally:
        response.close()
        response.release_conn()
    body[len(body) // 2] ^= 0xFF
    s3.put_object(st.bucket, key, io.BytesIO(bytes(body)), len(body))


def test_corrupt_backup_object_is_1(env: Env) -> None:
    manifest = env.backup()
    flip_a_byte(env, manifest.object["key"])
    proc = cli("restore", "-i", str(env.path), "-d", "crm", "--drill")
    expect(env, proc, 1, "verify: object sha256", "differs from manifest")


def test_corrupt_manifest_is_1(env: Env) -> None:
    env.backup()
    ref = env.refs()[-1]
    s3, store = env.s3()
    s3.put_object(store.bucket, ref.manifest_key, io.BytesIO(b'{"format": "opsd'), 16)
    proc = cli("restore", "-i", str(env.path), "-d", "crm", "--drill")
    expect(env, proc, 1, "manifest", ref.manifest_key)


def test_backup_encrypted_to_other_recipients_is_1(env: Env, tmp_path: Path) -> None:
    with env.encrypting_to_another_key(tmp_path) as other:
        env.backup()
        assert cli("secrets", "backup", "-i", str(env.path)).returncode == 0
    drill = cli("restore", "-i", str(env.path), "-d", "crm", "--drill")
    expect(env, drill, 1, "decrypt (gpg)", other.fingerprint, "is none of them")
    bundle = cli(
        "secrets", "restore", "-i", str(env.path), "-b", "app", "--to", str(tmp_path / "x")
    )
    expect(env, bundle, 1, "decrypt:", other.fingerprint, "none of them")


def test_failing_pipeline_stage_is_1(env: Env, tmp_path: Path) -> None:
    real = shutil.which("gpg")
    assert real
    fake = {"PATH": f"{failing_gpg_dir(tmp_path, real)}:{os.environ['PATH']}"}
    proc = cli("backup", "-i", str(env.path), extra_env=fake)
    expect(env, proc, 1, "encrypt (gpg)", "simulated failure")
    assert object_keys(env) == []
    bundle = cli("secrets", "backup", "-i", str(env.path), extra_env=fake)
    expect(env, bundle, 1, "encrypt: gpg exited")


def test_drill_mismatch_is_1(env: Env) -> None:
    """A backup whose restore does not match its manifest (the manifest lies)."""
    manifest = env.backup()
    ref = env.refs()[-1]
    table = sorted(manifest.tables)[0]
    manifest.tables[table]["rows"] += 1
    body = manifest.to_json()
    s3, store = env.s3()
    s3.put_object(store.bucket, ref.manifest_key, io.BytesIO(body), len(body))
    proc = cli("restore", "-i", str(env.path), "-d", "crm", "--drill")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "manifest match: MISMATCH" in proc.stdout and table in proc.stdout


# ---------------------------------------------------------------------------- wrappers


def wrapper(env: Env, lock_dir: Path, **over: str) -> subprocess.CompletedProcess[str]:
    child = {
        **os.environ,
        "OPSDRILL_INVENTORY": str(env.path),
        "OPSDRILL_BIN": str(Path(sys.executable).parent / "opsdrill"),
        "OPSDRILL_LOCK_DIR": str(lock_dir),
        **over,
    }
    child = {k: v for k, v in child.items() if v}
    return subprocess.run(
        [str(SCRIPTS / "pg-backup.sh")], capture_output=True, text=True, env=child, timeout=300
    )


def test_wrappers_pass_the_codes_through_and_their_own_setup_is_2(env: Env, tmp_path: Path) -> None:
    env.rewrite(lambda d: d["stores"]["offsite"].update(endpoint=dead_endpoint()))
    down = wrapper(env, tmp_path)
    expect(env, down, 2, "stores.offsite.endpoint", "FAILED (exit 2)")
    no_inventory = wrapper(env, tmp_path, OPSDRILL_INVENTORY="")
    assert no_inventory.returncode == 2 and "OPSDRILL_INVENTORY is not set" in no_inventory.stderr
    no_bin = wrapper(env, tmp_path, OPSDRILL_BIN=str(tmp_path / "no-such-opsdrill"))
    assert no_bin.returncode == 2 and "not found (fix: set OPSDRILL_BIN" in no_bin.stderr
    usage = subprocess.run([str(SCRIPTS / "run-locked.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


# ---------------------------------------------------------------------------- the rule, once


def entries(lines: list[str]) -> tuple[dict[str, str], str]:
    """Parse ``  CODE  text`` entries (continuations indented) and the closing paragraph."""
    codes: dict[str, str] = {}
    footer: list[str] = []
    current = None
    for line in lines:
        m = re.match(r"^\s{2}(\d+)\s+(.*)$", line)
        if m:
            current = m[1]
            codes[current] = m[2]
        elif line.startswith("   ") and current:
            codes[current] += " " + line.strip()
        elif line.strip() and codes:
            current = None
            footer.append(line.strip())
    return codes, " ".join(footer)


def table(markdown: str) -> tuple[dict[str, str], str]:
    """The same from a markdown ``| code | meaning |`` table and the paragraph after it."""
    codes = {
        m[1]: m[2].strip()
        for m in re.finditer(r"^\| `?(\d+)`? \| (.*) \|$", markdown, flags=re.MULTILINE)
    }
    after = markdown.split("| 130 |" if "| 130 |" in markdown else "| `130` |", 1)[1]
    paragraph = after.split("\n\n")[1]
    return codes, " ".join(paragraph.split())


def section(path: Path) -> str:
    text = path.read_text()
    return text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]


def test_the_rule_is_documented_once_in_the_same_words() -> None:
    import opsdrill.cli

    canonical = entries(EXIT_CODES.splitlines()[1:])
    codes, footer = canonical
    assert list(codes) == ["0", "1", "2", "75", "130"]
    assert footer.startswith("The error message names what to fix")
    assert "EXIT_CODES" in (opsdrill.cli.__doc__ or "")  # said once, not copied
    header = [
        line[2:]
        for line in (SCRIPTS / "run-locked.sh").read_text().splitlines()
        if line.startswith("#") and not line.startswith("#!")
    ]
    start = next(i for i, line in enumerate(header) if re.match(r"^\s{2}0\s", line))
    sh_codes, sh_footer = entries(header[start:])
    assert sh_codes == codes and sh_footer.startswith(footer)
    for doc in (ROOT / "README.md", ROOT / "docs" / "runbooks" / "backup-and-restore.md"):
        md_codes, md_footer = table(section(doc))
        assert md_codes == codes, doc
        assert md_footer == footer, doc


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["backup"],
        ["list"],
        ["prune"],
        ["restore"],
        ["mirror"],
        ["mirror-restore"],
        ["secrets", "backup"],
        ["secrets", "list"],
        ["secrets", "restore"],
        ["inventory", "check"],
        ["stack", "up"],
    ],
    ids=lambda c: " ".join(c) or "opsdrill",
)
def test_every_help_ends_with_the_rule(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*command, "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(EXIT_CODES.split()) in out
