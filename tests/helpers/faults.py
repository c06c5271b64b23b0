"""Boundary fakes for operation tests (allowed in tests, never in checks): a TCP proxy
that cuts the connection mid-upload (or mid-download), and a gpg that fails halfway
through encrypting."""

from __future__ import annotations

import contextlib
import socket
import stat
import threading
from pathlib import Path

FAILING_GPG = """#!/bin/sh
# Behaves like gpg except that --encrypt fails after reading some input.
for arg in "$@"; do
  if [ "$arg" = "--encrypt" ]; then
    head -c 65536 >/dev/null
    echo "gpg: simulated failure: disk quota exceeded" >&2
    exit 2
  fi
done
exec {real} "$@"
"""


def failing_gpg_dir(tmp_path: Path, real_gpg: str) -> Path:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    script = bindir / "gpg"
    script.write_text(FAILING_GPG.format(real=real_gpg))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


class CuttingProxy:
    """Forwards 127.0.0.1:port to a target; after ``cut_after`` bytes it drops every
    connection and refuses new ones, like a network that went away mid-transfer. It counts
    what the client sends (``direction="up"``: mid-upload) or what the server answers
    (``"down"``: mid-download)."""

    def __init__(self, target_port: int, cut_after: int, direction: str = "up") -> None:
        assert direction in ("up", "down")
        self.target_port = target_port
        self.cut_after = cut_after
        self.direction = direction
        self.sent = 0
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            with self._lock:
                self.conns += [client, upstream]
            up, down = self.direction == "up", self.direction == "down"
            threading.Thread(target=self._pipe, args=(client, upstream, up), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, down), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counting: bool) -> None:
        with contextlib.suppress(OSError):
            while not self.cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if counting:
                    with self._lock:
                        self.sent += len(data)
                        if self.sent > self.cut_after:
                            self._cut_locked()
                            return
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _cut_locked(self) -> None:
        self.cut.set()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                conn.close()
        with contextlib.suppress(OSError):
            self.listener.close()

    def close(self) -> None:
        with self._lock:
            self._cut_locked()
        self.thread.join(timeout=5)
