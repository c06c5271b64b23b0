"""SpamAssassin's spamd for the local stack: scores messages with local rules only.

No network tests of any kind (``--local``, ``dns_available no``, no Razor/Pyzor/DCC, no
Bayes, no rule updates: the rules are the ones Debian's package ships), its own site
config directory and helper home, answering 127.0.0.1 only. spamd forks children as root
only to drop to an unprivileged user (``debian-spamd`` when it exists, else ``nobody``).

Start-up is slow (Perl compiles every rule: ~2-4 s here, more on a busy machine), so the
stack ``launch()``es it first and ``wait_ready()``s at the end of its own start-up,
overlapping that time with the other servers'. ``ping()`` and ``report()`` speak the SPAMC
protocol through the one client there is (``opsdrill.mail.spam``, which the checks use).
"""

from __future__ import annotations

import pwd
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from opsdrill.mail.spam import SpamVerdict, score_with_spamd, spamd_answers
from opsdrill_stack.daemon import Daemon, log_tail
from opsdrill_stack.procs import chown_to, find_binary, free_port

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


@dataclass
class Spamd(Daemon):
    label: ClassVar[str] = "spamd"
    log_name: ClassVar[str] = "spamd.log"  # its --syslog file
    conf_name: ClassVar[str] = "site/local.cf"
    start_timeout: ClassVar[float] = READY_TIMEOUT
    # The process ``launch`` started, for ``wait_ready`` (in the same process).
    _proc: subprocess.Popen[bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )

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
        self.conf.write_text(LOCAL_CF)
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
        self._proc = self.spawn(argv, output=self.base / "spamd.out", cwd=self.base)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until spamd answers PING (it compiles its rules first); after ``launch``."""
        if self._proc is None:
            raise RuntimeError(f"spamd {self.name}: wait_ready() without launch()")
        hint = f"SpamAssassin compiles its rules at start-up; see {self.logfile}"
        if not self.wait(self._proc, self.ping, timeout=timeout, hint=hint):
            raise RuntimeError(
                f"spamd {self.name} exited{log_tail(self.logfile)}"
                f"{log_tail(self.base / 'spamd.out')}"
            )

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def version(self) -> str:
        out = subprocess.run(
            [_binary("spamd"), "--version"], capture_output=True, text=True, timeout=30
        )
        first = out.stdout.splitlines()[0] if out.stdout else "spamd"
        return first.replace("SpamAssassin Server version", "spamassassin").strip()

    # -- SPAMC protocol (tests), through the library's client ---------------------------
    def ping(self) -> bool:
        return spamd_answers("127.0.0.1", self.port, timeout=1.0)

    def report(self, message: bytes, timeout: float = 30.0) -> SpamVerdict:
        """``REPORT``, as ``spamc -R`` does: score, threshold and the rules that fired."""
        return score_with_spamd(message, "127.0.0.1", self.port, timeout)
