"""Secret values and their redaction.

Every secret opsdrill reads (passwords, S3 keys, GPG passphrases) is resolved through
:func:`resolve_env`, which registers the value so :func:`redact` can scrub it from any text
we print, log, raise or attach. This is defence in depth: code also avoids putting secrets
into messages in the first place (no DSN carries a password; subprocesses get them through
their environment, never argv).
"""

from __future__ import annotations

import os
import re
import threading

_lock = threading.Lock()
_known: set[str] = set()
MASK = "***"
# Values this short would mask ordinary words; such "secrets" are rejected at load time.
MIN_SECRET_LENGTH = 4

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+):(?P<pw>[^@\s]+)@", re.I)
_KV_PASSWORD = re.compile(
    r"(?P<key>\b(?:password|passwd|secret_key|passphrase)\s*=\s*)(?P<pw>\S+)", re.I
)


class SecretMissing(KeyError):
    """An environment variable named in the inventory is unset or empty."""


def register(value: str) -> str:
    """Remember a secret so that it is masked wherever it would be shown."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _lock:
            _known.add(value)
    return value


def resolve_env(name: str, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    value = env.get(name, "")
    if not value:
        raise SecretMissing(name)
    return register(value)


def redact(text: str) -> str:
    """Mask registered secrets and anything shaped like an inline password."""
    if not text:
        return text
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}:{MASK}@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['key']}{MASK}", text)


def known_secrets() -> frozenset[str]:
    with _lock:
        return frozenset(_known)
