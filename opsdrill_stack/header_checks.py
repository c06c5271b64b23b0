"""A test switch on the local Postfix: prepend header lines to matching messages.

``prepending_headers(postfix, rules)``: until the block ends, Postfix's cleanup daemon
prepends a header line above each header that matches a rule's regular expression
(``header_checks`` with the ``PREPEND`` action, man 5 header_checks), for every message
submitted. The fault matrix uses it to make the direct probe arrive carrying
``Authentication-Results`` headers as if a receiving server (and a spoofer upstream of
it) had written them, which a single-hop local stack never does on its own; the probe
library itself has no knob for extra headers, so production probes cannot be bent.

``postconf -e`` sets ``header_checks``, ``postfix reload`` makes new cleanup processes
read it (the next submission already sees it), and the block's end removes the setting
and reloads again. ``main.cf`` is back-dated after each edit: Postfix will not read a
configuration file modified within the last second.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from opsdrill_stack.postfix import Postfix

MAP_FILE = "header_checks.regexp"


def _run(postfix: Postfix, tool: str, *args: str) -> None:
    binary = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin") or tool
    etc = str(postfix.etc.resolve())
    proc = subprocess.run(
        [binary, "-c", etc, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MAIL_CONFIG": etc},
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()[-1500:]
        raise RuntimeError(f"{tool} {' '.join(args)} failed (exit {proc.returncode}): {out}")


def _backdate(path: Path) -> None:
    past = time.time() - 10
    os.utime(path, (past, past))


def _reconfigure(postfix: Postfix, *postconf_args: str) -> None:
    _run(postfix, "postconf", *postconf_args)
    _backdate(postfix.etc / "main.cf")
    _run(postfix, "postfix", "reload")


@contextlib.contextmanager
def prepending_headers(postfix: Postfix, rules: Sequence[tuple[str, str]]) -> Iterator[Path]:
    """``rules``: (regular expression matched against a whole header line, header line to
    prepend above it), e.g. ``(r"^Subject: ", "X-Seen: yes")``. Yields the map file."""
    lines = []
    for pattern, header in rules:
        if "/" in pattern or "\n" in pattern + header or ":" not in header:
            raise ValueError(f"unsupported rule {pattern!r} -> {header!r}")
        lines.append(f"/{pattern}/ PREPEND {header}\n")
    path = postfix.etc.resolve() / MAP_FILE
    path.write_text("".join(lines))
    _backdate(path)
    _reconfigure(postfix, "-e", f"header_checks = regexp:{path}")
    try:
        yield path
    finally:
        _reconfigure(postfix, "-X", "header_checks")
        path.unlink(missing_ok=True)
