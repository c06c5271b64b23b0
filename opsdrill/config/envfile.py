"""The one reader for every .env file opsdrill reads, and for every env source.

The inventory's ``env_file``, the application's .env that the secrets bundle backs up and
the one the EMAIL_REDIRECT_TO check reads must all give the values the application's own
dotenv gives: a byte-order mark, ``export<TAB>``, an inline ``# comment``, escapes inside
quotes and multi-line quoted values. So the parsing is python-dotenv's own
(``dotenv_values`` on a stream), with these guarantees on top:

- values are taken literally (no ``${VAR}`` expansion): expanding would read opsdrill's
  own process environment, not the application's, and alter a generated password that
  happens to contain ``${``;
- a line without ``=`` (``KEY`` alone) is not set, as ``load_dotenv`` treats it;
- a line python-dotenv cannot parse is an error naming the file and line number, never
  the line (a malformed line may hold a secret); python-dotenv only logs and skips it;
- bytes that are not UTF-8 are an error naming the file and byte offset, not a crash;
- :func:`warn_if_exposed` warns when a file holding secrets is readable by others.

An env *source* (``[secrets.*]`` and ``[app_environment.*]``: an ``env_file`` or a
``command`` such as ``docker exec app printenv``) is read here too, by
:func:`read_env_bytes` and :func:`run_env_command`, so the bundle and the redirect check
read the same bytes the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import stat
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path
from subprocess import DEVNULL, PIPE

from dotenv import dotenv_values
from dotenv.parser import Binding, parse_stream

from opsdrill.errors import ConfigError, TargetUnreachable

_NEWLINE = re.compile(r"\r\n|\n|\r")


class SecretsFileWarning(UserWarning):
    """A file holding secrets can be read by users other than its owner."""


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of the env file at ``path`` (ConfigError when it cannot be read)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_env_bytes(raw, str(path))


def parse_env_bytes(raw: bytes, where: str) -> dict[str, str]:
    """``raw`` decoded as UTF-8 and parsed; ``where`` names it in errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # its own message would quote the offending bytes
        raise ConfigError(
            f"{where}: not UTF-8 text (first bad byte at byte {exc.start}; fix: save the "
            "file as UTF-8)"
        ) from None
    return parse_env_text(text, where)


def parse_env_text(text: str, where: str = "env") -> dict[str, str]:
    """Parse .env text as python-dotenv does (see the module docstring for what differs)."""
    bindings: list[Binding] = list(parse_stream(io.StringIO(text)))
    bad = [_line_of(b.original.string, b.original.line) for b in bindings if b.error]
    if bad:
        raise ConfigError(
            "\n".join(
                f"{where}:{line}: expected KEY=VALUE (the line is not shown: it may hold a secret)"
                for line in bad
            )
        )
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {key: value for key, value in values.items() if value is not None}


def _line_of(statement: str, start: int) -> int:
    """The line a statement's text begins on: python-dotenv counts from the blank lines
    before it, so its own warning can name a line above the bad one."""
    blank = statement[: len(statement) - len(statement.lstrip())]
    return start + len(_NEWLINE.findall(blank))


def warn_if_exposed(path: Path, what: str) -> None:
    """Warn when ``path`` (holding secrets: ``what`` says whose) is open to its group or
    other users (mode & 0o077). Only a warning: the run can still do its job, but the file
    should be 0600."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # reading it reports the problem
    if mode & 0o077:
        who = " and ".join(
            name for bits, name in ((0o070, "its group"), (0o007, "other users")) if mode & bits
        )
        warnings.warn(
            f"{path} ({what}) holds secrets and is open to {who} (mode {mode:04o}; "
            f"fix: chmod 600 {path})",
            SecretsFileWarning,
            stacklevel=3,
        )


def read_env_bytes(path: Path, key: str, exposed_as: str | None = None) -> bytes:
    """The bytes of the env file at ``path``, which holds secrets (a warning when others
    can read it, naming it as ``exposed_as``); ``key`` names it in the error when it
    cannot be read (``secrets.app.env_file``)."""
    warn_if_exposed(path, exposed_as or key)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read: {exc.strerror}") from None


def run_env_command(argv: Sequence[str], timeout: float, what: str) -> bytes:
    """The output of an env command (``docker exec app printenv``): no shell, its own
    process group (a timeout kills its children too), its output never shown. A command
    that cannot run, fails or times out is ``TargetUnreachable`` naming ``what``."""
    try:
        proc = subprocess.Popen(
            list(argv), stdin=DEVNULL, stdout=PIPE, stderr=PIPE, start_new_session=True
        )
    except OSError as exc:
        raise TargetUnreachable(f"{what}: cannot run it: {exc.strerror}") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        raise TargetUnreachable(f"{what}: did not finish within {timeout:g}s (killed)") from None
    if proc.returncode != 0:
        raise TargetUnreachable(
            f"{what}: failed with exit code {proc.returncode} (output not shown)"
        )
    return out
