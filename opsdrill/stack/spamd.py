"""SpamAssassin's spamd for the local stack: scores messages with local rules only.

No network tests of any kind (``--local``, ``dns_available no``, no Razor/Pyzor/DCC, no
Bayes, no rule updates: the rules are the ones Debian's package ships), its own site
config directory and helper home, answering 127.0.0.1 only. spamd forks children as root
only to drop to an unprivileged user (``debian-spamd`` when it exists, else ``nobody``).

Start-up is slow (Perl compiles every rule: ~2-4 s here, more on a busy machine), so the
stack ``launch()``es it first and ``wait_ready()``s at the end of its own start-up,
overlapping that time with the other servers'. ``ping()`` and ``report()`` speak the SPAMC
protocol, for tests; checks use their own client (or ``spamc -d 127.0.0.1 -p PORT -R``).
"""

from __future__ import annotations

import pwd
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from opsdrill.stack.mail import gone, log_tail, stop_process
from opsdrill.stack.procs import chown_to, find_binary, free_port, wait_for

RULES_DIR = Path("/usr/share/spamassassin")  # the packaged rules, never sa-update's
SITE_DEFAULTS = Path("/etc/spamassassin")
# Measured ~3 s idle on 2 cores; several stacks starting at once (xdist) take longer.
READY_TIMEOUT = 90.0
# Plugins that ask network services: never loaded, whatever the .pre files say.
NETWORK_PLUGINS = ("Razor2", "Pyzor", "DCC", "SpamCop", "URIDNSBL", "AskDNS")

LOCAL_CF = """\
# Written by opsdrill: local tests only, nothing learned, nothing looked up.
dns_available no
skip_rbl_checks 1
use_bayes 0
bayes_auto_learn 0
use_auto_welcomelist 0
trusted_networks 127.0.0.0/8
internal_networks 127.0.0.0/8
report_safe 0
lock_method flock
"""


def _binary(name: str) -> str:
    return find_binary(name, "spamassassin spamc spamd")


def _run_as() -> str:
    for user in ("debian-spamd", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return user
    raise RuntimeError("no unprivileged user for spamd (debian-spamd or nobody)")


@dataclass(frozen=True)
class SpamReport:
    """spamd's verdict: the score, the threshold, and the rules that fired."""

    score: float
    threshold: float
    is_spam: bool
    rules: tuple[str, ...]
    report: str


@dataclass
class Spamd:
    name: str
    base: Path
    port: int = 0
    pid: int = 0

    @property
    def logfile(self) -> Path:
        return self.base / "spamd.log"

    @property
    def site_dir(self) -> Path:
        return self.base / "site"

    # -- lifecycle -----------------------------------------------------------------
    def launch(self) -> None:
        """Start spamd and return at once; ``wait_ready()`` before using it."""
        home = self.base / "home"
        for sub in (self.base, self.site_dir, home):
            sub.mkdir(parents=True, exist_ok=True)
        user = _run_as()
        chown_to(home, user)
        for pre in sorted(SITE_DEFAULTS.glob("*.pre")):
            lines = [
                line
                for line in pre.read_text().splitlines()
                if not any(f"Plugin::{plugin}" in line for plugin in NETWORK_PLUGINS)
            ]
            (self.site_dir / pre.name).write_text("\n".join(lines) + "\n")
        (self.site_dir / "local.cf").write_text(LOCAL_CF)
        self.port = free_port()
        argv = [
            _binary("spamd"),
            f"--listen=127.0.0.1:{self.port}",
            "--allowed-ips=127.0.0.1",
            "--local",
            "--nouser-config",
            f"--configpath={RULES_DIR}",
            f"--siteconfigpath={self.site_dir.resolve()}",
            f"--helper-home-dir={home.resolve()}",
            f"--username={user}",
            f"--syslog={self.logfile.resolve()}",
            f"--pidfile={(self.base / 'spamd.pid').resolve()}",
            "--min-children=1",
            "--max-children=2",
        ]
        with (self.base / "spamd.out").open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.base,
            )
        self.pid = proc.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def ready() -> bool:
            return gone(self.pid) or self.ping()

        try:
            wait_for(
                ready,
                timeout,
                f"spamd {self.name}",
                hint=f"SpamAssassin compiles its rules at start-up; see {self.logfile}",
            )
        except BaseException:
            self.stop()
            raise
        if gone(self.pid):
            raise RuntimeError(
                f"spamd {self.name} exited{log_tail(self.logfile)}"
                f"{log_tail(self.base / 'spamd.out')}"
            )

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def stop(self) -> None:
        if self.pid:
            stop_process(self.pid, timeout=5)

    def status(self) -> str:
        return "running" if self.pid and not gone(self.pid) else "stopped"

    def version(self) -> str:
        out = subprocess.run(
            [_binary("spamd"), "--version"], capture_output=True, text=True, timeout=30
        )
        first = out.stdout.splitlines()[0] if out.stdout else "spamd"
        return first.replace("SpamAssassin Server version", "spamassassin").strip()

    # -- SPAMC protocol (tests) ------------------------------------------------------
    def ping(self) -> bool:
        try:
            return self._request(b"PING SPAMC/1.5\r\n\r\n", timeout=1.0).startswith(b"SPAMD/")
        except OSError:
            return False

    def report(self, message: bytes, timeout: float = 30.0) -> SpamReport:
        """``REPORT``, as ``spamc -R`` does: score, threshold and the rules that fired."""
        head = f"REPORT SPAMC/1.5\r\nContent-length: {len(message)}\r\n\r\n".encode()
        reply = self._request(head + message, timeout=timeout)
        header, _, body = reply.partition(b"\r\n\r\n")
        status = header.split(b"\r\n", 1)[0].decode(errors="replace")
        if not status.startswith("SPAMD/") or " 0 " not in status + " ":
            raise RuntimeError(f"spamd answered {status!r}")
        found = re.search(rb"Spam: (True|False|Yes|No) ; (-?[\d.]+) / (-?[\d.]+)", header)
        if not found:
            raise RuntimeError(f"spamd answered without a score: {status!r}")
        text = body.decode(errors="replace")
        rules = tuple(re.findall(r"^\s*-?[\d.]+\s+([A-Z0-9_]+)\s", text, re.MULTILINE))
        return SpamReport(
            score=float(found[2]),
            threshold=float(found[3]),
            is_spam=found[1] in (b"True", b"Yes"),
            rules=rules,
            report=text,
        )

    def _request(self, data: bytes, timeout: float) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def log_tail(self, lines: int = 8) -> str:
        return log_tail(self.logfile, lines)
