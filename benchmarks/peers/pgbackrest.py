"""pgBackRest as a peer of opsdrill in bench_backup.py: full backups of the live cluster
to an S3 repository on the stack's off-site moto, and optionally to a posix repository
on local disk, and restores of them that are verified like a drill.

pgBackRest 2.45 speaks only HTTPS to S3, so a local stunnel terminates TLS in front of
moto (``repo1-storage-verify-tls=n``, path-style URIs). WAL archiving must be on:
``ALTER SYSTEM`` sets archive_mode/archive_command on the live server, which is then
restarted (the stack is thrown away afterwards). Settings: zstd (pgBackRest's default
level), aes-256-cbc, ``start-fast=y``, ``process-max=2`` (the machine's cores, as
opsdrill's zstd -T0 and pg_restore -j2 use both).

A restore goes into a fresh data directory with ``--archive-mode=off`` (the copy must not
push WAL into the repository), starts a postgres on a free port, waits for recovery to
end, counts every table against live as the drill does, stops it and removes it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from peers.backup_stack import PGBACKREST_BUCKET, cpu_seconds, record_pid, verify_counts
from psycopg import sql

from opsdrill_stack.postgres import SERVICE_USER, SUPERUSER
from opsdrill_stack.procs import as_service_user, chown_to, free_port, port_open, stop_pid

STANZA = "crm"
PROCESS_MAX = 2
S3_REPO, POSIX_REPO = 1, 2


def missing() -> dict[str, str | None]:
    """SKIP lines per repository kind ('s3', 'posix'), None where it can run."""
    if shutil.which("pgbackrest") is None:
        line = "SKIP pgBackRest: pgbackrest not installed (apt-get install pgbackrest)"
        return {"s3": line, "posix": line}
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    return {
        "s3": None
        if stunnel
        else "SKIP pgBackRest (S3): stunnel not installed (apt-get install stunnel4)",
        "posix": None,
    }


def _run(
    argv: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 3600
) -> str:
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}"
        )
    return proc.stdout


class TlsTerminator:
    """stunnel on a free port in front of moto, with a throwaway self-signed certificate."""

    def __init__(self, base: Path, backend_port: int, debug: int = 3) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        cert, key = base / "cert.pem", base / "key.pem"
        # moto answers every request with "Connection: close", so each S3 request is a new
        # TLS handshake here: an ECDSA key keeps that cost, a local artefact, small.
        req = ["openssl", "req", "-x509", "-newkey", "ec", "-nodes", "-days", "1"]
        req += ["-pkeyopt", "ec_paramgen_curve:prime256v1"]
        _run([*req, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], "openssl")
        self.port = free_port()
        conf = base / "stunnel.conf"
        conf.write_text(
            f"foreground = yes\npid =\ndebug = {debug}\n"
            f"[s3]\naccept = 127.0.0.1:{self.port}\nconnect = 127.0.0.1:{backend_port}\n"
            f"cert = {cert}\nkey = {key}\n"
        )
        exe = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"
        with (base / "stunnel.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [exe, str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stunnel did not start; see {base / 'stunnel.log'}")
            time.sleep(0.05)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_pid(self.proc.pid)
        self.proc.wait(timeout=10)


class PgBackRest:
    """One stanza over the live cluster; repo1 on S3 (through ``tls``), repo2 posix."""

    def __init__(
        self,
        base: Path,
        bindir: Path,
        *,
        stack: Any,
        live_password: str,
        s3_port: int | None,
        access_key: str,
        secret_key: str,
    ) -> None:
        self.base = base
        self.bindir = bindir
        self.stack = stack
        live = stack.state["components"]["pg_live"]
        self.live_base = Path(live["base"])
        self.datadir = self.live_base / "data"
        self.live_port = int(live["port"])
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env["PGPASSWORD"] = live_password
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        self.posix_repo = base / "repo-posix"
        self.restores = base / "restores"
        for sub in ("log", "lock", "spool", "restores"):
            (base / sub).mkdir(exist_ok=True)
            chown_to(base / sub, SERVICE_USER)
        self.conf = base / "pgbackrest.conf"
        self.tls = TlsTerminator(base / "tls", s3_port) if s3_port else None
        try:
            self._write_conf(access_key, secret_key)
            self._enable_archiving()
        except BaseException:
            self.close()
            raise

    def _write_conf(self, access_key: str, secret_key: str) -> None:
        lines = ["[global]"]
        if self.tls is not None:
            lines += [
                "repo1-type=s3",
                "repo1-path=/pgbackrest",
                f"repo1-s3-bucket={PGBACKREST_BUCKET}",
                "repo1-s3-endpoint=127.0.0.1",
                f"repo1-storage-port={self.tls.port}",
                "repo1-s3-region=us-east-1",
                f"repo1-s3-key={access_key}",
                f"repo1-s3-key-secret={secret_key}",
                "repo1-s3-uri-style=path",
                "repo1-storage-verify-tls=n",
                "repo1-cipher-type=aes-256-cbc",
                f"repo1-cipher-pass={secrets.token_hex(24)}",
                "repo1-retention-full=2",
            ]
        lines += [
            "repo2-type=posix",
            f"repo2-path={self.posix_repo}",
            "repo2-cipher-type=aes-256-cbc",
            f"repo2-cipher-pass={secrets.token_hex(24)}",
            "repo2-retention-full=2",
            "compress-type=zst",
            f"process-max={PROCESS_MAX}",
            "start-fast=y",
            f"log-path={self.base / 'log'}",
            f"lock-path={self.base / 'lock'}",
            f"spool-path={self.base / 'spool'}",
            "log-level-console=warn",
            "",
            f"[{STANZA}]",
            f"pg1-path={self.datadir}",
            f"pg1-port={self.live_port}",
            f"pg1-socket-path={self.live_base / 'run'}",
            f"pg1-user={SUPERUSER}",
        ]
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:  # holds the S3 key and the cipher passes
            fh.write("\n".join(lines) + "\n")
        chown_to(self.conf, SERVICE_USER)

    def _pgbackrest(self, *args: str, timeout: float = 3600) -> str:
        argv = ["pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", *args]
        return _run(
            as_service_user(argv, SERVICE_USER), f"pgbackrest {args[-1]}", self.env, timeout
        )

    def _pg_ctl(self, *args: str) -> None:
        _run(as_service_user([str(self.bindir / "pg_ctl"), *args], SERVICE_USER), "pg_ctl")

    def _live(self) -> psycopg.Connection[Any]:
        conninfo = f"host=127.0.0.1 port={self.live_port} user={SUPERUSER} dbname=postgres"
        return psycopg.connect(
            conninfo, password=self.env["PGPASSWORD"], autocommit=True, connect_timeout=10
        )

    def _enable_archiving(self) -> None:
        command = f"pgbackrest --config={self.conf} --stanza={STANZA} archive-push %p"
        with self._live() as conn:
            conn.execute("ALTER SYSTEM SET archive_mode = on")
            conn.execute(
                sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(command))
            )
        # -l: the server must not inherit our stdout; its options come from postmaster.opts
        log = self.live_base / "postgres.log"
        self._pg_ctl("-D", str(self.datadir), "-l", str(log), "-m", "fast", "-w", "restart")
        pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        record_pid(self.stack, "pg_live", pid)

    def reset_repos(self) -> None:
        """Fresh repositories (the S3 one is gone with the restarted moto): stanza-create.
        Setup, as an operator does once; not measured."""
        shutil.rmtree(self.posix_repo, ignore_errors=True)
        self.posix_repo.mkdir()
        chown_to(self.posix_repo, SERVICE_USER)
        self._pgbackrest("stanza-create")

    def backup(self, repo: int) -> float:
        started = time.perf_counter()
        self._pgbackrest(f"--repo={repo}", "--type=full", "backup")
        return time.perf_counter() - started

    def repo_bytes(self, repo: int) -> int:
        """Bytes the newest backup occupies in the repository (compressed, encrypted)."""
        out = self._pgbackrest(f"--repo={repo}", "--output=json", "info")
        backups = json.loads(out)[0]["backup"]
        return int(backups[-1]["info"]["repository"]["size"]) if backups else 0

    def restore(self, repo: int, live_conninfo: str) -> float:
        """Restore, start, wait for the end of recovery, verify the counts, stop, remove."""
        started = time.perf_counter()
        target = self.restores / f"repo{repo}"
        data, sock = target / "data", target / "run"
        for d in (target, data, sock):
            d.mkdir()
            chown_to(d, SERVICE_USER)
        data.chmod(0o700)
        try:
            self._pgbackrest(
                f"--repo={repo}", f"--pg1-path={data}", "--archive-mode=off", "restore"
            )
            port = free_port()
            opts = f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={sock}"
            log = target / "postgres.log"
            self._pg_ctl("-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "1800", "start")
            conninfo = (
                f"host=127.0.0.1 port={port} user={SUPERUSER} dbname=crm "
                f"password={self.env['PGPASSWORD']}"
            )
            self._wait_promoted(conninfo, log)
            verify_counts(conninfo, live_conninfo)
            self._pg_ctl("-D", str(data), "-m", "fast", "-w", "-t", "120", "stop")
        finally:
            pidfile = data / "postmaster.pid"  # still there: the server did not stop cleanly
            if pidfile.exists():
                stop_pid(int(pidfile.read_text().split()[0]), group=False)
            shutil.rmtree(target, ignore_errors=True)
        return time.perf_counter() - started

    @staticmethod
    def _wait_promoted(conninfo: str, log: Path, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(conninfo, connect_timeout=5) as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                    if row is not None and not row[0]:
                        return
            except psycopg.OperationalError:
                pass  # starting up, or not consistent yet
            time.sleep(0.1)
        tail = log.read_text()[-1000:] if log.exists() else ""
        raise RuntimeError(f"restored cluster did not finish recovery:\n{tail}")

    def close(self) -> None:
        """Pause archiving first (an empty archive_command, on reload): otherwise the live
        server's shutdown waits on an archive-push to a repository that is gone."""
        try:
            with self._live() as conn:
                conn.execute("ALTER SYSTEM SET archive_command = ''")
                conn.execute("SELECT pg_reload_conf()")
        except psycopg.Error:
            pass  # the server is down already
        if self.tls is not None:
            self.tls.stop()

    def cpu(self) -> float:
        """The TLS terminator's CPU (S3 server side: a remote endpoint would pay it)."""
        return self.tls.cpu() if self.tls is not None else 0.0

    @staticmethod
    def version() -> str:
        return _run(["pgbackrest", "version"], "pgbackrest version").strip()
