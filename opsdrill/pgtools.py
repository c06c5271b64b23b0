"""Which pg_dump / pg_restore a job runs: chosen by the server's PostgreSQL major.

pg_dump refuses a server newer than itself ("server version mismatch"), and pg_restore
cannot read an archive a newer pg_dump wrote. The server's major is read first (the backup
in its snapshot; a restore or drill from the manifest), then the first of these with tools
of that major or newer is used:

1. ``databases.NAME.pg_bin_dir`` (the inventory);
2. Debian's ``/usr/lib/postgresql/N/bin``, the smallest N at least the server's;
3. the tool on PATH;
4. a container of the server's major (``databases.NAME.tools_container``, by default
   ``postgres:{major}``), when a Docker engine answers;

else a ConfigError (exit 2), before any work, naming the major and how to install it. The
manifest records the tool used, its version and where it came from (``tools``).
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from opsdrill.config.inventory import Inventory
from opsdrill.errors import ConfigError

DEBIAN_ROOT = Path("/usr/lib/postgresql")
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
VERSION_SECONDS = 60  # a first `docker run` of an image can take a while on a slow disk


@dataclass
class PgTools:
    """Client tools of one PostgreSQL major: installed (``bindir``) or in a container
    (``image``). ``close()`` removes the containers ``argv`` named."""

    major: int
    source: str  # where they come from, in the operator's words
    tool: str
    bindir: Path | None = None
    image: str | None = None
    image_id: str | None = None
    _version: str | None = None  # the tool's own --version line; asked when first needed
    _names: list[str] = field(default_factory=list, repr=False)

    @property
    def version(self) -> str:
        if self._version is None:
            found = installed_version(str(self.bindir / self.tool)) if self.bindir else None
            self._version = found or f"{self.tool} (PostgreSQL) {self.major}"
        return self._version

    def argv(
        self,
        tool: str,
        env: dict[str, str] | None = None,
        *,
        stdin: bool = False,
        files: tuple[Path, ...] = (),
    ) -> list[str]:
        """The command line running ``tool``. In a container: on the host's network (it
        reaches what this host reaches), the libpq variables of ``env`` passed by name
        (values never in argv), ``files`` mounted read-only at the same path."""
        if self.bindir is not None:
            return [str(self.bindir / tool)]
        from opsdrill.containers import KIND_LABEL, OWNER_LABEL, new_name, owner_labels

        assert self.image is not None
        name = new_name("tools")
        self._names.append(name)
        labels = owner_labels("tools")
        argv = ["docker", "run", "--rm", "--network", "host", "--log-driver", "none"]
        argv += ["--name", name, "--label", f"{OWNER_LABEL}={labels[OWNER_LABEL]}"]
        argv += ["--label", f"{KIND_LABEL}={labels[KIND_LABEL]}"]
        argv += ["-i"] if stdin else []
        for var in sorted(env or {}):
            if var.startswith("PG"):
                argv += ["-e", var]
        for path in files:
            argv += ["-v", f"{path}:{path}:ro"]
        return [*argv, self.image, tool]

    def close(self) -> None:
        """Remove what a stopped pipeline left running in the engine (a killed `docker
        run` client does not stop its container)."""
        if not self._names:
            return
        from opsdrill.containers import engine_answers, remove

        names, self._names = self._names, []
        if not engine_answers():
            return  # the sweep of the next run removes them
        import docker

        client = docker.from_env(timeout=30)
        try:
            for name in names:
                with contextlib.suppress(Exception):
                    remove(client, name)
        finally:
            client.close()

    def manifest_entries(self, tool: str) -> dict[str, str]:
        """What the manifest's ``tools`` records: the version and where it came from."""
        where = self.source + (f" (image id {self.image_id})" if self.image_id else "")
        return {tool: self.version, f"{tool}_from": where}


def major_of(version_num: object) -> int | None:
    """PostgreSQL's major from server_version_num (160002 -> 16, 90624 -> 9)."""
    if not isinstance(version_num, int) or version_num <= 0:
        return None
    return version_num // 10000 if version_num >= 100000 else version_num // 100


def major_of_version(line: str) -> int | None:
    """The major of a ``--version`` line: "pg_dump (PostgreSQL) 16.2" -> 16."""
    found = _VERSION.search(line)
    return int(found[1]) if found else None


@functools.lru_cache(maxsize=64)
def installed_version(exe: str) -> str | None:
    """``exe --version``'s line, None if it does not run."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    line = (out.stdout or out.stderr).strip().splitlines()
    return line[0] if out.returncode == 0 and line else None


def for_database(
    inv: Inventory, name: str, server_major: int | None, tool: str, *, why: str
) -> PgTools:
    """The tools for ``databases.NAME``: ``server_major`` is the server's major (None:
    unknown, then the newest installed); ``why`` says whose major it is, for messages."""
    db = inv.database(name)
    bin_dir = str(inv.resolve_path(db.pg_bin_dir)) if db.pg_bin_dir else None
    return choose(
        server_major,
        tool,
        key=f"databases.{name}",
        pg_bin_dir=bin_dir,
        container=db.tools_container,
        why=why,
    )


def choose(
    server_major: int | None,
    tool: str,
    *,
    key: str,
    pg_bin_dir: str | None,
    container: str,
    why: str,
) -> PgTools:
    """The rule of the module docstring; ``key`` is the inventory section to blame."""
    found: list[PgTools] = []
    if pg_bin_dir:
        exe = Path(pg_bin_dir) / tool
        version = installed_version(str(exe))
        if version is None:
            raise ConfigError(
                f"{key}.pg_bin_dir: {exe} does not exist or does not run (fix: set it to "
                "the bin directory of PostgreSQL client tools, e.g. /usr/lib/postgresql/16/bin)"
            )
        found.append(_installed(exe, version, f"{key}.pg_bin_dir {pg_bin_dir}", tool))
    for exe in sorted(DEBIAN_ROOT.glob(f"*/bin/{tool}"), key=_debian_major):
        # Debian's path names the major: no process is run to choose (its version line is
        # read when the manifest or the report needs it).
        if _debian_major(exe) and exe.is_file():
            found.append(PgTools(_debian_major(exe), f"Debian's {exe.parent}", tool, exe.parent))
    on_path = shutil.which(tool)
    matched = server_major is not None and any(t.major >= server_major for t in found)
    if on_path and not matched:  # asked only when needed: it runs the tool
        version = installed_version(on_path)
        if version is not None:
            found.append(_installed(Path(on_path), version, f"{on_path} (PATH)", tool))
    if server_major is None:  # unknown: the configured ones, else the newest installed
        if found:
            return found[0] if pg_bin_dir else max(found, key=lambda t: t.major)
    else:
        for tools in found:
            if tools.major >= server_major:
                return tools
    seen = [f"PostgreSQL {t.major} from {t.source}" for t in found]
    wanted = server_major or 0
    if container and wanted:
        from opsdrill.containers import engine_answers

        if engine_answers():
            try:
                return _in_container(container, wanted, tool, key)
            except ConfigError as exc:  # say first what is missing, then why no container
                raise ConfigError(
                    f"{_missing(tool, key, wanted, why, seen)}; nothing was done; the "
                    f"container fallback failed too: {exc.message}"
                ) from None
        seen.append(f"no Docker engine answers for {key}.tools_container = {container!r}")
    raise ConfigError(_none_match(tool, key, server_major, why, seen, container))


def _installed(exe: Path, version: str, source: str, tool: str) -> PgTools:
    return PgTools(major_of_version(version) or 0, source, tool, exe.parent, _version=version)


def _debian_major(exe: Path) -> int:
    try:
        return int(exe.parent.parent.name)
    except ValueError:
        return 0


def _in_container(pattern: str, major: int, tool: str, key: str) -> PgTools:
    """Tools in the image of ``major``, proven by running ``tool --version`` in it."""
    from opsdrill.containers import engine, ensure_image, image_for, sweep

    setting = f"{key}.tools_container"
    if shutil.which("docker") is None:
        raise ConfigError(
            f"{setting}: a Docker engine answers but the docker command is not installed "
            "(fix: apt-get install docker.io, or docker-ce-cli)"
        )
    client = engine(setting)
    try:
        sweep(client)  # what killed runs left: removed and said before this one starts
        image = image_for(pattern, major)
        image_id = ensure_image(client, image, setting)
    finally:
        client.close()
    try:
        out = subprocess.run(
            ["docker", "run", "--rm", "--network", "host", image, tool, "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{setting}: `{tool} --version` in {image} did not answer") from None
    version = (out.stdout or "").strip().splitlines()
    tools_major = major_of_version(version[0]) if out.returncode == 0 and version else None
    if tools_major is None or tools_major < major:
        raise ConfigError(
            f"{setting}: {image} has no {tool} of PostgreSQL {major} or newer (it said: "
            f"{(out.stdout + out.stderr).strip()[:200] or 'nothing'}) (fix: a pattern whose "
            "{major} selects the major, e.g. postgres:{major})"
        )
    return PgTools(
        tools_major, f"container {image}", tool, image=image, image_id=image_id, _version=version[0]
    )


def _missing(tool: str, key: str, major: int, why: str, seen: list[str]) -> str:
    found = "; ".join(seen) or "none installed"
    return (
        f"{key}: {why} runs PostgreSQL {major}, and no {tool} of PostgreSQL {major} or newer "
        f"is available ({found})"
    )


def _none_match(
    tool: str, key: str, major: int | None, why: str, seen: list[str], container: str
) -> str:
    found = "; ".join(seen) or "none installed"
    if major is None:
        return (
            f"{key}: {tool} not found ({found}) (fix: apt-get install postgresql-client, or set "
            f"{key}.pg_bin_dir to the bin directory of PostgreSQL client tools)"
        )
    docker = (
        f", or run a Docker engine (DOCKER_HOST) so that opsdrill runs {tool} in "
        f"{container.replace('{major}', str(major))} ({key}.tools_container)"
        if container
        else f" (container tools are off: {key}.tools_container is empty)"
    )
    return (
        f"{_missing(tool, key, major, why, seen)}; nothing was done (fix: install PostgreSQL "
        f"{major} client tools (apt-get install postgresql-client-{major}, from "
        f"apt.postgresql.org on Debian and Ubuntu), or set {key}.pg_bin_dir to their bin "
        f"directory{docker})"
    )
