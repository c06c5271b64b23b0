"""The original runbook's backup and restore, as a peer of opsdrill in bench_backup.py.

The seed's runbook scripts are described as "pg_dump -> gzip -> optional GPG -> mc
upload" (pg-backup.sh) and a restore that downloads, decrypts, gunzips and runs
``pg_restore`` into a fresh database, then diffs row counts (restore.sh --drill). They name
the tools and no flags, so each tool runs at its defaults: ``pg_dump -Fc`` (custom format,
which the restore's ``pg_restore`` needs, with its own default compression),
``gzip`` (level 6), ``gpg --encrypt`` (with its default compression). ``mc pipe`` is not
installable here; ``rclone rcat`` streams stdin into a multipart upload the same way, and
``rclone cat`` streams the object back. Both halves stream (no temporary file), which only
helps the peer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from peers.backup_stack import RUNBOOK_BUCKET, verify_counts

DUMP_ARGS = ["-Fc"]  # the runbook names pg_dump only: custom format, default compression
GZIP_ARGS = ["gzip"]  # default level (6)
RESTORE_ARGS = ["--exit-on-error", "--no-owner", "--no-privileges"]  # single job
REMOTE = "offsite"


def missing() -> str | None:
    """The SKIP line when a tool of this peer is not installed, else None."""
    for tool, package in (("rclone", "rclone"), ("gzip", "gzip"), ("gpg", "gnupg")):
        if shutil.which(tool) is None:
            return f"SKIP runbook pipeline: {tool} not installed (apt-get install {package})"
    return None


def _run(script: str, env: dict[str, str], what: str) -> float:
    """A bash pipeline with pipefail: any stage failing fails the operation."""
    started = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail; " + script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {proc.stderr.decode()[-800:]}")
    return seconds


class Runbook:
    """gpg home with the stack's backup key pair (public to encrypt, secret to decrypt)
    and an rclone remote for the off-site moto, all under ``base``."""

    def __init__(
        self,
        base: Path,
        bindir: Path,
        *,
        fingerprint: str,
        public_key: Path,
        secret_key: Path,
        passphrase: str,
        s3_port: int,
        access_key: str,
        secret_access_key: str,
    ) -> None:
        self.base = base
        self.bindir = bindir
        self.fingerprint = fingerprint
        self.home = base / "gnupg"
        self.home.mkdir(parents=True, mode=0o700)
        self.passfile = base / "passphrase"
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(passphrase + "\n")
        gpg = ["gpg", "--homedir", str(self.home), "--batch", "--no-tty", "--quiet"]
        gpg += ["--pinentry-mode", "loopback", "--passphrase-file", str(self.passfile)]
        for key in (public_key, secret_key):
            subprocess.run(
                [*gpg, "--import", str(key)],
                check=True,
                capture_output=True,
            )
        rclone_conf = base / "rclone.conf"  # empty: the remote comes from the environment
        rclone_conf.touch(mode=0o600)
        self.rclone_env = {
            "RCLONE_CONFIG": str(rclone_conf),
            f"RCLONE_CONFIG_{REMOTE.upper()}_TYPE": "s3",
            f"RCLONE_CONFIG_{REMOTE.upper()}_PROVIDER": "Other",
            f"RCLONE_CONFIG_{REMOTE.upper()}_ENV_AUTH": "false",
            f"RCLONE_CONFIG_{REMOTE.upper()}_ACCESS_KEY_ID": access_key,
            f"RCLONE_CONFIG_{REMOTE.upper()}_SECRET_ACCESS_KEY": secret_access_key,
            f"RCLONE_CONFIG_{REMOTE.upper()}_ENDPOINT": f"http://127.0.0.1:{s3_port}",
            f"RCLONE_CONFIG_{REMOTE.upper()}_REGION": "us-east-1",
            f"RCLONE_CONFIG_{REMOTE.upper()}_FORCE_PATH_STYLE": "true",
        }

    def _env(self, pg_env: dict[str, str]) -> dict[str, str]:
        env = {**pg_env, **self.rclone_env}
        env.pop("AWS_CA_BUNDLE", None)  # rclone refuses a plain-HTTP endpoint with it set
        return env

    def _gpg(self) -> str:
        return f"gpg --homedir {self.home} --batch --no-tty --quiet"

    def backup(self, key: str, live_env: dict[str, str]) -> float:
        """``pg_dump | gzip | gpg | rclone rcat`` of the live database (PGDATABASE)."""
        dump = " ".join([str(self.bindir / "pg_dump"), *DUMP_ARGS])
        encrypt = f"{self._gpg()} --trust-model always --recipient {self.fingerprint} --encrypt"
        upload = f"rclone rcat {REMOTE}:{RUNBOOK_BUCKET}/{key}"
        script = f"{dump} | {' '.join(GZIP_ARGS)} | {encrypt} | {upload}"
        return _run(script, self._env(live_env), "runbook backup")

    def restore(
        self,
        key: str,
        scratch: str,
        sandbox_env: dict[str, str],
        restored_conninfo: str,
        live_conninfo: str,
    ) -> float:
        """createdb, ``rclone cat | gpg -d | gunzip | pg_restore`` (one job), the row
        counts of every table against live, dropdb: the runbook's drill."""
        started = time.perf_counter()
        env = self._env(sandbox_env)
        _run(f"{self.bindir / 'createdb'} -T template0 {scratch}", env, "createdb")
        decrypt = (
            f"{self._gpg()} --pinentry-mode loopback --passphrase-file {self.passfile} --decrypt"
        )
        restore = " ".join([str(self.bindir / "pg_restore"), *RESTORE_ARGS, "-d", scratch])
        script = f"rclone cat {REMOTE}:{RUNBOOK_BUCKET}/{key} | {decrypt} | gunzip | {restore}"
        try:
            _run(script, env, "runbook restore")
            verify_counts(restored_conninfo, live_conninfo)
        finally:
            _run(f"{self.bindir / 'dropdb'} --force --if-exists {scratch}", env, "dropdb")
        return time.perf_counter() - started

    def close(self) -> None:
        """Stop the gpg-agent the decryption started."""
        subprocess.run(
            ["gpgconf", "--homedir", str(self.home), "--kill", "all"],
            capture_output=True,
            check=False,
        )

    def versions(self) -> dict[str, str]:
        out = {}
        for tool in ("gzip", "gpg", "rclone"):
            proc = subprocess.run([tool, "--version"], capture_output=True, text=True)
            out[tool] = (proc.stdout or proc.stderr).splitlines()[0].strip()
        return out
