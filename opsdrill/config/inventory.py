"""The inventory: a TOML file naming every target opsdrill verifies or operates on.

Secrets are never in the file; it names the environment variables that hold them
(``password_env = "CRM_DB_PASSWORD"``). Loading validates the whole file up front and
reports every problem at once, naming the file, the key and the fix, so an operator never
meets a half-started run. Structural validation is pydantic's; we only reword its errors.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from opsdrill.config.envfile import read_env_file, warn_if_exposed
from opsdrill.config.fields import NOT_AN_ENV_NAME, HostPort, SecretEnvName, pattern_problem
from opsdrill.config.fields import StrictModel as _Model
from opsdrill.config.mail import (
    DnsSettings,
    ExpectedSelector,
    MailProvider,
    ProviderName,
    SendingDomain,
    SendingDomainDiscovery,
    SendingDomains,
    expected_providers,
    expected_selectors,
    mail_cross_checks,
)
from opsdrill.config.probes import (
    AppEnvironment,
    EnvSource,
    Probe,
    ProbeName,
    QueueBacklog,
    probe_env_refs,
)
from opsdrill.errors import ConfigError
from opsdrill.redact import SecretMissing, redact, resolve_env


class Store(_Model):
    """An S3-compatible bucket (MinIO in production, moto in the local stack)."""

    endpoint: HostPort = Field(description="host:port of the S3 API")
    bucket: str = Field(min_length=3)
    prefix: str = ""
    secure: bool = True
    region: str = "us-east-1"
    access_key_env: SecretEnvName
    secret_key_env: SecretEnvName
    ca_file: str | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)


class Gpg(_Model):
    recipients: list[str] = Field(min_length=1, description="OpenPGP fingerprints")
    public_keys_file: str
    drill_private_key_file: str | None = None
    drill_passphrase_env: SecretEnvName | None = None

    @field_validator("recipients")
    @classmethod
    def _fingerprints(cls, value: list[str]) -> list[str]:
        cleaned = [v.replace(" ", "").upper() for v in value]
        for fpr in cleaned:
            if len(fpr) not in (40, 64) or any(c not in "0123456789ABCDEF" for c in fpr):
                raise ValueError(f"{fpr!r} is not a full OpenPGP fingerprint (40 hex digits)")
        return cleaned


class Retention(_Model):
    hourly_days: int = Field(default=7, ge=1)
    daily_days: int = Field(default=30, ge=1)
    # The newest good backups are kept whatever their age (restic's --keep-last): backups
    # that stopped for a month must not make the next prune empty the bucket.
    min_keep: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _daily_covers_hourly(self) -> Retention:
        if self.daily_days < self.hourly_days:
            raise ValueError(
                f"daily_days ({self.daily_days}) must be at least hourly_days ({self.hourly_days})"
            )
        return self


class Sandbox(_Model):
    """Where drills restore, never production: a standing throwaway server (``dsn``), or a
    container of the backup's major that the drill starts and removes (``container``, an
    image name pattern: ``postgres:{major}``, or a private registry's)."""

    dsn: str | None = None
    password_env: SecretEnvName | None = None
    container: str | None = None
    # "host": the container shares the host's network and listens on a free port (for
    # engines without a bridge network); "bridge": Docker maps port 5432 to the host.
    container_network: Literal["bridge", "host"] = "bridge"
    container_start_seconds: float = Field(default=120.0, gt=0)
    # Server settings for the container (postgres -c KEY=VALUE), e.g. fsync = "off": the
    # cluster is thrown away after the drill, but then the RTO measured is optimistic.
    container_settings: dict[str, str] = Field(default_factory=dict)
    max_shrink_percent: float = Field(default=10.0, ge=0, le=100)

    @model_validator(mode="after")
    def _one_kind(self) -> Sandbox:
        if (self.dsn is None) == (self.container is None):
            raise ValueError(
                "set exactly one of dsn (a throwaway server) and container (an image name "
                "pattern such as postgres:{major}, started for each drill)"
            )
        if self.container is not None:
            problem = pattern_problem(self.container)
            if problem:
                raise ValueError(f"container: {problem}")
            if self.password_env is not None:
                raise ValueError(
                    "password_env is for a dsn sandbox: a container's password is generated "
                    "for each drill (remove it)"
                )
        return self


class Database(_Model):
    dsn: str = Field(description="libpq URI or key=value string, without a password")
    password_env: SecretEnvName | None = None
    store: str | None = None
    rpo_minutes: float = Field(default=60, gt=0)
    rto_minutes: float = Field(default=60, gt=0)
    compression: Literal["zstd", "gzip"] = "zstd"
    compression_level: int | None = Field(default=None, ge=1, le=19)
    encrypt: bool = True
    content_hashes: bool = False
    restore_jobs: int = Field(default=2, ge=1, le=64)
    sandbox: Sandbox | None = None
    # Client tools of the server's major or newer (opsdrill.pgtools): a bin directory to
    # prefer, and the image to run them in when none is installed ("" = never).
    pg_bin_dir: str | None = None
    tools_container: str = "postgres:{major}"

    @field_validator("pg_bin_dir")
    @classmethod
    def _bin_dir(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\n" in value):
            raise ValueError("must be a directory holding pg_dump and pg_restore")
        if value is not None and value.rstrip("/").rsplit("/", 1)[-1].startswith("pg_"):
            raise ValueError("the directory, not the tool: e.g. /usr/lib/postgresql/16/bin")
        return value

    @field_validator("tools_container")
    @classmethod
    def _tools_image(cls, value: str) -> str:
        problem = pattern_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value


class Mirror(_Model):
    """Copy a live bucket (``source`` store) to an off-site one (``target`` store)."""

    source: str
    target: str
    rpo_minutes: float = Field(default=60, gt=0)
    workers: int = Field(default=8, ge=1, le=64)
    # "propagate" deletes off-site what is gone from live. It exists only so tests can prove
    # that the delete-protection check catches such a mirror; never use it in production.
    delete_mode: Literal["keep", "propagate"] = "keep"
    canary_prefix: str = ".opsdrill-canary/"


class SecretsBundle(EnvSource):
    """The application's environment (.env with ENCRYPTION_KEY), backed up encrypted.
    Its source (env_file or command) is read like an [app_environment] one."""

    store: str
    prefix: str = "secrets"
    required_keys: list[str] = Field(default_factory=list)
    fingerprint_keys: list[str] = Field(default_factory=lambda: ["ENCRYPTION_KEY"])
    rpo_minutes: float = Field(default=1440, gt=0)


class InventoryModel(_Model):
    name: str = "default"
    environment: str = "production"
    env_file: str | None = None
    stores: dict[str, Store] = Field(default_factory=dict)
    gpg: Gpg | None = None
    retention: Retention = Retention()
    databases: dict[str, Database] = Field(default_factory=dict)
    mirrors: dict[str, Mirror] = Field(default_factory=dict)
    secrets: dict[str, SecretsBundle] = Field(default_factory=dict)
    # Mail authentication (models and their rules: opsdrill.config.mail).
    dns: DnsSettings | None = None
    mail_providers: dict[ProviderName, MailProvider] = Field(default_factory=dict)
    sending_domains: SendingDomains = Field(default_factory=dict)
    sending_domain_discovery: SendingDomainDiscovery | None = None
    # Delivery probes and diagnosis (models and their rules: opsdrill.config.probes).
    probes: dict[ProbeName, Probe] = Field(default_factory=dict)
    app_environment: dict[str, AppEnvironment] = Field(default_factory=dict)
    queues: dict[str, QueueBacklog] = Field(default_factory=dict)


@dataclass(frozen=True)
class Inventory:
    """A validated inventory plus where it came from (relative paths resolve against it)."""

    path: Path
    model: InventoryModel
    # The environment secrets are read from: env_file values under the process environment.
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # The variables the env_file supplied (the process environment wins over the file).
    from_env_file: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)

    def secret(self, var: str) -> str:
        """The value of a secret environment variable (registered for redaction)."""
        try:
            return resolve_env(var, dict(self.env))
        except SecretMissing:
            keys = [key for key, named, _ in _env_refs(self.model) if named == var]
            env_file = self.resolve_path(self.model.env_file) if self.model.env_file else None
            where = f"{' and '.join(keys)}: " if keys else ""
            raise ConfigError(where + missing_secret(var, env_file)) from None

    def secret_setting(self, key: str, var: str) -> str:
        """Where a secret comes from, for a message that says what to fix:
        ``databases.crm.password_env = CRM_DB_PASSWORD, set in env_file /etc/x.env``."""
        if var in self.from_env_file and self.model.env_file:
            origin = f"set in env_file {self.resolve_path(self.model.env_file)}"
        elif var in self.env:
            origin = "set in the environment"
        else:
            origin = "not set"
        return f"{key} = {var}, {origin}"

    @property
    def name(self) -> str:
        return self.model.name

    def database(self, name: str) -> Database:
        return _named(self.path, self.model.databases, "databases", name)

    def mirror(self, name: str) -> Mirror:
        return _named(self.path, self.model.mirrors, "mirrors", name)

    def bundle(self, name: str) -> SecretsBundle:
        return _named(self.path, self.model.secrets, "secrets", name)

    def store(self, name: str) -> Store:
        return _named(self.path, self.model.stores, "stores", name)

    def store_for(self, db_name: str) -> tuple[str, Store]:
        store_name = self.database(db_name).store or next(iter(self.model.stores))
        return store_name, self.model.stores[store_name]

    @property
    def dns(self) -> DnsSettings:
        """Resolver settings; without a [dns] section, the system resolver's."""
        return self.model.dns or DnsSettings()

    def sending_domain(self, name: str) -> SendingDomain:
        key = name.rstrip(".").lower()
        return _named(self.path, self.model.sending_domains, "sending_domains", key)

    def providers_for(self, domain: str, now: datetime | None = None) -> dict[str, MailProvider]:
        """Providers ``domain`` must authorise at ``now``, migration window included."""
        return expected_providers(self.model.mail_providers, self.sending_domain(domain), now)

    def dkim_selectors_for(
        self, domain: str, now: datetime | None = None
    ) -> list[ExpectedSelector]:
        """The domain's own selectors, then each expected provider's."""
        return expected_selectors(self.model.mail_providers, self.sending_domain(domain), now)

    def probe(self, name: str) -> Probe:
        return _named(self.path, self.model.probes, "probes", name)

    def app_environment(self, name: str) -> AppEnvironment:
        return _named(self.path, self.model.app_environment, "app_environment", name)

    def queue(self, name: str) -> QueueBacklog:
        return _named(self.path, self.model.queues, "queues", name)

    def resolve_path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)


T = TypeVar("T")


def _named(path: Path, table: dict[str, T], section: str, name: str) -> T:
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        raise ConfigError(f"{path}: no {section}.{name} (inventory has: {known})") from None


def missing_secret(var: str, env_file: Path | None) -> str:
    """Why ``var`` is missing, and both ways to supply it: the environment, or the
    inventory's own env_file (named when there is one)."""
    if env_file is not None:
        other = (
            f"and env_file {env_file} does not set it either (or fix: add the line {var}=... "
            "to that file)"
        )
    else:
        other = (
            f"and the inventory has no env_file to supply it (or fix: put the line {var}=... "
            'in a 0600 file and name it at the top of the inventory: env_file = "/path/to/it")'
        )
    return f"environment variable {var} is not set (fix: export {var}=...), {other}"


def _fix_hint(loc: str, err_type: str) -> str:
    if err_type == "extra_forbidden":
        return "remove it or check its spelling"
    if err_type == "missing":
        return "add it"
    if err_type == NOT_AN_ENV_NAME:
        return (
            "write the upper-case NAME of the variable that holds the secret, e.g. "
            "CRM_DB_PASSWORD, and set that variable; if a secret was written here, rotate it"
        )
    return "correct the value"


# Keys whose value may be a secret (or, for *_env, a secret put where its name belongs):
# an error about them never shows the value. The rest is shown redacted.
_SECRET_KEY = re.compile(
    r"(_env$|pass|secret|token|credential|private|authorization|cookie|api[_-]?key|access[_-]?key"
    r"|^headers$|^json$)",
    re.IGNORECASE,
)
# user:password@ in a value that is not a URL (an endpoint): redact() only knows URLs.
_USERINFO = re.compile(r"(^|//)[^/\s@:]*:[^/\s@]*@")


def _found(err_type: str, loc: tuple[int | str, ...], found: object) -> str:
    """``, found VALUE`` when the value helps and cannot be a secret, else nothing."""
    if err_type in ("missing", "extra_forbidden") or isinstance(found, dict):
        return ""  # an unknown key's value is no help, and may be a password = "..."
    if any(_SECRET_KEY.search(str(part)) for part in loc):
        return ""
    text = repr(found)
    if _USERINFO.search(text):
        return ""
    return f", found {redact(text)}"


def _format_validation(path: Path, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        # A dotted key (a domain) is quoted, as TOML needs it: sending_domains."a.test".mx
        loc = ".".join(f'"{p}"' if "." in str(p) else str(p) for p in err["loc"])
        shown = _found(err["type"], err["loc"], err.get("input"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {loc}: {msg}{shown} (fix: {_fix_hint(loc, err['type'])})")
    return lines


def _cross_checks(path: Path, model: InventoryModel) -> list[str]:
    problems = []
    for name, db in model.databases.items():
        for label, dsn in (("dsn", db.dsn), ("sandbox.dsn", db.sandbox.dsn if db.sandbox else "")):
            if dsn and _dsn_has_password(dsn):
                problems.append(
                    f"{path}: databases.{name}.{label}: contains a password "
                    "(fix: remove it and name an environment variable in password_env)"
                )
        if db.store is not None and db.store not in model.stores:
            problems.append(
                f"{path}: databases.{name}.store: no store {db.store!r} "
                f"(fix: use one of {sorted(model.stores)})"
            )
        if db.store is None and len(model.stores) != 1:
            problems.append(
                f"{path}: databases.{name}.store: missing, and the inventory has "
                f"{len(model.stores)} stores (fix: name the off-site store to use)"
            )
        if db.encrypt and model.gpg is None:
            problems.append(
                f"{path}: databases.{name}: encrypt = true needs a [gpg] section "
                "(fix: add [gpg] recipients, or set encrypt = false explicitly)"
            )
    for name, mirror in model.mirrors.items():
        for role in ("source", "target"):
            store = getattr(mirror, role)
            if store not in model.stores:
                problems.append(
                    f"{path}: mirrors.{name}.{role}: no store {store!r} "
                    f"(fix: use one of {sorted(model.stores)})"
                )
        if mirror.source == mirror.target:
            problems.append(
                f"{path}: mirrors.{name}: source and target are the same store "
                "(fix: the target must be a different, off-site bucket)"
            )
    for name, bundle in model.secrets.items():
        if bundle.store not in model.stores:
            problems.append(
                f"{path}: secrets.{name}.store: no store {bundle.store!r} "
                f"(fix: use one of {sorted(model.stores)})"
            )
        if model.gpg is None:
            problems.append(
                f"{path}: secrets.{name}: a secrets bundle is always encrypted and needs a "
                "[gpg] section (fix: add [gpg] recipients)"
            )
    return problems + mail_cross_checks(path, model)


def _dsn_has_password(dsn: str) -> bool:
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
        return bool(params.get("password") or params.get("sslpassword"))
    except Exception:  # a malformed DSN is reported when first used; never echo it here
        return False


# What each kind of command needs. A backup host must not need the drill private key,
# its passphrase or the sandbox password, so those are only required for "all".
SCOPES = ("all", "backup", "store")
_STORE = frozenset({"all", "backup", "store"})
_BACKUP = frozenset({"all", "backup"})
_ALL = frozenset({"all"})


def _env_refs(model: InventoryModel) -> list[tuple[str, str, frozenset[str]]]:
    refs: list[tuple[str, str, frozenset[str]]] = []
    for name, store in model.stores.items():
        refs += [
            (f"stores.{name}.access_key_env", store.access_key_env, _STORE),
            (f"stores.{name}.secret_key_env", store.secret_key_env, _STORE),
        ]
    for name, db in model.databases.items():
        if db.password_env:
            refs.append((f"databases.{name}.password_env", db.password_env, _BACKUP))
        if db.sandbox and db.sandbox.password_env:
            refs.append((f"databases.{name}.sandbox.password_env", db.sandbox.password_env, _ALL))
    if model.gpg and model.gpg.drill_passphrase_env:
        refs.append(("gpg.drill_passphrase_env", model.gpg.drill_passphrase_env, _ALL))
    refs += [(key, var, _ALL) for key, var in probe_env_refs(model.probes, model.queues)]
    return refs


def load(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    scope: str = "all",
) -> Inventory:
    """Validate the whole inventory, and that every secret and key file that ``scope``
    needs is present: "all" (restore, drills, checks), "backup", or "store" (list, prune)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    p = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: inventory file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        model = InventoryModel.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_format_validation(p, exc))) from None
    problems = _cross_checks(p, model)
    inv = Inventory(path=p.resolve(), model=model)
    env = dict(os.environ if environ is None else environ)
    from_file: set[str] = set()
    env_path = inv.resolve_path(model.env_file) if model.env_file else None
    if env_path is not None:
        if not env_path.is_file():
            problems.append(
                f"{p}: env_file: {env_path} does not exist (fix: create it or remove env_file)"
            )
        else:
            warn_if_exposed(env_path, "the inventory's env_file")
            try:
                for key, value in read_env_file(env_path).items():
                    if key not in env:
                        env[key] = value
                        from_file.add(key)
            except ConfigError as exc:
                problems.append(f"{p}: env_file: {exc.message}")
    for key, var, scopes in _env_refs(model):
        if scope not in scopes:
            continue
        try:
            resolve_env(var, env)
        except SecretMissing:
            problems.append(f"{p}: {key}: {missing_secret(var, env_path)}")
    for label, value, scopes in _file_refs(model):
        if scope not in scopes:
            continue
        file = inv.resolve_path(value)
        if not file.is_file():
            problems.append(f"{p}: {label}: file {file} not found (fix: correct the path)")
        elif file.stat().st_size == 0:
            problems.append(f"{p}: {label}: file {file} is empty (fix: export the key into it)")
    if problems:
        raise ConfigError("\n".join(problems))
    return Inventory(path=inv.path, model=model, env=env, from_env_file=frozenset(from_file))


def _file_refs(model: InventoryModel) -> list[tuple[str, str, frozenset[str]]]:
    refs: list[tuple[str, str, frozenset[str]]] = []
    if model.gpg:
        refs.append(("gpg.public_keys_file", model.gpg.public_keys_file, _BACKUP))
        if model.gpg.drill_private_key_file:
            refs.append(("gpg.drill_private_key_file", model.gpg.drill_private_key_file, _ALL))
    return refs
