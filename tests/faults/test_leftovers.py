"""Leave nothing behind (issue 11): signals, killed runs, the sandbox role's drop, a full disk.

The real CLI runs in a subprocess against the local stack (real PostgreSQL live and
sandbox, moto S3, GnuPG) and is interrupted mid-drill, during pg_restore: SIGTERM and
SIGHUP must clean up as Ctrl-C does; what SIGKILL leaves (the run's private directory, its
gpg-agent with the passphrase cached, the scratch database) the next drill removes and
reports. A sandbox role that is not a superuser must still drop its scratch database when
autovacuum or another role's session is in it, and a full disk under the restore spool is
reported as such, with where.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from opsdrill import workspace
from opsdrill.backups import scratch
from opsdrill.errors import ConfigError
from opsdrill.pg import Endpoint
from tests.conftest import ROOT, Env, Stack, derive, opsdrill

BULK_ROWS = 400_000  # enough that pg_restore runs for seconds, to be interrupted in
SCRATCH_LIKE = "opsdrill\\_drill\\_%"


# ---------------------------------------------------------------------------- helpers


def sandbox_port(stack: Stack) -> int:
    return int(stack.stack.state["components"]["pg_sandbox"]["port"])


def sandbox_conn(
    stack: Stack, dbname: str = "postgres", user: str = "opsdrill", password: str | None = None
) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host="127.0.0.1",
        port=sandbox_port(stack),
        user=user,
        dbname=dbname,
        password=password or stack.secrets["OPSDRILL_SANDBOX_PG_PASSWORD"],
        autocommit=True,
        connect_timeout=10,
    )


def scratch_names(stack: Stack) -> set[str]:
    with sandbox_conn(stack) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (SCRATCH_LIKE,)
        ).fetchall()
    return {str(r[0]) for r in rows}


def drop_if_left(stack: Stack, names: set[str]) -> None:
    with sandbox_conn(stack) as conn:
        for name in names:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _stat(pid: str) -> tuple[str, int] | None:
    """(command name, parent pid) of a process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.index("(") + 1 : raw.rindex(")")], int(raw[raw.rindex(")") + 2 :].split()[1])


def has_child(pid: int, name: str) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _stat(entry)) and found == (name, pid):
            return True
    return False


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent (or init) to reap it."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2] not in "ZX"


def agents_under(base: Path) -> list[int]:
    """gpg-agent processes whose GnuPG home is under ``base``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"gpg-agent" and b"--homedir" in argv:
            home = argv[argv.index(b"--homedir") + 1].decode()
            if home.startswith(f"{base}/"):
                found.append(int(entry))
    return found


def wait_for(what: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if what():
            return True
        time.sleep(0.02)
    return False


def start_drill(inventory: Path, tmpdir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "opsdrill", "restore", "-i", str(inventory), "-d", "crm", "--drill"],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def private_modes(run_dir: Path) -> list[str]:
    """What under ``run_dir`` is not private: directories 0700, files 0600 (sockets and
    files that vanish while we look are skipped)."""
    wrong = []
    for root, dirs, files in os.walk(run_dir):
        for name, want in [*((d, 0o700) for d in dirs), *((f, 0o600) for f in files)]:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(Path(root, name))
                if (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) and stat.S_IMODE(
                    st.st_mode
                ) != want:
                    wrong.append(f"{Path(root, name)}: {stat.S_IMODE(st.st_mode):o}")
    if stat.S_IMODE(run_dir.stat().st_mode) != 0o700:
        wrong.append(f"{run_dir}: {stat.S_IMODE(run_dir.stat().st_mode):o}")
    return wrong


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def big(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """Its own database, with a bulk table so that pg_restore runs for seconds, backed up."""
    env = derive(stack, tmp_path_factory.mktemp("big"), own_database=True)
    dbname = env.data["databases"]["crm"]["dsn"].rsplit("/", 1)[1]
    with stack.live_conn(dbname) as conn:
        conn.execute(
            "CREATE TABLE public.bulk AS SELECT g AS id, md5(g::text) || repeat('x', 64) AS pad "
            f"FROM generate_series(1, {BULK_ROWS}) g"
        )
        conn.execute("ALTER TABLE public.bulk ADD PRIMARY KEY (id)")
    env.backup()
    return env


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR short enough for the GnuPG home (gpg-agent's sockets) to live in the run's
    directory; whatever a failing test leaves there is removed."""
    path = Path(tempfile.mkdtemp(prefix="odt-", dir="/tmp"))
    try:
        yield path
    finally:
        for pid in agents_under(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


def own_inventory(env: Env, tmp_path: Path) -> Env:
    """A copy of ``env``'s inventory this test may change."""
    mine = Env(env.stack, tmp_path / "inventory.toml", copy.deepcopy(env.data))
    return mine.rewrite(lambda d: None)


@contextlib.contextmanager
def sandbox_roles(stack: Stack, *names: str, createdb: bool = True) -> Iterator[str]:
    """Non-superuser login roles on the sandbox (the first with CREATEDB); their password."""
    password = secrets.token_urlsafe(12)
    with sandbox_conn(stack) as conn:
        for i, name in enumerate(names):
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER {} PASSWORD {}").format(
                    sql.Identifier(name),
                    sql.SQL("CREATEDB" if i == 0 and createdb else "NOCREATEDB"),
                    sql.Literal(password),
                )
            )
    try:
        yield password
    finally:
        with sandbox_conn(stack) as conn:
            owned = conn.execute(
                "SELECT datname FROM pg_database WHERE pg_get_userbyid(datdba) = ANY(%s)",
                (list(names),),
            ).fetchall()
            for (dbname,) in owned:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname)
                    )
                )
            for name in names:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


# ---------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_mid_drill_cleans_up_like_ctrl_c(
    big: Env, short_tmp: Path, sig: signal.Signals
) -> None:
    """systemd's stop timeout, `timeout`, a closed terminal: everything the drill started
    is removed (the plaintext spool, the GnuPG home and its agent, the scratch database),
    and the exit code says which signal (128 + N)."""
    before = scratch_names(big.stack)
    proc = start_drill(big.path, short_tmp)
    try:
        assert wait_for(lambda: has_child(proc.pid, "pg_restore"), proc), finish(proc)
        # Mid-run: one private directory under TMPDIR holds it all, private.
        (run_dir,) = list(short_tmp.iterdir())
        assert run_dir.name.startswith(f"opsdrill-drill-{proc.pid}-")
        assert private_modes(run_dir) == []
        assert any(p.name.startswith("spool-") for p in run_dir.iterdir())
        agents = agents_under(short_tmp)
        assert agents, "the drill key's gpg-agent should run from the run's directory"
        scratch = scratch_names(big.stack) - before
        assert len(scratch) == 1
        proc.send_signal(sig)
    except BaseException:
        finish(proc)
        raise
    _, err = finish(proc)
    try:
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert f"opsdrill: interrupted by {sig.name}" in err
        assert list(short_tmp.iterdir()) == []
        assert agents_under(short_tmp) == []
        assert not any(running(pid) for pid in agents)
        assert scratch_names(big.stack) & scratch == set()
    finally:
        drop_if_left(big.stack, scratch)


def test_what_a_killed_drill_left_the_next_drill_removes_and_reports(
    big: Env, short_tmp: Path
) -> None:
    """SIGKILL (the OOM killer) leaves the run's directory, its gpg-agent (passphrase
    cached) and the scratch database; the next drill removes each, one line on stderr and
    one note in the drill report each."""
    before = scratch_names(big.stack)
    proc = start_drill(big.path, short_tmp)
    try:
        assert wait_for(lambda: has_child(proc.pid, "pg_restore"), proc), finish(proc)
        proc.kill()
    finally:
        finish(proc)
    scratch = scratch_names(big.stack) - before
    try:
        (left,) = list(short_tmp.iterdir())
        agents = agents_under(short_tmp)
        assert agents and len(scratch) == 1  # what a killed run leaves behind

        nxt = opsdrill(
            "restore",
            "-i",
            str(big.path),
            "-d",
            "crm",
            "--drill",
            env={**os.environ, "TMPDIR": str(short_tmp)},
        )
        assert nxt.returncode == 0, nxt.stderr
        lines = nxt.stderr.splitlines()
        expected = [
            *(f"stopped gpg-agent pid {pid} " for pid in agents),
            f"removed temporary directory {left} ",
            f"removed scratch database {next(iter(scratch))} ",
        ]
        for fragment in expected:
            (line,) = [ln for ln in lines if fragment in ln]
            assert line.startswith("opsdrill: ") and f"pid {proc.pid} on " in line
            assert f"  note: {line.removeprefix('opsdrill: ')}" in nxt.stdout
        assert list(short_tmp.iterdir()) == []
        assert agents_under(short_tmp) == []
        assert scratch_names(big.stack) & scratch == set()
    finally:
        drop_if_left(big.stack, scratch)


def test_signals_raise_in_the_main_thread_and_cleanup_finishes_first() -> None:
    """The handler raises Interrupted (a KeyboardInterrupt: every finally runs); inside
    shielded cleanup the signal waits until the cleanup is done; a second one is ignored."""
    previous = signal.getsignal(signal.SIGTERM)
    with workspace.signals_interrupt():
        with pytest.raises(workspace.Interrupted) as first:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert first.value.signum == signal.SIGTERM
    finished = []
    with workspace.signals_interrupt():
        with pytest.raises(workspace.Interrupted) as later, workspace.shielded():
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGTERM)  # during cleanup: ignored
            time.sleep(0.1)
            finished.append(True)
        assert later.value.signum == signal.SIGHUP and finished == [True]
    assert signal.getsignal(signal.SIGTERM) == previous


# ---------------------------------------------------------------------------- sweeps


def plant_dir(base: Path, operation: str, owner: workspace.Owner | None, pid: int) -> Path:
    path = base / f"opsdrill-{operation}-{pid}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    (path / "spool-x.dump").write_bytes(b"plaintext")
    if owner is not None:
        (path / "owner.json").write_text(owner.to_json())
    return path


def test_sweep_removes_only_directories_of_runs_provably_gone(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    me = workspace.Owner.of_this_process("drill")
    gone = dead_pid()
    dead = workspace.Owner("drill", me.host, gone, None, "2026-01-01T00:00:00+00:00")
    elsewhere = workspace.Owner("drill", "another-host", gone, None, me.started)
    removed = [plant_dir(short_tmp, "drill", dead, gone), plant_dir(short_tmp, "drill", None, gone)]
    kept = [
        plant_dir(short_tmp, "drill", me, os.getpid()),  # a concurrent run: alive
        plant_dir(short_tmp, "drill", elsewhere, gone),  # another host's: cannot tell
        plant_dir(short_tmp, "backup", dead, gone),  # another operation's: its own sweep
    ]
    (short_tmp / "opsdrill-restore-nynbgzt0").mkdir()  # older naming: no owner to prove
    said: list[str] = []
    done = workspace.sweep("drill", said.append)
    assert done == said and len(done) == 2
    assert all(not p.exists() for p in removed)
    assert all(p.exists() for p in kept) and (short_tmp / "opsdrill-restore-nynbgzt0").exists()
    assert any(f"pid {gone} on {me.host}" in line for line in done)


def test_a_gnupg_home_too_deep_for_agent_sockets_is_short_and_still_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpg-agent's socket path must stay under ~107 bytes: under a deep TMPDIR the home
    goes to a short directory in /tmp, recorded in owner.json, and its agent is stopped
    and the directory removed, on close and by the next run when the run was killed."""
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    ws = workspace.Workspace("drill")
    home = ws.gnupg_home()
    try:
        assert not home.is_relative_to(deep) and len(str(home)) < 40
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        owner = json.loads((ws.path / "owner.json").read_text())
        assert owner["gnupg_homes"] == [str(home)]
        subprocess.run(["gpg-connect-agent", "--homedir", str(home), "/bye"], check=True)
        assert workspace.agent_pids(home)
    finally:
        ws.close()
    assert not home.exists() and not ws.path.exists() and not workspace.agent_pids(home)

    # Killed: the owner is gone, its agent runs on; the next run stops it and removes both.
    gone = dead_pid()
    killed = workspace.Workspace("drill")
    killed.owner.pid, killed.owner.pid_started = gone, None
    home = killed.gnupg_home()
    subprocess.run(["gpg-connect-agent", "--homedir", str(home), "/bye"], check=True)
    agents = workspace.agent_pids(home)
    assert agents
    said: list[str] = []
    workspace.sweep("drill", said.append)
    assert not home.exists() and not killed.path.exists() and not workspace.agent_pids(home)
    assert any(f"stopped gpg-agent pid {agents[0]} " in line for line in said)
    assert any(f"removed GnuPG home {home}" in line for line in said)


def plant_scratch(stack: Stack, name: str, comment: str | None) -> str:
    with sandbox_conn(stack) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if comment is not None:
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(name), sql.Literal(comment)
                )
            )
    return name


def test_the_drill_drops_only_scratch_databases_provably_abandoned(stack: Stack) -> None:
    """Owner on this host and gone, or (owner unknown: another host, no comment) older
    than a day: dropped and reported. A live owner on this host (a concurrent drill, even
    a day old), another host's recent one, an unowned recent one: kept."""
    me = workspace.Owner.of_this_process("drill")
    gone = dead_pid()
    tag = secrets.token_hex(3)
    old, now = "20000101000000", time.strftime("%Y%m%d%H%M%S", time.gmtime())

    def owned(owner: workspace.Owner) -> str:
        return scratch.SCRATCH_COMMENT + owner.to_json()

    dead = workspace.Owner("drill", me.host, gone, None, me.started)
    other_recent = workspace.Owner("drill", "another-host", 1, None, me.started)
    other_old = workspace.Owner("drill", "another-host", 1, None, "2000-01-01T00:00:00+00:00")
    dropped = [
        plant_scratch(stack, f"opsdrill_drill_t{tag}_{now}_00000a", owned(dead)),
        plant_scratch(stack, f"opsdrill_drill_t{tag}_{old}_00000b", owned(other_old)),
        plant_scratch(stack, f"opsdrill_drill_t{tag}_{old}_00000c", None),
    ]
    me_long_ago = workspace.Owner(**{**me.__dict__, "started": "2000-01-01T00:00:00+00:00"})
    kept = [
        plant_scratch(stack, f"opsdrill_drill_t{tag}_{now}_00000d", owned(me)),
        plant_scratch(stack, f"opsdrill_drill_t{tag}_{old}_000010", owned(me_long_ago)),
        plant_scratch(stack, f"opsdrill_drill_t{tag}_{now}_00000e", owned(other_recent)),
        plant_scratch(stack, f"opsdrill_drill_t{tag}_{now}_00000f", None),
    ]
    try:
        sandbox = Endpoint.from_dsn(
            "sandbox for crm",
            f"postgresql://opsdrill@127.0.0.1:{sandbox_port(stack)}/postgres",
            stack.secrets["OPSDRILL_SANDBOX_PG_PASSWORD"],
        )
        said: list[str] = []
        scratch.sweep_scratch(sandbox, said.append)
        left = scratch_names(stack)
        assert set(dropped) & left == set() and set(kept) <= left
        ours = [line for line in said if tag in line]
        assert len(ours) == 3 and all(line.startswith("removed scratch database") for line in ours)
        assert any(f"pid {gone} on {me.host}" in line for line in ours)
        assert sum("more than 24 h ago" in line for line in ours) == 2
    finally:
        drop_if_left(stack, {*dropped, *kept})


# ---------------------------------------------------------------------------- the drop


def test_a_non_superuser_drill_drops_its_database_past_another_roles_session(
    big: Env, short_tmp: Path, tmp_path: Path
) -> None:
    """The sandbox role has CREATEDB only (the runbook's privileges). Another role's
    session in the scratch database (as autovacuum's is, right after a restore) made
    DROP ... WITH (FORCE) fail and left the database; the drill waits it out."""
    role, watcher = f"drill_{secrets.token_hex(3)}", f"watcher_{secrets.token_hex(3)}"
    with sandbox_roles(big.stack, role, watcher) as password:
        env = own_inventory(big, tmp_path).with_secret(tmp_path, "LEFTOVERS_ROLE_PW", password)
        dsn = f"postgresql://{role}@127.0.0.1:{sandbox_port(big.stack)}/postgres"
        env.rewrite(
            lambda d: d["databases"]["crm"]["sandbox"].update(
                dsn=dsn, password_env="LEFTOVERS_ROLE_PW"
            )
        )
        before = scratch_names(big.stack)
        proc = start_drill(env.path, short_tmp)
        holder: psycopg.Connection[Any] | None = None
        held_at_drop = False
        try:
            while proc.poll() is None and not held_at_drop:
                if holder is None and (new := scratch_names(big.stack) - before):
                    with contextlib.suppress(psycopg.OperationalError):
                        holder = sandbox_conn(big.stack, new.pop(), watcher, password)
                elif holder is not None:
                    with sandbox_conn(big.stack) as conn:
                        dropping = conn.execute(
                            "SELECT 1 FROM pg_stat_activity WHERE usename = %s "
                            "AND state = 'active' AND query ILIKE 'DROP DATABASE%%'",
                            (role,),
                        ).fetchone()
                    if dropping:
                        held_at_drop = True
                time.sleep(0.02)
        finally:
            if holder is not None:
                holder.close()
        out, err = finish(proc)
        assert holder is not None and held_at_drop, (out, err)
        assert proc.returncode == 0, err
        assert scratch_names(big.stack) - before == set()


def test_drop_database_waits_out_autovacuum_as_a_non_superuser(stack: Stack) -> None:
    """The fault of the issue, reproduced: an autovacuum worker in the database makes a
    non-superuser's DROP DATABASE ... WITH (FORCE) fail; drop_database still drops it."""
    role = f"drill_{secrets.token_hex(3)}"
    dbname = f"av_{secrets.token_hex(3)}"
    with sandbox_roles(stack, role) as password, sandbox_conn(stack) as admin:
        with sandbox_conn(stack, user=role, password=password) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        with sandbox_conn(stack, dbname, role, password) as conn:
            # autovacuum crawls on this table (a cost limit of 1): it stays in the database
            conn.execute(
                "CREATE TABLE t (id int, pad text) WITH (autovacuum_vacuum_cost_delay = 100, "
                "autovacuum_vacuum_cost_limit = 1)"
            )
            conn.execute(
                "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g"
            )
            conn.execute("DELETE FROM t")
        admin.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
        admin.execute("SELECT pg_reload_conf()")
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                worker = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                    "AND backend_type = 'autovacuum worker'",
                    (dbname,),
                ).fetchone()
                if worker:
                    break
                time.sleep(0.2)
            assert worker, "autovacuum never came to the database"
            with (
                sandbox_conn(stack, user=role, password=password) as conn,
                pytest.raises(psycopg.errors.InsufficientPrivilege),
            ):
                conn.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname))
                )
            server = Endpoint.from_dsn(
                "sandbox for crm",
                f"postgresql://{role}@127.0.0.1:{sandbox_port(stack)}/postgres",
                password,
            )
            scratch.drop_database(server, dbname)
            row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            assert row.fetchone() is None
        finally:
            admin.execute("ALTER SYSTEM RESET autovacuum_naptime")
            admin.execute("SELECT pg_reload_conf()")


def test_a_database_still_held_is_named_with_what_holds_it(stack: Stack) -> None:
    role, watcher = f"drill_{secrets.token_hex(3)}", f"watcher_{secrets.token_hex(3)}"
    dbname = f"held_{secrets.token_hex(3)}"
    with sandbox_roles(stack, role, watcher) as password:
        with sandbox_conn(stack, user=role, password=password) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        server = Endpoint.from_dsn(
            "sandbox for crm",
            f"postgresql://{role}@127.0.0.1:{sandbox_port(stack)}/postgres",
            password,
        )
        with sandbox_conn(stack, dbname, watcher, password) as holder:
            pid = holder.info.backend_pid
            with pytest.raises(ConfigError) as info:
                scratch.drop_database(server, dbname, within=1.0)
        message = info.value.message
        assert f"could not drop database {dbname}" in message
        assert f"held by pid {pid} (a session of role {watcher})" in message
        assert f"GRANT pg_signal_backend TO {role}" in message
        assert info.value.exit_code == 2


# ---------------------------------------------------------------------------- a full disk


def test_a_full_disk_under_the_spool_is_named_with_where(big: Env, short_tmp: Path) -> None:
    """TMPDIR on a 2 MiB tmpfs, restore_jobs = 2: the spool fills it. The drill fails at
    the spool (exit 1), saying "No space left on device", the spool's path and the
    filesystem, and what to do; nothing is left on the full filesystem."""
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(short_tmp)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        assert big.inv.database("crm").restore_jobs == 2  # the default: a spool
        before = scratch_names(big.stack)
        proc = opsdrill(
            "restore",
            "-i",
            str(big.path),
            "-d",
            "crm",
            "--drill",
            env={**os.environ, "TMPDIR": str(short_tmp)},
        )
        assert proc.returncode == 1, proc.stderr
        assert "No space left on device" in proc.stderr
        assert f"the restore spool {short_tmp}/opsdrill-drill-" in proc.stderr
        assert f"TMPDIR={short_tmp}) is on a full filesystem ({short_tmp}: " in proc.stderr
        assert "restore_jobs = 1 to restore without a spool" in proc.stderr
        assert "no error output" not in proc.stderr
        assert list(short_tmp.iterdir()) == []
        assert agents_under(short_tmp) == []
        assert scratch_names(big.stack) - before == set()
    finally:
        for pid in agents_under(short_tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(short_tmp)], check=False)
