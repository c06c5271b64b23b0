"""Throwaway containers: a drill's sandbox server and pg_dump / pg_restore of a server's
major, run through a Docker engine (testcontainers for the sandbox).

Every container opsdrill starts carries the label ``opsdrill.owner`` (the run's
``workspace.Owner``) and is removed by that run on every exit path, an interrupt included.
Testcontainers' own reaper (Ryuk) is a container pulled from a registry, which an offline
host or a private registry does not have: it is disabled, and the sweep here does its job
instead: the next run removes what a killed run left (its owner provably gone, or older
than a day).
"""

from __future__ import annotations

import contextlib
import secrets as _secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opsdrill import workspace
from opsdrill.errors import ConfigError
from opsdrill.pg import Endpoint
from opsdrill.redact import register

OWNER_LABEL = "opsdrill.owner"
KIND_LABEL = "opsdrill.kind"
# A container whose owner cannot be proven gone (another host) is removed only once no
# drill or backup can still be using it: as for scratch databases (opsdrill.backups.scratch).
MAX_AGE = timedelta(hours=24)
READY_LINE = "database system is ready to accept connections"
SANDBOX_USER = "opsdrill"
PING_SECONDS = 5


def image_for(pattern: str, major: int) -> str:
    """``postgres:{major}`` -> ``postgres:16``; the only placeholder is ``{major}``."""
    return pattern.replace("{major}", str(major))


def _free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for a sandbox on the host's network (a
    lost race fails the container's start, which the drill reports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ the engine


def engine(key: str) -> Any:
    """A docker client whose engine answered a ping; ConfigError (exit 2) naming ``key``
    and DOCKER_HOST otherwise. Imported here: only container users pay for it."""
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # no socket, refused, TLS, API: all mean "no engine"
        raise ConfigError(
            f"{key}: no Docker engine answered ({_first_line(exc)}) (fix: start Docker, or "
            "point DOCKER_HOST at a running engine)"
        ) from None
    return client


def engine_answers() -> bool:
    """True when a Docker engine answers within a few seconds (never raises)."""
    try:
        import docker

        client = docker.from_env(timeout=PING_SECONDS)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def ensure_image(client: Any, image: str, key: str) -> str:
    """The image's id (its digest, ``sha256:...``), pulled if it is not there yet; a
    ConfigError naming ``key`` when it can be neither found nor pulled."""
    import docker.errors

    try:
        return str(client.images.get(image).id)
    except docker.errors.ImageNotFound:
        pass
    try:
        return str(client.images.pull(image).id)
    except Exception as exc:
        raise ConfigError(
            f"{key}: image {image} is not on the Docker engine and could not be pulled "
            f"({_first_line(exc)}) (fix: docker pull {image} where a registry is reachable, "
            "or build it locally; a private registry goes into the image pattern, e.g. "
            "registry.example.com/postgres:{major})"
        ) from None


def owner_labels(kind: str) -> dict[str, str]:
    """The labels that make a container findable by the sweep."""
    return {OWNER_LABEL: workspace.Owner.of_this_process(kind).to_json(), KIND_LABEL: kind}


def new_name(kind: str) -> str:
    """A container name that no concurrent run can have: removable by name even when the
    run was interrupted before the engine told it the id."""
    return f"opsdrill-{kind}-{workspace.Owner.of_this_process(kind).pid}-{_secrets.token_hex(4)}"


def remove(client: Any, name: str) -> bool:
    """Remove the container ``name`` (running or not), shielded from signals; False when
    there was none."""
    import docker.errors

    with workspace.shielded():
        try:
            client.containers.get(name).remove(force=True, v=True)
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if "removal" in str(exc) and "in progress" in str(exc):
                return True  # --rm got there first
            raise
    return True


def sweep(client: Any, say: workspace.Say = workspace.say_on_stderr) -> list[str]:
    """Remove the containers killed opsdrill runs left, one line each: their owner ran
    on this host and is gone, or they are older than MAX_AGE. Never a concurrent run's."""
    done = []
    for container in client.containers.list(all=True, filters={"label": OWNER_LABEL}):
        labels = container.labels or {}
        owner = workspace.Owner.from_json(labels.get(OWNER_LABEL, ""))
        who = _abandoned(owner, container.attrs.get("Created", ""))
        if who is None:
            continue
        try:
            remove(client, container.name)
        except Exception as exc:
            line = f"could not remove container {container.name} left by {who}: {exc}"
        else:
            line = f"removed container {container.name} ({labels.get(KIND_LABEL)}) left by {who}"
        say(line)
        done.append(line)
    return done


def _abandoned(owner: workspace.Owner | None, created: str) -> str | None:
    if owner is not None and owner.on_this_host():
        return owner.describe() if owner.provably_dead() else None
    with contextlib.suppress(ValueError):
        when = datetime.fromisoformat(created[:26].rstrip("Z") + "+00:00")
        if datetime.now(UTC) - when > MAX_AGE:
            return f"a run of {when:%Y-%m-%d %H:%M}Z, more than a day ago"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ------------------------------------------------------------------ the drill's sandbox


@dataclass
class ContainerSandbox:
    """A running sandbox container: where to connect, and what the evidence names."""

    endpoint: Endpoint
    image: str
    image_id: str
    container_id: str
    name: str
    start_seconds: float
    swept: list[str] = field(default_factory=list)

    def evidence(self) -> dict[str, Any]:
        return {
            "kind": "container",
            "image": self.image,
            "image_id": self.image_id,
            "container": self.name,
            "container_id": self.container_id,
            "start_seconds": round(self.start_seconds, 3),
        }


@contextlib.contextmanager
def sandbox_container(
    name: str,
    pattern: str,
    major: int,
    *,
    network: str,
    timeout: float,
    settings: dict[str, str] | None = None,
) -> Iterator[ContainerSandbox]:
    """Start a PostgreSQL ``major`` container from ``pattern`` (testcontainers'
    PostgresContainer: POSTGRES_USER/PASSWORD/DB, a fresh cluster), wait for it (the
    server's ready line, then a connection from here), yield it, and remove it on every
    exit path. ``network="host"``: no port mapping, the server listens on a free port of
    the host (PGPORT), for engines without a bridge network. ``settings``: server settings
    (``postgres -c KEY=VALUE``, as the official image takes them)."""
    from testcontainers.core.config import testcontainers_config
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    key = f"databases.{name}.sandbox.container"
    client = engine(key)
    swept = sweep(client)
    image = image_for(pattern, major)
    image_id = ensure_image(client, image, key)
    testcontainers_config.ryuk_disabled = True  # see the module docstring
    password = register(_secrets.token_urlsafe(24))
    cname = new_name("sandbox")
    box = _Postgres(image, username=SANDBOX_USER, password=password, dbname="postgres")
    box.with_name(cname)
    if settings:
        box.with_command(["postgres", *(f"-c{key}={value}" for key, value in settings.items())])
    kwargs: dict[str, Any] = {"labels": owner_labels("drill-sandbox")}
    port = 0
    if network == "host":
        port = _free_port()
        box.ports = {}
        box.with_env("PGPORT", str(port))
        kwargs["network_mode"] = "host"
    box.with_kwargs(**kwargs)
    box.waiting_for(
        LogMessageWaitStrategy(READY_LINE)
        .with_startup_timeout(timedelta(seconds=timeout))
        .with_poll_interval(0.1)
    )
    started = time.monotonic()
    try:
        try:
            box.start()
            host = "127.0.0.1" if network == "host" else box.get_container_host_ip()
            if network != "host":
                port = box.get_exposed_port(5432)
            endpoint = Endpoint(
                f"sandbox container for {name}",
                {
                    "host": host,
                    "port": port,
                    "user": SANDBOX_USER,
                    "dbname": "postgres",
                    "connect_timeout": 10,
                },
                password,
                settings=f"{key} = {pattern!r} ({image})",
            )
            _wait_connectable(endpoint, box, timeout - (time.monotonic() - started))
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise ConfigError(
                f"{key}: container {image} did not start a PostgreSQL server (within "
                f"{timeout:g}s): {_first_line(exc)}{_log_tail(box)} (fix: check that the "
                "image behaves like the official postgres image: POSTGRES_USER, "
                "POSTGRES_PASSWORD, POSTGRES_DB, and its ready log line)"
            ) from None
        yield ContainerSandbox(
            endpoint,
            image,
            image_id,
            box.get_container_id(),
            cname,
            time.monotonic() - started,
            swept,
        )
    finally:
        with workspace.shielded():
            try:
                remove(client, cname)
            except Exception as exc:
                workspace.say_on_stderr(
                    f"the drill's sandbox container {cname} was not removed: {_first_line(exc)} "
                    f"(fix: docker rm -f {cname}; the next drill removes it once this run is gone)"
                )
            with contextlib.suppress(Exception):
                client.close()


def _log_tail(box: Any) -> str:
    with contextlib.suppress(Exception):
        out, err = box.get_logs()
        tail = (out + err).decode(errors="replace").strip()[-600:]
        return f"; its log ends: {tail}" if tail else ""
    return ""


def _wait_connectable(endpoint: Endpoint, box: Any, timeout: float) -> None:
    """The ready line can come from an image's initialisation server (the official image
    starts one on a socket only): ready means a connection from here succeeds."""
    from opsdrill.errors import TargetUnreachable

    deadline = time.monotonic() + max(timeout, 1.0)
    while True:
        try:
            with endpoint.connect(autocommit=True) as conn:
                conn.execute("SELECT 1")
            return
        except TargetUnreachable:
            box.reload()
            if box.status not in ("created", "running", "restarting"):
                raise RuntimeError(f"the container exited ({box.status})") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _postgres_container_class() -> type[Any]:
    from testcontainers.community.postgres import PostgresContainer

    class Postgres(PostgresContainer):
        """PostgresContainer, made ready by ``_wait_connectable`` instead of its psql
        inside the container (which needs psql there and polls once a second)."""

        def _connect(self) -> None:
            return None

    return Postgres


def _Postgres(image: str, **kw: Any) -> Any:  # a class, built lazily
    return _postgres_container_class()(image, driver=None, **kw)
