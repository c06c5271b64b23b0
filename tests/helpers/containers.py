"""Docker for our tests, offline: our own dockerd when none runs, and PostgreSQL images
built here (no image registry is reachable).

- ``docker_engine``: an engine that answers (DOCKER_HOST, or the system socket), else one
  started here as root (``dockerd --data-root ... --iptables=false --bridge=none``,
  containers on the host network), shared by the xdist workers (a lock and a list of
  users in STATE/engine.json) and stopped by its PID when the last user is done. Its data
  root persists under STATE, so the images built below are reused by the next session.
- ``pg_images``: ``opsdrill-test-pg-<hash>:15`` (Debian bookworm minbase by debootstrap,
  with Debian's PostgreSQL 15) and ``:16`` (the same rootfs plus the ``pgserver`` wheel's
  PostgreSQL 16.2), with an entrypoint doing what testcontainers' PostgresContainer needs
  of the official image. The tag is a hash of the recipe: built once, reused while it exists.

Where no engine can run (not root, no dockerd), the tests that need one skip with why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

STATE = Path(os.environ.get("OPSDRILL_TEST_DOCKER_DIR", "/var/tmp/opsdrill-docker"))
SOCKET = STATE / "docker.sock"
BUILD_LOG = STATE / "build-times.json"
IMAGE_REPO = "opsdrill-test-pg"
DEBIAN_PG = "15"
INCLUDE = "postgresql-15,postgresql-client-15"

# What testcontainers' PostgresContainer needs of the official postgres image:
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, initdb on first start, the server on
# PGPORT (or 5432) for every address, the ready log line; any other command (pg_dump,
# pg_restore) runs as it is, as in the official image.
ENTRYPOINT = r"""#!/bin/sh
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
if [ "${1:-postgres}" != postgres ]; then exec "$@"; fi
[ "$#" -gt 0 ] && shift
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown -R postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec runuser -u postgres -- "$0" postgres "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
  user="${POSTGRES_USER:-postgres}"
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  "$PGBIN/initdb" -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 --no-sync > /dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  db="${POSTGRES_DB:-$user}"
  if [ "$db" != postgres ]; then
    printf 'CREATE DATABASE "%s"\n' "$db" | "$PGBIN/postgres" --single -D "$PGDATA" postgres > /dev/null
  fi
fi
exec "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses='*' \
  -c unix_socket_directories=/var/run/postgresql "$@"
"""  # noqa: E501
# Dropped from the rootfs: documentation, translations, apt's caches, the cluster the
# package's postinst made, and LLVM (only for JIT, which a sandbox does without).
TRIM = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/i18n",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/lib/postgresql/15",
    "etc/postgresql/15",
    "usr/lib/x86_64-linux-gnu/libLLVM-14.so.1",
    "usr/lib/x86_64-linux-gnu/libz3.so.4",
    "usr/lib/postgresql/15/lib/llvmjit.so",
    "usr/lib/postgresql/15/lib/llvmjit_types.bc",
]
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PG16_HOME = "/opt/pg16"


class Unavailable(RuntimeError):
    """No Docker engine can run here (the reason says why): container tests skip."""


@dataclass
class Engine:
    host: str  # DOCKER_HOST
    started: bool  # by this harness
    storage: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.host, timeout=120)


# ------------------------------------------------------------------ the engine


def _answers(host: str) -> bool:
    try:
        import docker

        client = docker.DockerClient(base_url=host, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / name).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _read_state() -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((STATE / "engine.json").read_text())
        if isinstance(data, dict):
            return data
    return {}


def _start_dockerd() -> tuple[int, str]:
    """dockerd with overlay2 where the kernel allows it, else vfs (always works, slower:
    every container copies its image)."""
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/sbin")
    assert dockerd
    last = ""
    for storage in ("overlay2", "vfs"):
        SOCKET.unlink(missing_ok=True)
        log = (STATE / f"dockerd-{storage}.log").open("ab")
        proc = subprocess.Popen(
            [
                dockerd,
                "--data-root",
                str(STATE / f"data-{storage}"),
                "--exec-root",
                str(STATE / "exec"),
                "--pidfile",
                str(STATE / "dockerd.pid"),
                "--storage-driver",
                storage,
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "-H",
                f"unix://{SOCKET}",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to pytest must not kill it mid-use
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(f"unix://{SOCKET}"):
                return proc.pid, storage
            time.sleep(0.2)
        last = (STATE / f"dockerd-{storage}.log").read_text(errors="replace")[-800:]
        _stop(proc.pid)
    raise RuntimeError(f"dockerd did not start with overlay2 nor vfs: {last}")


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _no_engine_reason() -> str | None:
    if os.geteuid() != 0:
        return "no Docker engine answers, and starting dockerd needs root"
    if not (shutil.which("dockerd") or Path("/usr/sbin/dockerd").exists()):
        return "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
    if shutil.which("docker") is None:
        return "the docker command is not installed (apt-get install docker.io)"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """A Docker engine for this worker; DOCKER_HOST points at it for the CLI we run."""
    try:
        with engine_session() as engine:
            yield engine
    except Unavailable as exc:
        pytest.skip(str(exc))


@contextlib.contextmanager
def engine_session() -> Iterator[Engine]:
    """The engine (see the module docstring) for as long as the block runs; raises
    ``Unavailable`` when none can run here."""
    previous = os.environ.get("DOCKER_HOST")
    system = previous or "unix:///var/run/docker.sock"
    if _answers(system):
        os.environ["DOCKER_HOST"] = system
        yield Engine(system, False, "?")
        return
    reason = _no_engine_reason()
    if reason:
        raise Unavailable(reason)
    me = os.getpid()
    with _locked("engine.lock"):
        state = _read_state()
        if not (state.get("pid") and _alive(state["pid"]) and _answers(f"unix://{SOCKET}")):
            pid, storage = _start_dockerd()
            state = {"pid": pid, "storage": storage, "users": []}
        state["users"] = [u for u in state.get("users", []) if _alive(u)] + [me]
        (STATE / "engine.json").write_text(json.dumps(state))
    os.environ["DOCKER_HOST"] = f"unix://{SOCKET}"
    try:
        yield Engine(f"unix://{SOCKET}", True, state["storage"])
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous
        with _locked("engine.lock"):
            state = _read_state()
            state["users"] = [u for u in state.get("users", []) if u != me and _alive(u)]
            if not state["users"] and state.get("pid"):
                _stop(state["pid"])  # the last user stops it, by its PID
                state = {}
            (STATE / "engine.json").write_text(json.dumps(state))


# ------------------------------------------------------------------ the images


def recipe_hash() -> str:
    """What the images are built from: a change of any of it builds new ones."""
    from importlib.metadata import version

    parts = [ENTRYPOINT, INCLUDE, "\n".join(TRIM), BASE_PATH, PG16_HOME, version("pgserver")]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def image_pattern() -> str:
    return f"{IMAGE_REPO}-{recipe_hash()}:{{major}}"


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            if line.startswith("deb ") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def _import(rootfs: Path, image: str, env: dict[str, str], changes: dict[str, str]) -> None:
    argv = ["docker", "import"]
    for key, value in changes.items():
        argv += ["-c", f"ENV {key}={value}"]
    argv += ["-c", 'ENTRYPOINT ["docker-entrypoint.sh"]', "-c", 'CMD ["postgres"]', "-", image]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        subprocess.run(argv, stdin=tar.stdout, env=env, check=True, capture_output=True)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()


def build_images(engine: Engine) -> dict[str, float]:
    """debootstrap -> trim -> entrypoint -> import :15; + pgserver's 16 -> import :16.
    Returns the seconds each step took."""
    from opsdrill_stack.postgres import pgserver_bindir

    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        raise Unavailable("debootstrap is not installed (apt-get install debootstrap)")
    pattern = image_pattern()
    work = STATE / f"build-{recipe_hash()}"
    shutil.rmtree(work, ignore_errors=True)
    rootfs = work / "rootfs"
    times: dict[str, float] = {}
    started = time.monotonic()
    debootstrap = ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", "bookworm"]
    subprocess.run(
        [*debootstrap, str(rootfs), _mirror()],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    times["debootstrap"] = time.monotonic() - started
    for rel in TRIM:
        target = rootfs / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    entry = rootfs / "usr/local/bin/docker-entrypoint.sh"
    entry.write_text(ENTRYPOINT)
    entry.chmod(0o755)
    pgdata = {"PGDATA": "/var/lib/postgresql/data"}
    step = time.monotonic()
    bin15 = f"/usr/lib/postgresql/{DEBIAN_PG}/bin"
    _import(
        rootfs,
        pattern.replace("{major}", DEBIAN_PG),
        engine.env(),
        {"PATH": f"{bin15}:{BASE_PATH}", "PGBIN": bin15, **pgdata},
    )
    times["import 15"] = time.monotonic() - step
    step = time.monotonic()
    # pgserver's binaries find libpq at bin/../../../pgserver.libs: keep that layout.
    src = pgserver_bindir().parent  # .../site-packages/pgserver/pginstall
    dest = rootfs / PG16_HOME.lstrip("/")
    shutil.copytree(src, dest / "pgserver" / "pginstall", symlinks=True)
    libs = src.parent.parent / "pgserver.libs"
    if libs.is_dir():
        shutil.copytree(libs, dest / "pgserver.libs", symlinks=True)
    bin16 = f"{PG16_HOME}/pgserver/pginstall/bin"
    _import(
        rootfs,
        pattern.replace("{major}", "16"),
        engine.env(),
        {"PATH": f"{bin16}:{BASE_PATH}", "PGBIN": bin16, **pgdata},
    )
    times["import 16"] = time.monotonic() - step
    shutil.rmtree(work, ignore_errors=True)
    times["total"] = time.monotonic() - started
    BUILD_LOG.write_text(json.dumps({"pattern": pattern, "seconds": times}, indent=2))
    return times


@pytest.fixture(scope="session")
def pg_images(docker_engine: Engine) -> str:
    """The image name pattern (``...:{major}``) with 15 and 16 present: built once."""
    try:
        return ensure_images(docker_engine)
    except Unavailable as exc:
        pytest.skip(str(exc))


def ensure_images(docker_engine: Engine) -> str:
    """Build the images unless they exist (one builder at a time); their pattern."""
    pattern = image_pattern()
    wanted = [pattern.replace("{major}", m) for m in (DEBIAN_PG, "16")]
    with _locked("build.lock"):
        client = docker_engine.client()
        try:
            missing = [w for w in wanted if not client.images.list(name=w)]
        finally:
            client.close()
        if missing:
            build_images(docker_engine)
    return pattern


# ------------------------------------------------------------------ helpers for tests


def our_containers(engine: Engine, pid: int | None = None) -> list[str]:
    """Names of the containers opsdrill labelled; those of process ``pid`` only if given."""
    from opsdrill.containers import OWNER_LABEL

    client = engine.client()
    try:
        found = client.containers.list(all=True, filters={"label": OWNER_LABEL})
        names = []
        for container in found:
            owner = json.loads(container.labels[OWNER_LABEL])
            if pid is None or owner.get("pid") == pid:
                names.append(str(container.name))
        return names
    finally:
        client.close()


def container_sandbox(pattern: str, network: str = "host") -> dict[str, Any]:
    """A ``[databases.X.sandbox]`` table for a container sandbox of ``pattern``."""
    return {"container": pattern, "container_network": network, "container_start_seconds": 120.0}
