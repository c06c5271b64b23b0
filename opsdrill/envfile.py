"""The one reader for every .env file opsdrill reads.

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
"""

from __future__ import annotations

import io
import re
import stat
import warnings
from pathlib import Path

from dotenv import dotenv_values
from dotenv.parser import Binding, parse_stream

from opsdrill.errors import ConfigError

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
