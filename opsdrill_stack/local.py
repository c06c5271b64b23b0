"""The local stack: every server started, recorded and stopped (``LocalStack``), and
primed with the real operations (``prime``).

``LocalStack.up()`` starts every server (a ``daemon.Daemon`` each), writes
``DIR/inventory.toml`` (plus a 0600 ``DIR/secrets.env`` it points at) and records PIDs in
``DIR/stack.json`` so that ``down()`` from another process stops exactly what was
started. Server kinds are listed in one place (``COMPONENT_KINDS``): a new daemon
subclasses ``Daemon`` and registers its kind there. The DNS
server (Knot) serves the demo mail-authentication zones of ``demo_dns``; tests edit its
records at runtime through ``LocalStack.knot()`` and put them back with ``restore_all()``.
The mail servers (``mail``: Dovecot, OpenDKIM, Postfix, spamd), Redis with the BullMQ
email queue and the stand-in application come next; their test switches are on the
objects ``LocalStack.postfix()``, ``dovecot()``, ``opendkim()``, ``demo_app()`` and
``email_queue()`` return.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from opsdrill.config.envfile import read_env_file
from opsdrill_stack import demo_dns, mail
from opsdrill_stack.daemon import Daemon
from opsdrill_stack.demo_app import DemoApp, app_env_lines
from opsdrill_stack.dovecot import Dovecot
from opsdrill_stack.gnupg_keys import generate_keypair
from opsdrill_stack.knot import KnotServer
from opsdrill_stack.opendkim import OpenDkim
from opsdrill_stack.postfix import Postfix
from opsdrill_stack.postgres import SUPERUSER, PgCluster
from opsdrill_stack.procs import pid_alive
from opsdrill_stack.redis_queue import BullQueue, RedisServer
from opsdrill_stack.s3server import S3Server
from opsdrill_stack.spamd import Spamd

T = TypeVar("T")
STATE_FILE = "stack.json"
INVENTORY_FILE = "inventory.toml"
SECRETS_FILE = "secrets.env"
DEMO_DB = "crm"
BUCKET = "opsdrill-offsite"
FILES_BUCKET = "crm-files"
FILES_MIRROR_BUCKET = "crm-files-mirror"
FILES_RESTORE_BUCKET = "crm-files-restored"


def _secret(label: str) -> str:
    # Recognisable prefix lets leak tests scan output for any stack secret.
    return f"opsdrill-{label}-{secrets.token_hex(12)}"


COMPONENT_KINDS: dict[str, type[Daemon]] = {
    "postgres": PgCluster,
    "s3": S3Server,
    "knot": KnotServer,
    "dovecot": Dovecot,
    "opendkim": OpenDkim,
    "postfix": Postfix,
    "spamd": Spamd,
    "redis": RedisServer,
    "demo_app": DemoApp,
}
MailTables = dict[str, Any]


def _check_traversable(base: Path) -> None:
    """PostgreSQL runs as ``postgres``: every parent directory must let it pass."""
    if os.geteuid() != 0:
        return
    for parent in base.resolve().parents:
        if not parent.stat().st_mode & 0o001:
            raise RuntimeError(
                f"the postgres user cannot traverse {parent} (mode "
                f"{parent.stat().st_mode & 0o777:o}); fix: use a stack directory under /tmp "
                "or chmod o+x that directory"
            )


@dataclass
class LocalStack:
    """``pg_bindir``: the PostgreSQL binaries of the live and sandbox servers ('' =
    Debian's, 15); e.g. ``postgres.pgserver_bindir()`` for 16, a major newer than the
    host's client tools. The inventory then names it as the databases' ``pg_bin_dir``."""

    base: Path
    size_mb: int = 8
    state: dict[str, Any] = field(default_factory=dict)
    pg_bindir: str = ""

    @property
    def inventory_path(self) -> Path:
        return self.base / INVENTORY_FILE

    # -- lifecycle ---------------------------------------------------------------
    def up(self) -> Path:
        if (self.base / STATE_FILE).exists() and self.load_state() and self.any_running():
            raise RuntimeError(f"a stack is already running in {self.base} (opsdrill stack down)")
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # the postgres user must traverse into it
        _check_traversable(self.base)
        started = time.monotonic()
        creds = {
            "OPSDRILL_LIVE_PG_PASSWORD": _secret("livepg"),
            "OPSDRILL_SANDBOX_PG_PASSWORD": _secret("sandboxpg"),
            "OPSDRILL_OFFSITE_ACCESS_KEY": _secret("s3access"),
            "OPSDRILL_OFFSITE_SECRET_KEY": _secret("s3secret"),
            "OPSDRILL_LIVE_S3_ACCESS_KEY": _secret("lives3access"),
            "OPSDRILL_LIVE_S3_SECRET_KEY": _secret("lives3secret"),
            "OPSDRILL_GPG_PASSPHRASE": _secret("gpgpass"),
            **{user.password_env: _secret("mailbox") for user in mail.USERS},
            "OPSDRILL_REDIS_PASSWORD": _secret("redis"),
            "OPSDRILL_APP_TOKEN": _secret("apptoken"),
        }
        # SpamAssassin compiles its rules for a second or more: started first, waited for
        # last, so that time overlaps the other servers' start-up.
        spamd = Spamd("spamd", self.base / "spamd")
        live = PgCluster("live", self.base / "pg-live", bindir=self.pg_bindir)
        sandbox = PgCluster("sandbox", self.base / "pg-sandbox", bindir=self.pg_bindir)
        offsite = S3Server("offsite", self.base / "s3-offsite")
        live_s3 = S3Server("live", self.base / "s3-live")
        dns = KnotServer("dns", self.base / "knot")
        try:
            spamd.launch()
            self._record("spamd", spamd)
            live.init(creds["OPSDRILL_LIVE_PG_PASSWORD"])
            sandbox.init(creds["OPSDRILL_SANDBOX_PG_PASSWORD"])
            live.start()
            self._record("pg_live", live)
            sandbox.start()
            self._record("pg_sandbox", sandbox)
            offsite.start()
            self._record("s3_offsite", offsite)
            live_s3.start()
            self._record("s3_live", live_s3)
            dns.start(demo_dns.publish(self.base / "dkim").zones)
            self._record("dns", dns, config=str(dns.conf), zones=dns.zones())
            keys = generate_keypair(
                self.base / "gpg", "opsdrill backup", creds["OPSDRILL_GPG_PASSPHRASE"]
            )
            self._seed(live, creds["OPSDRILL_LIVE_PG_PASSWORD"])
            self._make_buckets(offsite, live_s3, creds)
            mail_tables = self._start_mail(creds, spamd)
            app_env = self.base / "app" / ".env"
            spamd.wait_ready()
        except BaseException:
            self.down()
            raise
        self._write_secrets(creds)
        self._write_inventory(live, sandbox, offsite, live_s3, keys, app_env, dns, mail_tables)
        self.state["started_seconds"] = round(time.monotonic() - started, 2)
        self.state["versions"] = {
            "postgresql": live.version(),
            "s3": offsite.version(),
            "dns": dns.version(),
            **self._mail_versions(),
        }
        self._save_state()
        return self.inventory_path

    def down(self) -> None:
        """Stop in reverse start order, then remove the directory's data."""
        self.load_state()
        for name in reversed(list(self.state.get("components", {}))):
            info = self.state["components"][name]
            comp = self._component(name, info)
            with contextlib.suppress(Exception):
                comp.stop()
        # From another process, a stopped daemon stays a zombie until PID 1 reaps it (up
        # to ~2 s here): wait once for all of them rather than once per server.
        pids = [info["pid"] for info in self.state.get("components", {}).values()]
        deadline = time.monotonic() + 5
        while any(pid and pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)
        self.state = {}

    def status(self) -> dict[str, str]:
        self.load_state()
        return {
            name: self._component(name, info).status()
            for name, info in self.state.get("components", {}).items()
        }

    def any_running(self) -> bool:
        return any(v == "running" for v in self.status().values())

    def knot(self) -> KnotServer:
        """The running DNS server, rebuilt from the recorded state, for runtime record edits.

        A test that edits records puts them back with ``restore_all()`` (or
        ``restore_zone``), since every test of the worker shares this server.
        """
        self.load_state()
        info = self.state.get("components", {}).get("dns")
        if info is None:
            raise RuntimeError(f"no DNS server recorded in {self.base / STATE_FILE}")
        return KnotServer(info["name"], Path(info["base"]), port=info["port"], pid=info["pid"])

    def postfix(self) -> Postfix:
        """Switches: ``defer_delivery()`` / ``restore_delivery()``, ``queue()``."""
        return self._rebuilt("postfix", Postfix)

    def dovecot(self) -> Dovecot:
        """Switches: ``file_into_junk()`` / ``stop_filing_into_junk()``."""
        return self._rebuilt("dovecot", Dovecot)

    def opendkim(self) -> OpenDkim:
        """Switches: ``disable_signing()`` / ``enable_signing()``."""
        return self._rebuilt("opendkim", OpenDkim)

    def spamd(self) -> Spamd:
        return self._rebuilt("spamd", Spamd)

    def demo_app(self) -> DemoApp:
        """Switches: ``set_redirect()`` / ``clear_redirect()``, ``omit_activation_link()``."""
        return self._rebuilt("demo_app", DemoApp)

    def redis(self) -> RedisServer:
        return self._rebuilt("redis", RedisServer)

    def email_queue(self) -> BullQueue:
        """The demo BullMQ email queue: ``add_waiting_jobs()`` / ``clear_waiting()``."""
        redis = self.redis()
        return BullQueue(redis.client(self.secrets()["OPSDRILL_REDIS_PASSWORD"]))

    def secrets(self) -> dict[str, str]:
        return read_env_file(self.base / SECRETS_FILE)

    # -- internals -----------------------------------------------------------------
    def _rebuilt(self, key: str, cls: type[T]) -> T:
        info = self.state.get("components", {}).get(key)
        if info is None:  # not started by this object: another process's stack
            info = self.load_state().get("components", {}).get(key)
        if info is None:
            raise RuntimeError(f"no {key} recorded in {self.base / STATE_FILE}")
        comp = self._component(key, info)
        assert isinstance(comp, cls)
        return comp

    def _start_mail(self, creds: dict[str, str], spamd: Spamd) -> MailTables:
        """Dovecot, OpenDKIM, Postfix (in that order: each uses the previous ones'
        sockets), Redis with the email queue, then the application that sends through
        them; returns the inventory sections describing them."""
        tls = mail.make_tls(self.base / "tls")
        users = {user.address: creds[user.password_env] for user in mail.USERS}
        dovecot = Dovecot("dovecot", self.base / "dovecot")
        dovecot.start(tls, users)
        self._record("dovecot", dovecot, imap_port=dovecot.imap_port)
        opendkim = OpenDkim("opendkim", self.base / "opendkim")
        opendkim.start(self.base / "dkim")
        self._record("opendkim", opendkim, socket=str(opendkim.socket))
        postfix = Postfix("postfix", self.base / "postfix")
        postfix.start(tls, dovecot.lmtp_socket, dovecot.auth_socket, opendkim.socket, users)
        self._record("postfix", postfix)
        redis = RedisServer("redis", self.base / "redis")
        redis.start(creds["OPSDRILL_REDIS_PASSWORD"])
        self._record("redis", redis)
        BullQueue(redis.client(creds["OPSDRILL_REDIS_PASSWORD"])).seed()
        app = DemoApp("demo_app", self.base / "app")
        smtp = app_env_lines(
            smtp_port=postfix.port,
            smtp_password=creds[mail.SENDER.password_env],
            api_token=creds["OPSDRILL_APP_TOKEN"],
        )
        app_env = self._write_app_env(smtp)
        app.start(ca_file=tls.cert)
        self._record("demo_app", app)
        return mail.inventory_tables(
            smtp_port=postfix.port,
            imaps_port=dovecot.port,
            spamd_port=spamd.port,
            redis_port=redis.port,
            app_port=app.port,
            ca_file=str(tls.cert.relative_to(self.base)),
            app_env_file=str(app_env.relative_to(self.base)),
        )

    def _mail_versions(self) -> dict[str, str]:
        versions = {}
        for key in ("postfix", "dovecot", "opendkim", "redis"):
            with contextlib.suppress(Exception):
                versions[key] = getattr(self, key)().version()
        return versions

    def _component(self, name: str, info: dict[str, Any]) -> Daemon:
        cls = COMPONENT_KINDS[info["kind"]]
        return cls(info["name"], Path(info["base"]), port=info["port"], pid=info["pid"])

    def _record(self, key: str, comp: Daemon, **extra: Any) -> None:
        """Record a started component; ``extra`` is for people and tests reading the state."""
        kind = next(k for k, cls in COMPONENT_KINDS.items() if isinstance(comp, cls))
        self.state.setdefault("components", {})[key] = {
            "kind": kind,
            "name": comp.name,
            "base": str(comp.base),
            "port": comp.port,
            "pid": comp.pid,
            **extra,
        }
        self._save_state()

    def _save_state(self) -> None:
        (self.base / STATE_FILE).write_text(json.dumps(self.state, indent=2))

    def load_state(self) -> dict[str, Any]:
        path = self.base / STATE_FILE
        if path.exists():
            self.state = json.loads(path.read_text())
        return self.state

    def _seed(self, live: PgCluster, password: str) -> None:
        import psycopg

        from opsdrill_stack.demo_crm import create_demo_crm

        kw = {
            "host": "127.0.0.1",
            "port": live.port,
            "user": SUPERUSER,
            "password": password,
            "connect_timeout": 10,
        }
        with psycopg.connect(dbname="postgres", autocommit=True, **kw) as conn:  # type: ignore[arg-type]
            conn.execute(f"CREATE DATABASE {DEMO_DB}")
        with psycopg.connect(dbname=DEMO_DB, **kw) as conn:  # type: ignore[arg-type]
            create_demo_crm(conn, size_mb=self.size_mb)

    def _make_buckets(self, offsite: S3Server, live_s3: S3Server, creds: dict[str, str]) -> None:
        from minio import Minio
        from minio.commonconfig import ENABLED
        from minio.versioningconfig import VersioningConfig

        from opsdrill_stack.demo_files import create_demo_files

        def client(server: S3Server, who: str) -> Minio:
            return Minio(
                f"127.0.0.1:{server.port}",
                creds[f"OPSDRILL_{who}_ACCESS_KEY"],
                creds[f"OPSDRILL_{who}_SECRET_KEY"],
                secure=False,
                region="us-east-1",
            )

        off = client(offsite, "OFFSITE")
        off.make_bucket(BUCKET)
        off.make_bucket(FILES_MIRROR_BUCKET)
        # Versioning keeps the previous content of an overwritten file recoverable off-site.
        off.set_bucket_versioning(FILES_MIRROR_BUCKET, VersioningConfig(ENABLED))
        off.make_bucket(FILES_RESTORE_BUCKET)
        live_client = client(live_s3, "LIVE_S3")
        live_client.make_bucket(FILES_BUCKET)
        create_demo_files(live_client, FILES_BUCKET)

    def _write_app_env(self, smtp: str) -> Path:
        """The application's .env, as the secrets bundle reads it on a real host (and the
        demo app, which sends through the local Postfix, reads it). EMAIL_REDIRECT_TO is
        not set: production must not have it."""
        app = self.base / "app"
        app.mkdir(exist_ok=True)
        path = app / ".env"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(
                "# demo CRM application environment\n"
                f"ENCRYPTION_KEY={base64.b64encode(secrets.token_bytes(32)).decode()}\n"
                f"DATABASE_URL=postgresql://crm_app:{_secret('apppg')}@127.0.0.1/crm\n" + smtp
            )
        return path

    def _write_secrets(self, creds: dict[str, str]) -> None:
        path = self.base / SECRETS_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# local stack secrets: generated, throwaway\n")
            for key, value in creds.items():
                fh.write(f"{key}={value}\n")

    def _write_inventory(
        self,
        live: PgCluster,
        sandbox: PgCluster,
        offsite: S3Server,
        live_s3: S3Server,
        keys: Any,
        app_env: Path,
        dns: KnotServer,
        mail_tables: MailTables,
    ) -> None:
        def store(server: S3Server, who: str, bucket: str, prefix: str) -> dict[str, Any]:
            return {
                "endpoint": f"127.0.0.1:{server.port}",
                "bucket": bucket,
                "prefix": prefix,
                "secure": False,
                "access_key_env": f"OPSDRILL_{who}_ACCESS_KEY",
                "secret_key_env": f"OPSDRILL_{who}_SECRET_KEY",
                # moto completes a multipart upload in Python: ~10 s for 1.6 GiB when idle
                "timeout_seconds": 300.0,
            }

        inventory = {
            "name": "local-stack",
            "environment": "local",
            "env_file": SECRETS_FILE,
            "stores": {
                "offsite": store(offsite, "OFFSITE", BUCKET, "pg"),
                "live-files": store(live_s3, "LIVE_S3", FILES_BUCKET, ""),
                "offsite-files": store(offsite, "OFFSITE", FILES_MIRROR_BUCKET, "files/"),
                "restored-files": store(offsite, "OFFSITE", FILES_RESTORE_BUCKET, ""),
            },
            "gpg": {
                "recipients": [keys.fingerprint],
                "public_keys_file": str(keys.public_file.relative_to(self.base)),
                "drill_private_key_file": str(keys.secret_file.relative_to(self.base)),
                "drill_passphrase_env": "OPSDRILL_GPG_PASSPHRASE",
            },
            "retention": {"hourly_days": 7, "daily_days": 30},
            "databases": {
                DEMO_DB: {
                    "dsn": f"postgresql://{SUPERUSER}@127.0.0.1:{live.port}/{DEMO_DB}",
                    "password_env": "OPSDRILL_LIVE_PG_PASSWORD",
                    "store": "offsite",
                    "rpo_minutes": 60,
                    "rto_minutes": 15,
                    "content_hashes": True,
                    **({"pg_bin_dir": self.pg_bindir} if self.pg_bindir else {}),
                    "sandbox": {
                        "dsn": f"postgresql://{SUPERUSER}@127.0.0.1:{sandbox.port}/postgres",
                        "password_env": "OPSDRILL_SANDBOX_PG_PASSWORD",
                    },
                }
            },
            "mirrors": {
                "files": {
                    "source": "live-files",
                    "target": "offsite-files",
                    "rpo_minutes": 60,
                    "workers": 4,
                }
            },
            "secrets": {
                "app": {
                    "env_file": str(app_env.relative_to(self.base)),
                    "store": "offsite",
                    "prefix": "secrets",
                    "required_keys": ["ENCRYPTION_KEY", "DATABASE_URL"],
                    "fingerprint_keys": ["ENCRYPTION_KEY"],
                    "rpo_minutes": 1440,
                }
            },
            **demo_dns.inventory_tables(dns.port, DEMO_DB),
            **mail_tables,
        }
        self.inventory_path.write_text(
            "# Written by `opsdrill stack up`: the local stack's targets.\n"
            + tomli_w.dumps(inventory)
        )


def prime(inventory_path: Path) -> list[str]:
    """Run every operation once (backup, mirror, secrets bundle), as cron would have.

    The checks then verify what the real operations produced.
    """
    from opsdrill.backups.backup import run_backup
    from opsdrill.config.inventory import load
    from opsdrill.files.mirror import run_mirror
    from opsdrill.secrets.bundle import backup_bundle

    inv = load(inventory_path)
    lines = []
    for name in inv.model.databases:
        manifest = run_backup(inv, name)
        lines.append(f"backup {manifest.id}: {manifest.object['size']} bytes")
    for name in inv.model.mirrors:
        summary = run_mirror(inv, name)
        if not summary.ok:
            raise RuntimeError(f"priming mirror {name} failed: {summary.errors[:3]}")
        lines.append(summary.line())
    for name in inv.model.secrets:
        bundle = backup_bundle(inv, name)
        lines.append(f"secrets {bundle.id}: {len(bundle.keys)} keys")
    return lines
