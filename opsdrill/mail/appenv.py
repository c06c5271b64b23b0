"""The application's environment, for the runbook's "is EMAIL_REDIRECT_TO set?" step.

The environment is read and parsed by opsdrill's one .env reader, as the secrets bundle
reads it (``opsdrill.config.envfile``: an env file, or a command such as ``docker exec
app printenv`` run without a shell, in its own process group, bounded, its output never
shown; python-dotenv's semantics). Every value is registered
as a secret so ``redact`` masks it anywhere, except the keys named ``public``: the check
must be able to show EMAIL_REDIRECT_TO's value (an address), and a registered value would
be masked in its own failure message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from opsdrill.config.envfile import parse_env_bytes, read_env_bytes, run_env_command
from opsdrill.errors import ConfigError
from opsdrill.redact import register

DEFAULT_COMMAND_TIMEOUT = 30.0


def read_app_env(
    *,
    env_file: str | Path | None = None,
    command: Sequence[str] | None = None,
    timeout: float = DEFAULT_COMMAND_TIMEOUT,
    public: Iterable[str] = (),
) -> dict[str, str]:
    """The application's variables from exactly one of ``env_file`` or ``command``.

    Raises ``ConfigError`` (file unreadable, not KEY=VALUE text) or ``TargetUnreachable``
    (the command cannot run, fails or times out).
    """
    if (env_file is None) == (command is None):
        raise ConfigError("application env: give exactly one of env_file or command")
    if env_file is not None:
        path = Path(env_file)
        where = str(path)
        raw = read_env_bytes(path, "application env_file", "the application's env_file")
    else:
        if not command:  # None is excluded above; an empty list is a configuration error
            raise ConfigError("application env command: empty")
        argv = list(command)
        where = f"output of {argv[0]}"
        raw = run_env_command(argv, timeout, f"application env command {argv[0]}")
    values = parse_env_bytes(raw, where)
    shown = set(public)
    for key, value in values.items():
        if key not in shown:
            register(value)
    return values


def forbidden_keys_set(
    env: Mapping[str, str], keys: Iterable[str], *, empty_is_set: bool = False
) -> dict[str, str]:
    """The ``keys`` that are set in ``env``, with their values.

    An empty value counts as unset unless ``empty_is_set``: applications test these
    variables for truthiness (``if (process.env.EMAIL_REDIRECT_TO)``), so
    ``EMAIL_REDIRECT_TO=`` redirects nothing.
    """
    found: dict[str, str] = {}
    for key in keys:
        value = env.get(key)
        if value is None:
            continue
        if value.strip() or empty_is_set:
            found[key] = value
    return found
