"""OpenDKIM for the local stack: a signing milter on a unix socket for Postfix.

It signs mail From @example.test with selector ``sel1`` and From @portal.example.net with
``portal1``, using the private keys ``demo_dns`` wrote (and whose public halves Knot
serves), through a KeyTable and a SigningTable. Mail From @unaligned.test is signed with
example.test's key (d=example.test), for the alignment fault.

Tests turn signing off with ``disable_signing()`` (a restart with an empty SigningTable,
~0.3 s: OpenDKIM only reads its tables at start-up) and back with ``enable_signing()``.
The running daemon's PID is kept in ``DIR/daemon.pid`` so a restart made by one process is
stopped by ``opsdrill stack down`` from another.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from opsdrill_stack import demo_dns
from opsdrill_stack.daemon import Daemon, load_settings, save_settings, socket_dir
from opsdrill_stack.mail import MTA_HOSTNAME, UNALIGNED_DOMAIN
from opsdrill_stack.procs import find_binary

_CONFIG = """\
# Written by opsdrill: the local stack's DKIM signer.
Syslog no
LogWhy yes
Mode s
Socket local:{socket}
UMask 000
PidFile {pidfile}
KeyTable refile:{keytable}
SigningTable refile:{signingtable}
Canonicalization relaxed/simple
OversignHeaders From
InternalHosts 127.0.0.1
# The keys live under the stack dir (/tmp), which OpenDKIM otherwise refuses.
RequireSafeKeys false
AuthservID {authserv}
"""


def _binary() -> str:
    return find_binary("opendkim", "opendkim opendkim-tools")


def signing_rows(dkim_dir: Path) -> list[tuple[str, str, str, Path]]:
    """(From pattern, signing domain, selector, private key file) for every signed domain."""
    main, portal = demo_dns.MAIN, demo_dns.PORTAL
    return [
        (f"*@{main.name}", main.name, main.selector, dkim_dir / f"{main.selector}.private"),
        (f"*@{portal.name}", portal.name, portal.selector, dkim_dir / f"{portal.selector}.private"),
        (f"*@{UNALIGNED_DOMAIN}", main.name, main.selector, dkim_dir / f"{main.selector}.private"),
    ]


@dataclass
class OpenDkim(Daemon):
    """A unix socket (``socket``): no port."""

    label: ClassVar[str] = "OpenDKIM"
    log_name: ClassVar[str] = "opendkim.log"
    conf_name: ClassVar[str] = "opendkim.conf"
    start_timeout: ClassVar[float] = 15.0
    # SIGTERM alone takes OpenDKIM ~5 s (it waits for its threads); nothing is lost by
    # SIGKILL after a moment: it keeps no state.
    stop_grace: ClassVar[float] = 0.2

    @property
    def socket(self) -> Path:
        saved = load_settings(self.base).get("socket")
        return Path(saved) if saved else socket_dir(self.base, "opendkim", 12) / "milter.sock"

    @property
    def signing(self) -> bool:
        return bool(load_settings(self.base).get("signing", True))

    # -- lifecycle -----------------------------------------------------------------
    def start(self, dkim_dir: Path | None = None, signing: bool = True) -> None:
        """Start signing with the keys in ``dkim_dir`` (remembered for restarts)."""
        self.base.mkdir(parents=True, exist_ok=True)
        settings = load_settings(self.base)
        keys = Path(dkim_dir or settings["dkim_dir"])
        sock = self.socket
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        rows = signing_rows(keys)
        (self.base / "KeyTable").write_text(
            "".join(
                f"{sel}._domainkey.{dom}.{i} {dom}:{sel}:{key.resolve()}\n"
                for i, (_, dom, sel, key) in enumerate(rows)
            )
        )
        (self.base / "SigningTable").write_text(
            "".join(
                f"{pattern} {sel}._domainkey.{dom}.{i}\n"
                for i, (pattern, dom, sel, _) in enumerate(rows)
            )
            if signing
            else "# signing disabled by a test switch\n"
        )
        self.conf.write_text(
            _CONFIG.format(
                socket=sock,
                pidfile=(self.base / "opendkim.pid").resolve(),
                keytable=(self.base / "KeyTable").resolve(),
                signingtable=(self.base / "SigningTable").resolve(),
                authserv=MTA_HOSTNAME,
            )
        )
        save_settings(
            self.base,
            {"socket": str(sock), "dkim_dir": str(keys.resolve()), "signing": signing},
        )
        proc = self.spawn([_binary(), "-f", "-x", str(self.conf)])
        (self.base / "daemon.pid").write_text(str(proc.pid))
        if not self.wait(proc, sock.exists):
            raise self.exited(proc)

    def running_pid(self) -> int:
        """The daemon's PID: a restart by another process updates only ``daemon.pid``."""
        path = self.base / "daemon.pid"
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        return self.pid

    def stop(self) -> None:
        super().stop()
        sock = self.socket
        if not sock.parent.is_relative_to(self.base.resolve()):
            shutil.rmtree(sock.parent, ignore_errors=True)
        else:
            sock.unlink(missing_ok=True)

    def version(self) -> str:
        out = subprocess.run([_binary(), "-V"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip() if out.stdout else "opendkim"

    # -- runtime switches (tests) ----------------------------------------------------
    def disable_signing(self) -> None:
        """Mail passes unsigned until ``enable_signing()``. Messages sent while it restarts
        are tempfailed by Postfix (milter_default_action), never sent unsigned."""
        self._restart(signing=False)

    def enable_signing(self) -> None:
        self._restart(signing=True)

    @contextlib.contextmanager
    def signing_disabled(self) -> Iterator[None]:
        self.disable_signing()
        try:
            yield
        finally:
            self.enable_signing()

    def _restart(self, signing: bool) -> None:
        self.stop()
        self.start(signing=signing)
