"""Dovecot for the local stack: the probe mailbox (IMAP STARTTLS + IMAPS, IDLE), LMTP
delivery for Postfix, SASL authentication for Postfix's submission port, and Pigeonhole
sieve (a global before-script files ``X-Spam-Flag: YES`` into Junk).

Users are a passwd-file (``mail.USERS``; passwords from secrets.env, file 0600); mail is
stored as ``nobody`` under ``DIR/mail/<domain>/<user>/Maildir``. Tests switch a mailbox to
"everything goes to Junk" with ``file_into_junk`` (a per-user sieve script) and back with
``stop_filing_into_junk``; Dovecot compiles the script at the next delivery, no restart.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from opsdrill_stack.daemon import Daemon, load_settings, save_settings, socket_dir, write_private
from opsdrill_stack.mail import JUNK_FOLDER, MAILBOX_HOSTNAME, PROBE, SENDER_DOMAIN, TlsFiles
from opsdrill_stack.procs import chown_to, find_binary, free_port, port_open, run, running_as_root

MAIL_USER = "nobody"
MAIL_GROUP = "nogroup"
AUTH_GROUP = "dovecot"

_CONFIG = """\
# Written by opsdrill: the local stack's mailbox server.
base_dir = {run}
state_dir = {state}
log_path = {log}
protocols = imap lmtp
listen = 127.0.0.1
hostname = {hostname}
postmaster_address = postmaster@{postmaster_domain}
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_dh = </usr/share/dovecot/dh.pem
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login
auth_username_format = %Lu
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users}
  default_fields = uid={mail_user} gid={mail_group} home={mail}/%d/%n
}}
mail_location = maildir:~/Maildir
lda_mailbox_autocreate = yes
lda_mailbox_autosubscribe = yes
namespace inbox {{
  inbox = yes
  separator = /
  mailbox {junk} {{
    special_use = \\Junk
    auto = subscribe
  }}
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol lmtp {{
  mail_plugins = $mail_plugins sieve
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
  sieve_before = {before}
}}
"""

# Files what a spam filter upstream flagged: the receiving side of a real provider.
BEFORE_SIEVE = f"""\
require ["fileinto"];
# Written by opsdrill: mail a content filter flagged goes to {JUNK_FOLDER}.
if header :is "X-Spam-Flag" "YES" {{
  fileinto "{JUNK_FOLDER}";
  stop;
}}
"""


def _binary(name: str) -> str:
    return find_binary(name, "dovecot-imapd dovecot-lmtpd dovecot-sieve")


@dataclass
class Dovecot(Daemon):
    """``port`` is IMAPS; the STARTTLS port is ``imap_port`` (in its settings)."""

    label: ClassVar[str] = "Dovecot"
    log_name: ClassVar[str] = "dovecot.log"
    conf_name: ClassVar[str] = "dovecot.conf"

    @property
    def run_dir(self) -> Path:
        """base_dir: every socket Dovecot makes, LMTP and Postfix's auth among them."""
        saved = load_settings(self.base).get("run_dir")
        return Path(saved) if saved else socket_dir(self.base / "run", "dovecot", 32)

    @property
    def lmtp_socket(self) -> Path:
        return self.run_dir / "lmtp"

    @property
    def auth_socket(self) -> Path:
        return self.run_dir / "auth-postfix"

    @property
    def mail_dir(self) -> Path:
        return self.base / "mail"

    @property
    def imap_port(self) -> int:
        """The STARTTLS port (``port`` is IMAPS)."""
        return int(load_settings(self.base).get("imap_port", 0))

    def home(self, address: str) -> Path:
        local, _, domain = address.lower().partition("@")
        return self.mail_dir / domain / local

    # -- lifecycle -----------------------------------------------------------------
    def start(self, tls: TlsFiles, users: Mapping[str, str]) -> None:
        """Serve ``users`` (address -> password) over IMAP; returns once IMAPS answers and
        the LMTP and auth sockets exist."""
        for sub in (self.base, self.base / "state", self.base / "sieve"):
            sub.mkdir(parents=True, exist_ok=True)
        run_dir = socket_dir(self.base / "run", "dovecot", 32)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.mail_dir.mkdir(exist_ok=True)
        chown_to(self.mail_dir, MAIL_USER)
        users_file = write_private(
            self.base / "users",
            "".join(f"{address.lower()}:{{PLAIN}}{pw}::::::\n" for address, pw in users.items()),
            0o640,
        )
        _group_readable_by(users_file, AUTH_GROUP)  # the auth process runs as dovecot
        for address in users:  # so a sieve switch can be set before the first delivery
            self._make_home(address)
        before = self.base / "sieve" / "before.sieve"
        before.write_text(BEFORE_SIEVE)
        imap_port, self.port = free_port(), free_port()
        self.conf.write_text(
            _CONFIG.format(
                run=run_dir,
                state=self.base.resolve() / "state",
                log=self.logfile.resolve(),
                hostname=MAILBOX_HOSTNAME,
                postmaster_domain=SENDER_DOMAIN,
                cert=tls.cert.resolve(),
                key=tls.key.resolve(),
                users=users_file.resolve(),
                mail_user=MAIL_USER,
                mail_group=MAIL_GROUP,
                mail=self.mail_dir.resolve(),
                junk=JUNK_FOLDER,
                imap_port=imap_port,
                imaps_port=self.port,
                before=before.resolve(),
            )
        )
        save_settings(self.base, {"run_dir": str(run_dir), "imap_port": imap_port})
        # Compiled once here: the delivering user (nobody) cannot write next to it.
        run([_binary("sievec"), "-c", str(self.conf), str(before)], "compiling the sieve script")
        self.run_until_ready(
            [_binary("dovecot"), "-F", "-c", str(self.conf)],
            lambda: (
                port_open(self.port) and self.lmtp_socket.exists() and self.auth_socket.exists()
            ),
        )

    def stop(self) -> None:
        super().stop()
        run_dir = self.run_dir
        if not run_dir.is_relative_to(self.base.resolve()):
            shutil.rmtree(run_dir, ignore_errors=True)

    def version(self) -> str:
        out = subprocess.run(
            [_binary("dovecot"), "--version"], capture_output=True, text=True, timeout=10
        )
        return "dovecot " + out.stdout.strip()

    # -- runtime switches (tests) ----------------------------------------------------
    def file_into_junk(self, address: str = PROBE.address, header: str | None = None) -> None:
        """From the next delivery on, file ``address``'s mail into Junk: all of it, or only
        messages carrying ``header`` (e.g. the probe's token header)."""
        test = f'exists "{_sieve_string(header)}"' if header else "true"
        script = (
            'require ["fileinto"];\n'
            "# Written by opsdrill (a test switch): this mailbox files mail into Junk.\n"
            f'if {test} {{\n  fileinto "{JUNK_FOLDER}";\n  stop;\n}}\n'
        )
        home = self._make_home(address)
        self._forget_compiled(home)
        path = home / ".dovecot.sieve"
        path.write_text(script)
        chown_to(path, MAIL_USER)

    def stop_filing_into_junk(self, address: str = PROBE.address) -> None:
        home = self.home(address)
        (home / ".dovecot.sieve").unlink(missing_ok=True)
        self._forget_compiled(home)

    @contextlib.contextmanager
    def filing_into_junk(
        self, address: str = PROBE.address, header: str | None = None
    ) -> Iterator[None]:
        self.file_into_junk(address, header)
        try:
            yield
        finally:
            self.stop_filing_into_junk(address)

    def plant_messages(
        self, address: str, messages: Iterable[bytes], *, delivered: float
    ) -> list[Path]:
        """Write ``messages`` straight into ``address``'s INBOX (Maildir ``cur``), as
        delivered at ``delivered`` (epoch seconds: the file's mtime is what Dovecot
        reports as INTERNALDATE); Dovecot indexes them at the next SELECT. Thousands take
        a second, where IMAP APPEND would take minutes. Returns the files, for
        ``remove_planted``."""
        maildir = self._make_home(address) / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
            chown_to(maildir / sub, MAIL_USER)
        chown_to(maildir, MAIL_USER)
        paths: list[Path] = []
        for i, raw in enumerate(messages):
            path = maildir / "cur" / f"{int(delivered)}.M{i}P{os.getpid()}.opsdrill,S={len(raw)}:2,"
            path.write_bytes(raw)
            os.utime(path, (delivered, delivered))
            paths.append(path)
        if running_as_root():
            uid = pwd.getpwnam(MAIL_USER).pw_uid
            gid = grp.getgrnam(MAIL_GROUP).gr_gid
            for path in paths:
                os.chown(path, uid, gid)
        return paths

    @staticmethod
    def remove_planted(paths: Iterable[Path]) -> int:
        """Delete the planted files still there, under their name or the one Dovecot
        gave them when a flag changed (``...:2,T``); Dovecot notices at its next sync."""
        removed = 0
        for path in paths:
            base = path.name.partition(":2,")[0]
            for found in path.parent.glob(glob.escape(base) + ":2,*"):
                found.unlink(missing_ok=True)
                removed += 1
        return removed

    def _make_home(self, address: str) -> Path:
        home = self.home(address)
        for path in (home.parent, home):
            path.mkdir(mode=0o700, exist_ok=True)
            chown_to(path, MAIL_USER)
        return home

    @staticmethod
    def _forget_compiled(home: Path) -> None:
        # Two scripts written within one second would otherwise share a stale binary.
        (home / ".dovecot.svbin").unlink(missing_ok=True)


def _group_readable_by(path: Path, group: str) -> None:
    if running_as_root():
        os.chown(path, 0, grp.getgrnam(group).gr_gid)


def _sieve_string(value: str) -> str:
    if any(c in value for c in '"\\\r\n'):
        raise ValueError(f"not a plain header name: {value!r}")
    return value
