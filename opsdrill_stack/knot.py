"""An authoritative DNS server for the local stack: Knot DNS, serving the demo zones.

The DNS checks must meet a real server (real wire format, real CNAME chasing, real
multi-string TXT records), and the fault tests must break records and put them back
quickly. Knot gives both: ``knotc`` edits a zone in memory inside a transaction (~10 ms)
without touching its file, and ``zone-reload`` brings the file's version back. The zone
files are never written by Knot (``zonefile-sync: -1``) and no journal is kept, so the file
on disk is always the restore point.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from opsdrill_stack.daemon import Daemon
from opsdrill_stack.procs import find_binary

TXT_STRING_MAX = 255  # bytes in one character-string (RFC 1035 3.3)
# sockaddr_un.sun_path is 108 bytes with its NUL; stay clear of it.
SOCKET_PATH_MAX = 100
KNOTC_TIMEOUT = 10.0

TxtValue = str | Sequence[str]

_CONFIG = """\
# Written by opsdrill: the local stack's authoritative DNS server.
server:
    rundir: "{run}"
    listen: 127.0.0.1@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
control:
    listen: "{socket}"
database:
    storage: "{db}"
log:
  - target: stderr
    any: info
template:
  - id: default
    storage: "{zones}"
    file: "%s.zone"
    # The zone file is the restore point: Knot never writes it back and keeps no journal,
    # so zone-reload undoes every runtime edit.
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
{zone_list}
"""


class KnotControlError(RuntimeError):
    """A knotc command failed; the message carries knotc's output and the server log tail."""


def quote_txt(text: str) -> str:
    """``text`` as TXT rdata in zone-file syntax, split into <= 255-byte quoted strings.

    A DKIM key does not fit one character-string; resolvers join the strings back.
    """
    raw = text.encode()
    chunks = [raw[i : i + TXT_STRING_MAX] for i in range(0, len(raw), TXT_STRING_MAX)] or [b""]
    return " ".join(_quoted(chunk) for chunk in chunks)


def txt_rdata(value: TxtValue) -> str:
    """TXT rdata from a whole text (split automatically) or from explicit strings."""
    if isinstance(value, str):
        return quote_txt(value)
    parts = [part.encode() for part in value]
    for part in parts:
        if len(part) > TXT_STRING_MAX:
            raise ValueError(f"a TXT string holds at most {TXT_STRING_MAX} bytes, got {len(part)}")
    return " ".join(_quoted(part) for part in parts)


def _quoted(chunk: bytes) -> str:
    out = []
    for byte in chunk:
        if byte in (0x22, 0x5C):  # " and \
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def _zone_name(zone: str) -> str:
    return zone.rstrip(".").lower()


def _owner(zone: str, owner: str) -> str:
    """An owner as an absolute name. ``@`` is the apex; a name ending in the zone (or in a
    dot) is taken as absolute, anything else as relative to the zone."""
    zone = _zone_name(zone)
    name = owner.lower()
    if name in ("@", "", zone, zone + "."):
        return zone + "."
    if name.endswith("."):
        return name
    if name.endswith("." + zone):
        return name + "."
    return f"{name}.{zone}."


def _udp_and_tcp_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_dns_port(tries: int = 50) -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now; callers retry on a lost race.

    Knot binds UDP with SO_REUSEPORT, so two servers could share a UDP port unnoticed; its
    TCP socket is exclusive, and Knot exits when that bind fails, which start() retries.
    """
    for _ in range(tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if _udp_and_tcp_free(port):
            return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def _binary(name: str) -> str:
    return find_binary(name, "knot knot-dnsutils")


@dataclass
class KnotServer(Daemon):
    label: ClassVar[str] = "Knot DNS"
    log_name: ClassVar[str] = "knot.log"
    conf_name: ClassVar[str] = "knot.conf"
    start_timeout: ClassVar[float] = 15.0

    @property
    def zonedir(self) -> Path:
        return self.base / "zones"

    @property
    def control_socket(self) -> Path:
        """Under base when short enough, else a fixed short path derived from base, so a
        server rebuilt from recorded state finds the same socket."""
        path = self.base.resolve() / "run" / "knot.sock"
        if len(str(path)) <= SOCKET_PATH_MAX:
            return path
        digest = hashlib.sha256(str(self.base.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"opsdrill-knot-{digest}" / "knot.sock"

    def zone_file(self, zone: str) -> Path:
        return self.zonedir / f"{_zone_name(zone)}.zone"

    def zones(self) -> list[str]:
        """The zones this server serves: one file each in ``zonedir``."""
        return sorted(p.name.removesuffix(".zone") for p in self.zonedir.glob("*.zone"))

    # -- lifecycle -----------------------------------------------------------------
    def start(self, zones: Mapping[str, str], attempts: int = 3, timeout: float = 15.0) -> None:
        """Serve ``zones`` (name -> zone file text) on a free port; return once every zone
        answers an SOA query. The zone files are checked first, so a broken zone fails
        here with Knot's own message rather than as a timeout."""
        if not zones:
            raise ValueError("a DNS server needs at least one zone")
        for sub in (self.base, self.zonedir, self.base / "run", self.base / "db"):
            sub.mkdir(parents=True, exist_ok=True)
        self.control_socket.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.zonedir.glob("*.zone"):  # a reused base serves exactly `zones`
            stale.unlink()
        for zone, text in zones.items():
            self.zone_file(zone).write_text(text)
        self._write_config(free_dns_port())
        self.knotc("zone-check", what="checking the zone files")
        for attempt in range(attempts):
            if attempt:
                self._write_config(free_dns_port())
            offset = self.logfile.stat().st_size if self.logfile.exists() else 0
            proc = self.spawn([_binary("knotd"), "-c", str(self.conf)])
            if self.wait(proc, self._answers_soa, timeout=timeout):
                return
            log_text = self.logfile.read_bytes()[offset:].decode(errors="replace")
            if "address already in use" not in log_text:
                raise RuntimeError(
                    f"Knot DNS {self.name} exited (code {proc.returncode}); see {self.logfile}:\n"
                    + log_text[-1500:]
                )
        raise RuntimeError(f"Knot DNS {self.name} found no free port; see {self.logfile}")

    def stop(self) -> None:
        super().stop()
        sock = self.control_socket
        if not sock.parent.is_relative_to(self.base.resolve()):
            shutil.rmtree(sock.parent, ignore_errors=True)

    def version(self) -> str:
        out = subprocess.run(
            [_binary("knotd"), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()

    def resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython resolver asking only this server, without a cache."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = ["127.0.0.1"]
        res.port = self.port
        res.cache = None
        res.lifetime = timeout
        return res

    # -- runtime edits (tests) -------------------------------------------------------
    def set_records(
        self,
        zone: str,
        owner: str,
        rtype: str,
        values: str | Iterable[TxtValue],
        ttl: int = 60,
    ) -> None:
        """Replace the ``rtype`` RRset at ``owner`` with ``values``, in memory only.

        Values are rdata in zone-file syntax (``"10 mx.example.test."``), except TXT: each
        value is the record's text, split into 255-byte strings as needed, or a sequence
        of explicit strings. A CNAME replaces everything at the owner and any other type
        replaces a CNAME there, since the two cannot coexist.
        """
        rtype = rtype.upper()
        items: list[TxtValue] = [values] if isinstance(values, str) else list(values)
        if not items:
            raise ValueError("no values given; use remove_records() to delete an RRset")
        rdata = [txt_rdata(v) if rtype == "TXT" else _plain(v, rtype) for v in items]
        name, fqdn = _zone_name(zone), _owner(zone, owner)
        with self._transaction(name):
            if rtype == "CNAME":
                self._unset(name, fqdn, None)
            else:
                self._unset(name, fqdn, rtype)
                self._unset(name, fqdn, "CNAME")
            for data in rdata:
                self.knotc("zone-set", name, fqdn, str(ttl), rtype, data)

    def remove_records(
        self, zone: str, owner: str, rtype: str | None = None, missing_ok: bool = False
    ) -> None:
        """Delete the ``rtype`` RRset at ``owner`` (every type when None), in memory only.

        Deleting nothing is an error unless ``missing_ok``: a misspelt owner would
        otherwise leave the record a test meant to remove in place.
        """
        name, fqdn = _zone_name(zone), _owner(zone, owner)
        with self._transaction(name):
            removed = self._unset(name, fqdn, rtype.upper() if rtype else None)
            if not removed and not missing_ok:
                raise KnotControlError(
                    f"no {rtype.upper() if rtype else 'records'} at {fqdn} in zone {name}"
                )

    def restore_zone(self, zone: str) -> None:
        """Reload ``zone`` from its file, undoing every runtime edit."""
        name = _zone_name(zone)
        self._abort_quietly(name)
        self.knotc("-b", "zone-reload", name, what=f"restoring zone {name}")

    def restore_all(self) -> None:
        zones = self.zones()
        for zone in zones:
            self._abort_quietly(zone)
        self.knotc("-b", "zone-reload", *zones, what="restoring every zone")

    # -- knotc -------------------------------------------------------------------------
    def knotc(self, *args: str, what: str = "", timeout: float = KNOTC_TIMEOUT) -> str:
        """Run one knotc command against this server; raise with its output on failure."""
        argv = [
            _binary("knotc"),
            "-c",
            str(self.conf),
            "-s",
            str(self.control_socket),
            "-t",
            str(max(1, int(timeout))),
            *args,
        ]
        label = what or "knotc " + " ".join(args)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout + 5, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise KnotControlError(
                f"{label}: knotc timed out after {timeout:.0f}s; see {self.logfile}"
            ) from None
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise KnotControlError(
                f"{label} failed (exit {proc.returncode}): {output}{self.log_tail(5)}"
            )
        return output

    @contextlib.contextmanager
    def _transaction(self, zone: str) -> Iterator[None]:
        self.knotc("zone-begin", zone)
        try:
            yield
            self.knotc("zone-commit", zone)
        except BaseException:
            # A failed commit leaves the transaction open, and an open transaction blocks
            # every later reload: always close it.
            self._abort_quietly(zone)
            raise

    def _unset(self, zone: str, fqdn: str, rtype: str | None) -> bool:
        """Remove an RRset (or a whole node); False when there was nothing to remove."""
        try:
            self.knotc("zone-unset", zone, fqdn, *([rtype] if rtype else []))
        except KnotControlError as exc:
            # knotc's only signal for "nothing there" is its message (Knot 3.2 wording).
            text = str(exc)
            if "no such node" in text or "(not exists)" in text:
                return False
            raise
        return True

    def _abort_quietly(self, zone: str) -> None:
        with contextlib.suppress(KnotControlError):
            self.knotc("zone-abort", zone)

    def _answers_soa(self) -> bool:
        # A short per-try timeout: a query sent before knotd binds is simply lost (UDP), and
        # waiting long for it would dominate the start time.
        try:
            for zone in self.zones():
                query = dns.message.make_query(zone + ".", dns.rdatatype.SOA)
                reply = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.1)
                if reply.rcode() != dns.rcode.NOERROR or not reply.answer:
                    return False
        except (dns.exception.DNSException, OSError):
            return False
        return True

    def _write_config(self, port: int) -> None:
        self.port = port
        self.conf.write_text(
            _CONFIG.format(
                run=self.base.resolve() / "run",
                port=port,
                socket=self.control_socket,
                db=self.base.resolve() / "db",
                zones=self.zonedir.resolve(),
                zone_list="\n".join(f"  - domain: {zone}" for zone in self.zones()),
            )
        )


def _plain(value: TxtValue, rtype: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{rtype} values are rdata strings, e.g. '10 mx.example.test.'")
    return value
