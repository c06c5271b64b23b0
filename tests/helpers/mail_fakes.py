"""Tiny in-process stand-ins for the mail library's unit tests: an SMTP server, an IMAP
server that only logs in, a spamd that replays a canned answer, an HTTP application, a
minimal Redis and a Redis that refuses every command. Each fakes only
the protocol boundary the library talks to; the real daemons are tested by the stack."""

from __future__ import annotations

import base64
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class SmtpBehaviour:
    users: dict[str, str] = field(default_factory=dict)
    offer_starttls: bool = False
    refuse_rcpt: tuple[str, ...] = ()
    greet: bool = True
    queue_id: str = "4ABC12DEF"
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    on_data: Callable[[bytes], None] | None = None


class _SmtpHandler(socketserver.StreamRequestHandler):
    behaviour: SmtpBehaviour

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        b = self.behaviour
        if not b.greet:
            self.rfile.readline()  # hold the connection silently until the client gives up
            return
        self.reply("220 fake.example.test ESMTP")
        sender, rcpts = "", []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            cmd = line.decode().strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                exts = ["250-fake.example.test", "250-PIPELINING"]
                if b.offer_starttls:
                    exts.append("250-STARTTLS")
                exts.append("250 AUTH PLAIN")
                for ext in exts:
                    self.reply(ext)
            elif verb == "AUTH":
                _, _, blob = cmd.split(" ", 2)
                _, user, password = base64.b64decode(blob).decode().split("\0")
                if b.users.get(user) == password:
                    self.reply("235 2.7.0 Authentication successful")
                else:
                    self.reply("535 5.7.8 Error: authentication failed: bad credentials")
            elif verb == "MAIL":
                sender, rcpts = cmd.split(":", 1)[1].strip(" <>"), []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpt = cmd.split(":", 1)[1].strip(" <>")
                if rcpt in b.refuse_rcpt:
                    self.reply(f"550 5.1.1 <{rcpt}>: Recipient address rejected: unknown")
                else:
                    rcpts.append(rcpt)
                    self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = b""
                while True:
                    chunk = self.rfile.readline()
                    if chunk in (b".\r\n", b""):
                        break
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                b.received.append((sender, rcpts, data))
                if b.on_data is not None:
                    b.on_data(data)
                self.reply(f"250 2.0.0 Ok: queued as {b.queue_id}")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Error: command not recognized")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    """Run ``handler`` on 127.0.0.1 (a free port) for the block; yields the port."""
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def fake_smtp(behaviour: SmtpBehaviour) -> Iterator[int]:
    handler = type("Handler", (_SmtpHandler,), {"behaviour": behaviour})
    with serve(handler) as port:
        yield port


@contextmanager
def fake_spamd(answer: bytes | None, requests: list[bytes]) -> Iterator[int]:
    """Reads one request (headers + Content-length body) and replays ``answer``;
    ``None``: accept and never answer (a hung spamd)."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline()
                if not line:
                    return
                head += line
            length = next(
                int(h.split(b":", 1)[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length:")
            )
            requests.append(head + self.rfile.read(length))
            if answer is None:
                time.sleep(5)  # hung: the client's timeout must end the wait
                return
            self.wfile.write(answer)

    with serve(Handler) as port:
        yield port


@contextmanager
def fake_imap(users: dict[str, str]) -> Iterator[int]:
    """An IMAP4rev1 greeting, CAPABILITY and LOGIN (``users``: user -> password; anyone
    else gets ``NO [AUTHENTICATIONFAILED]``), LOGOUT; every other command is ``BAD``."""

    class Handler(socketserver.StreamRequestHandler):
        def reply(self, line: str) -> None:
            self.wfile.write(line.encode() + b"\r\n")
            self.wfile.flush()

        def handle(self) -> None:
            self.reply("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake IMAP ready")
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                tag, _, rest = line.decode().strip().partition(" ")
                verb, _, args = rest.partition(" ")
                if verb.upper() == "CAPABILITY":
                    self.reply("* CAPABILITY IMAP4rev1 AUTH=PLAIN")
                    self.reply(f"{tag} OK CAPABILITY completed")
                elif verb.upper() == "LOGIN":
                    user, _, password = args.partition(" ")
                    if users.get(user.strip('"')) == password.strip('"'):
                        self.reply(f"{tag} OK Logged in")
                    else:
                        self.reply(f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed.")
                elif verb.upper() == "LOGOUT":
                    self.reply("* BYE Logging out")
                    self.reply(f"{tag} OK Logout completed")
                    return
                else:
                    self.reply(f"{tag} BAD not supported by the fake")

    with serve(Handler) as port:
        yield port


@contextmanager
def fake_redis_refusing(error: str) -> Iterator[int]:
    """A Redis (RESP2) that answers every command with the error ``error`` (e.g.
    ``WRONGPASS invalid username-password pair`` or ``NOAUTH Authentication required.``)."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                if line.startswith(b"*"):  # an array of bulk strings: read its items
                    for _ in range(int(line[1:])):
                        self.rfile.readline()  # $<length>
                        self.rfile.readline()  # the item
                self.wfile.write(f"-{error}\r\n".encode())
                self.wfile.flush()

    with serve(Handler) as port:
        yield port


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def fake_app(token: str) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """POST /invite (Bearer ``token`` required: 202, else 401 echoing the header),
    POST /fail (500), GET /activate -> 302 /welcome -> 200, GET /gone (404)."""
    calls: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, location: str | None = None) -> None:
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            calls.append({"path": self.path, "body": self.rfile.read(length)})
            auth = self.headers.get("Authorization", "")
            if self.path == "/fail":
                self._send(500, f"internal error; you sent {auth}".encode())
            elif auth != f"Bearer {token}":
                self._send(401, f"bad token {auth}".encode())
            else:
                self._send(202, b'{"queued": true}')

        def do_GET(self) -> None:
            if self.path.startswith("/activate"):
                self._send(302, b"", location="/welcome")
            elif self.path == "/welcome":
                self._send(200, b"welcome")
            else:
                self._send(404, b"not found")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], calls
    finally:
        server.shutdown()
        server.server_close()


class FakeRedis:
    """Lists, sorted sets and hashes: just the commands ``backlog_from_client`` uses."""

    def __init__(self) -> None:
        self.lists: dict[str, list[str]] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.hashes: dict[str, dict[str, str]] = {}
        self.strings: dict[str, str] = {}

    # writers, as BullMQ's scripts use them
    def lpush(self, key: str, value: str) -> None:
        self.lists.setdefault(key, []).insert(0, value)

    def rpush(self, key: str, value: str) -> None:
        self.lists.setdefault(key, []).append(value)

    def zadd(self, key: str, member: str, score: float) -> None:
        self.zsets.setdefault(key, {})[member] = score

    def hset(self, key: str, **fields: Any) -> None:
        self.hashes.setdefault(key, {}).update({k: str(v) for k, v in fields.items()})

    # readers
    def type(self, name: str) -> bytes:
        if name in self.lists:
            return b"list"
        if name in self.zsets:
            return b"zset"
        if name in self.hashes:
            return b"hash"
        return b"string" if name in self.strings else b"none"

    def llen(self, name: str) -> int:
        return len(self.lists.get(name, []))

    def lindex(self, name: str, index: int) -> bytes | None:
        items = self.lists.get(name, [])
        try:
            return items[index].encode()
        except IndexError:
            return None

    def zcard(self, name: str) -> int:
        return len(self.zsets.get(name, {}))

    def zrange(self, name: str, start: int, end: int, *, withscores: bool = False) -> list[Any]:
        ordered = sorted(self.zsets.get(name, {}).items(), key=lambda kv: kv[1])
        stop = None if end == -1 else end + 1
        if withscores:
            return [(m.encode(), score) for m, score in ordered[start:stop]]
        return [m.encode() for m, _ in ordered[start:stop]]

    def zcount(self, name: str, low: float | str, high: float | str) -> int:
        lo, hi = float(low), float(high)  # "-inf" and "+inf" as Redis takes them
        return sum(1 for score in self.zsets.get(name, {}).values() if lo <= score <= hi)

    def hget(self, name: str, key: str) -> bytes | None:
        value = self.hashes.get(name, {}).get(key)
        return None if value is None else value.encode()

    def hexists(self, name: str, key: str) -> bool:
        return key in self.hashes.get(name, {})

    def exists(self, *names: str) -> int:
        stores = (self.lists, self.zsets, self.hashes, self.strings)
        return sum(1 for n in names if any(n in s for s in stores))


@contextmanager
def fake_tls(cert: str, key: str) -> Iterator[int]:
    """A TLS server presenting ``cert`` (self-signed: no client trusts it by default) that
    completes the handshake when it can and closes; yields the port."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                with context.wrap_socket(self.request, server_side=True) as tls:
                    tls.settimeout(2)
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate: what the tests expect

    with serve(Handler) as port:
        yield port
