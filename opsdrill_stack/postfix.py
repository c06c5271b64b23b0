"""Postfix for the local stack: the submission port the probes and the demo app send to.

One smtpd on 127.0.0.1:PORT requiring STARTTLS and then SASL AUTH (Dovecot's auth socket)
before it accepts anything; OpenDKIM signs through a unix-socket milter; mail for the
local domains (``mail.LOCAL_DOMAINS``, recipients listed in ``vmailbox``) goes to Dovecot
over LMTP, everything else bounces at once (``default_transport = error``): the stack
never relays anywhere. Retries are quick (1-5 s) so a deferred message shows fast.

Postfix reaches Dovecot's LMTP socket through a symlink (``DIR/lmtp``): tests make
delivery defer with ``defer_delivery()`` (the link then points at a socket nobody listens
on, as when the mailbox server is down: "status=deferred ... No such file or directory")
and deliver the queue again with ``restore_delivery()``. Swapping a link needs no reload,
so the switch holds for the very next message. The master daemon runs in the foreground
(``master -d``) as the recorded PID; ``stop()`` uses ``postfix abort`` so its children go
with it.

Postfix will not read a configuration file modified within the last second (it waits for
the writer to finish), which cost ~2 s per start: the files are back-dated when written.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from opsdrill_stack.daemon import Daemon, load_settings, log_tail, save_settings
from opsdrill_stack.mail import LOCAL_DOMAINS, MTA_HOSTNAME, TlsFiles
from opsdrill_stack.procs import chown_to, find_binary, free_port, pid_alive, running_as_root

DAEMON_DIR = "/usr/lib/postfix/sbin"
MAIL_OWNER = "postfix"
DEAD_SOCKET = "no-lmtp-here"

# Postfix's queue directories as its postfix-files lists them: (name, owner, group, mode).
QUEUE_DIRS = [
    ("", "root", "root", 0o755),
    ("pid", "root", "root", 0o755),
    *[
        (name, MAIL_OWNER, "root", 0o700)
        for name in [
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "private",
            "saved",
            "trace",
        ]
    ],
    ("maildrop", MAIL_OWNER, "postdrop", 0o730),
    ("public", MAIL_OWNER, "postdrop", 0o710),
]

_MAIN_CF = """\
# Written by opsdrill: the local stack's submission server.
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
maillog_file = {log}
maillog_file_prefixes = {base}
myhostname = {hostname}
mydomain = {domain}
myorigin = $mydomain
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
alias_maps =
alias_database =
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_error_sleep_time = 0
smtpd_banner = $myhostname ESMTP
biff = no
virtual_mailbox_domains = {domains}
virtual_mailbox_maps = texthash:{etc}/vmailbox
virtual_transport = {transport}
lmtp_destination_recipient_limit = 1
# A cached LMTP connection would outlive a defer_delivery() switch.
lmtp_connection_cache_on_demand = no
default_transport = error:the local stack delivers to its own domains only
relay_transport = error:the local stack delivers to its own domains only
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {auth}
smtpd_sasl_authenticated_header = no
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 0
smtpd_client_restrictions = permit_sasl_authenticated, reject
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = reject_unlisted_recipient
smtpd_milters = unix:{milter}
non_smtpd_milters = $smtpd_milters
milter_default_action = tempfail
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
"""

# The stock services, none chrooted (the sockets they use live outside any chroot).
_MASTER_CF = """\
# Written by opsdrill. service type private unpriv chroot wakeup maxproc command
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _binary(name: str) -> str:
    return find_binary(name, "postfix")


@dataclass
class Postfix(Daemon):
    label: ClassVar[str] = "Postfix"
    log_name: ClassVar[str] = "postfix.log"
    conf_name: ClassVar[str] = "etc/main.cf"

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    @property
    def lmtp_link(self) -> Path:
        """The LMTP socket Postfix delivers to: a link to Dovecot's, or to nowhere."""
        return self.base.resolve() / "lmtp"

    @property
    def deferring(self) -> bool:
        return Path(os.readlink(self.lmtp_link)).name == DEAD_SOCKET

    # -- lifecycle -----------------------------------------------------------------
    def start(
        self,
        tls: TlsFiles,
        lmtp_socket: Path,
        auth_socket: Path,
        milter_socket: Path,
        recipients: Iterable[str],
    ) -> None:
        """Listen for submissions; returns once the port greets with 220."""
        spool, data = self.base / "spool", self.base / "data"
        for sub in (self.base, self.etc, spool, data):
            sub.mkdir(parents=True, exist_ok=True)
        chown_to(data, MAIL_OWNER)
        self.port = free_port()
        save_settings(self.base, {"lmtp_socket": str(lmtp_socket)})
        self._link_lmtp(lmtp_socket)
        self.conf.write_text(
            _MAIN_CF.format(
                etc=self.etc.resolve(),
                spool=spool.resolve(),
                data=data.resolve(),
                log=self.logfile.resolve(),
                base=self.base.resolve(),
                hostname=MTA_HOSTNAME,
                domain=MTA_HOSTNAME.split(".", 1)[1],
                domains=", ".join(LOCAL_DOMAINS),
                transport=f"lmtp:unix:{self.lmtp_link}",
                auth=auth_socket,
                cert=tls.cert.resolve(),
                key=tls.key.resolve(),
                milter=milter_socket,
            )
        )
        (self.etc / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        (self.etc / "vmailbox").write_text("".join(f"{r.lower()} ok\n" for r in recipients))
        past = time.time() - 10
        for conf in ("main.cf", "master.cf", "vmailbox"):
            os.utime(self.etc / conf, (past, past))
        # What `postfix check` would create, without its 2.5 s of shell loops.
        for queue, owner, group, mode in QUEUE_DIRS:
            _make_dir(spool / queue, owner, group, mode)
        self.run_until_ready(
            [f"{DAEMON_DIR}/master", "-d", "-c", str(self.etc.resolve())],
            lambda: _greets(self.port),
            env=self._env(),
        )

    def stop(self) -> None:
        if not self.pid or not pid_alive(self.pid):
            return
        # abort: stop the master and its children now, leaving queued mail in place.
        with contextlib.suppress(Exception):
            self._postfix("abort", what="postfix abort", timeout=10)
        super().stop()

    def version(self) -> str:
        out = self._postfix("-h", "mail_version", tool="postconf", what="postconf")
        return "postfix " + out.strip()

    # -- runtime switches and inspection (tests) ---------------------------------------
    def defer_delivery(self) -> None:
        """Until ``restore_delivery()``, accepted mail stays in the queue, deferred and
        retried every 1-5 s."""
        self._link_lmtp(self.base.resolve() / DEAD_SOCKET)

    def restore_delivery(self) -> None:
        """Deliver to Dovecot again, and retry the deferred mail now."""
        self._link_lmtp(Path(load_settings(self.base)["lmtp_socket"]))
        self._postfix("-f", tool="postqueue", what="postqueue -f")

    @contextlib.contextmanager
    def delivery_deferred(self) -> Iterator[None]:
        self.defer_delivery()
        try:
            yield
        finally:
            self.restore_delivery()

    def queue(self) -> str:
        """``postqueue -p``: the queue listing (empty queue: "Mail queue is empty")."""
        return self._postfix("-p", tool="postqueue", what="postqueue -p")

    def _link_lmtp(self, target: Path) -> None:
        tmp = self.lmtp_link.with_name("lmtp.new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, self.lmtp_link)  # atomic: a delivery sees the old or the new link

    def _postfix(self, *args: str, tool: str = "postfix", what: str, timeout: float = 60) -> str:
        proc = subprocess.run(
            [_binary(tool), "-c", str(self.etc.resolve()), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=self._env(),
        )
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip()
            raise RuntimeError(
                f"{what} failed (exit {proc.returncode}): {out[-1500:]}{log_tail(self.logfile)}"
            )
        return proc.stdout

    def _env(self) -> dict[str, str]:
        # MAIL_CONFIG makes every Postfix program (postdrop, postqueue) use this instance.
        return {**os.environ, "MAIL_CONFIG": str(self.etc.resolve())}


def _make_dir(path: Path, owner: str, group: str, mode: int) -> None:
    path.mkdir(exist_ok=True)
    if running_as_root():
        os.chown(path, pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)


def _greets(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(64).startswith(b"220")
    except OSError:
        return False
