"""Inventory sections for mail delivery probes and the runbook's diagnosis steps.

- ``[probes.NAME]``: one SMTP -> IMAP round trip. Either *direct* (``smtp``,
  ``from_address``, ``to_address``: opsdrill submits the message itself) or *triggered*
  (``trigger``, ``expect``: an HTTP request makes the application send it, and ``expect``
  says how to recognise it), never both. Both kinds name the ``imap`` mailbox that
  receives, how long to wait and the latency allowed, the Authentication-Results
  authserv-ids to trust (and whether a header from one of them is required:
  ``require_auth_results``) and, optionally, a ``spamd`` to score the received copy.
- ``[app_environment.NAME]``: where the application's environment comes from (an env file,
  or a command such as ``docker exec app printenv``: the same source keys as
  ``[secrets.*]``, read the same way) and which keys must not be set in it.
- ``[queues.NAME]``: a BullMQ queue in Redis with a limit per job state (waiting,
  prioritized, paused, active, delayed, overdue, failed) and on the oldest job's age.

A triggered probe's request must carry a per-run ``{token}`` (in ``trigger.url`` or a
string of ``trigger.json``) that the application shows in its message: without it two
runs at once, or a run whose application sent nothing, would claim another run's message.

Secrets are environment variable names only (``password_env``, ``bearer_token_env``, a
trigger header's ``{ env = "VAR" }``).
Relative paths (``ca_file``, ``env_file``) are relative to the inventory file: resolve
them with ``Inventory.resolve_path``. Like every section, all problems are reported at once.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from opsdrill.config.fields import ENV_NAME_PATTERN, Host, SecretEnvName, StrictModel, port_problem

TlsMode = Literal["starttls", "tls", "none"]
# A variable of the application's environment (not a secret of ours: forbidden_keys).
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN)]
# A network wait: positive and bounded, so a typo (3000 for 30) cannot stall a run.
Timeout = Annotated[float, Field(gt=0, le=300)]
Port = Annotated[int, Field(ge=1, le=65535)]
_ADDRESS = re.compile(r"^[^@\s]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def _address(value: str) -> str:
    """``local@domain``, the domain lower-cased (the local part is the server's business)."""
    if not _ADDRESS.match(value):
        raise ValueError("not an email address (local@domain)")
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


Address = Annotated[str, AfterValidator(_address)]
Pattern = Annotated[str, AfterValidator(_regex)]


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Endpoint(StrictModel):
    host: Host
    ca_file: str | None = Field(default=None, description="PEM CA bundle for a private CA")
    verify: bool = Field(default=True, description="false: TLS without certificate checks")
    timeout_seconds: Timeout = 10.0


class _Tls(_Endpoint):
    tls: TlsMode

    @model_validator(mode="after")
    def _plaintext_only_locally(self) -> _Tls:
        if self.tls == "none" and not _loopback(self.host):
            raise ValueError(
                f"tls = 'none' would send the password in clear to {self.host}; it is allowed "
                "for 127.0.0.1 only (fix: use 'starttls' or 'tls')"
            )
        return self


class SmtpSubmission(_Tls):
    """Where a direct probe submits its message (the application's own SMTP account)."""

    port: Port = 587
    tls: TlsMode = "starttls"
    user: str | None = Field(default=None, min_length=1)
    password_env: SecretEnvName | None = None

    @model_validator(mode="after")
    def _credentials_pair(self) -> SmtpSubmission:
        if (self.user is None) != (self.password_env is None):
            raise ValueError("set both user and password_env, or neither (no AUTH)")
        return self


class ImapMailbox(_Tls):
    """The mailbox that receives: searched in ``folders``, then ``junk_folders`` (finding
    the message there fails the probe as "delivered to junk")."""

    port: Port = 993
    tls: TlsMode = "tls"
    user: str = Field(min_length=1)
    password_env: SecretEnvName
    folders: list[str] = Field(default_factory=lambda: ["INBOX"], min_length=1)
    junk_folders: list[str] = Field(default_factory=lambda: ["Junk"])

    @model_validator(mode="after")
    def _folders_distinct(self) -> ImapMailbox:
        both = sorted(set(self.folders) & set(self.junk_folders))
        if both:
            raise ValueError(f"{both} listed in both folders and junk_folders (fix: pick one)")
        return self


class SpamdScoring(StrictModel):
    """SpamAssassin's spamd (SPAMC protocol) scoring the received copy."""

    host: Host = "127.0.0.1"
    port: Port = 783
    max_score: float = Field(default=5.0, le=100)
    timeout_seconds: Timeout = 30.0


TOKEN = "{token}"


def _mentions_token(value: Any) -> bool:
    if isinstance(value, str):
        return TOKEN in value
    if isinstance(value, dict):
        return any(_mentions_token(v) for v in value.values())
    if isinstance(value, list):
        return any(_mentions_token(v) for v in value)
    return False


class HeaderFromEnv(StrictModel):
    """A trigger header whose value is a secret (an API key, a session cookie): read from
    this environment variable, sent with the request, never written or shown anywhere."""

    env: SecretEnvName


# RFC 9110 5.1: a field name is a token.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Given by bearer_token_env (one place for the token, and a refusal names that key).
_NOT_A_HEADER = frozenset({"authorization"})
# Secrets by nature: only as { env = "VAR" }.
_SECRET_HEADERS = frozenset({"cookie", "proxy-authorization"})


class HttpTrigger(StrictModel):
    """The request that makes the application send (e.g. a portal invite); ``{token}``
    in ``url`` or a string of ``json`` is replaced by each run's own token."""

    url: str
    method: Literal["POST", "PUT", "PATCH", "GET"] = "POST"
    # TOML key ``json``: the request body (a JSON object).
    json_body: dict[str, Any] | None = Field(default=None, alias="json")
    headers: dict[str, str | HeaderFromEnv] = Field(
        default_factory=dict,
        description='sent with the request; a secret value as { env = "VAR" }, never literally',
    )
    bearer_token_env: SecretEnvName | None = None
    ca_file: str | None = None
    verify: bool = True
    timeout_seconds: Timeout = 10.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if any(c.isspace() for c in value):
            raise ValueError("contains whitespace (fix: remove it, or percent-encode it)")
        parts = urlsplit(value)
        if parts.password:
            raise ValueError("contains a password (fix: use bearer_token_env)")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL")
        _, colon, port = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")
        if colon and (problem := port_problem(port)):
            raise ValueError(problem)
        return value

    @field_validator("headers")
    @classmethod
    def _no_auth_header(
        cls, value: dict[str, str | HeaderFromEnv]
    ) -> dict[str, str | HeaderFromEnv]:
        for name, header in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a header name (letters, digits and -)")
            if isinstance(header, str) and ("\r" in header or "\n" in header):
                raise ValueError(f"{name}: a header value cannot contain a line break")
            if name.lower() in _NOT_A_HEADER:
                raise ValueError("secrets go in bearer_token_env, not in headers")
            if name.lower() in _SECRET_HEADERS and isinstance(header, str):
                raise ValueError(
                    f"{name} holds a secret: never write it here (fix: put it in an "
                    f'environment variable and name that: {name} = {{ env = "VAR" }})'
                )
        return value

    def secret_headers(self) -> dict[str, str]:
        """Header name -> the variable that holds its value."""
        return {k: v.env for k, v in self.headers.items() if isinstance(v, HeaderFromEnv)}

    @property
    def carries_token(self) -> bool:
        return TOKEN in self.url or _mentions_token(self.json_body)


class ExpectedMessage(StrictModel):
    """How to recognise the message a triggered probe causes (besides the run's token,
    which it must show: in a header or a text part). ``window_seconds``: a message the
    IMAP server received (INTERNALDATE, its clock) longer than this before the trigger
    never counts; the slack is for the two clocks' difference."""

    to: Address = Field(description="the recipient; {token} in it for a plus-address")
    from_address: Address | None = Field(default=None, description="when set, must match")
    subject_pattern: Pattern = Field(description="regular expression searched in Subject")
    link_pattern: Pattern | None = Field(default=None, description="the link to extract")
    fetch_link: bool = Field(default=False, description="GET the link; it must answer 2xx")
    link_timeout_seconds: Timeout = 10.0
    window_seconds: float = Field(
        default=120.0,
        gt=0,
        le=86400,
        description="a message received longer than this before the trigger never counts",
    )

    @model_validator(mode="after")
    def _fetch_needs_pattern(self) -> ExpectedMessage:
        if self.fetch_link and self.link_pattern is None:
            raise ValueError("fetch_link = true needs a link_pattern")
        return self


class Probe(StrictModel):
    # direct
    smtp: SmtpSubmission | None = None
    from_address: Address | None = None
    to_address: Address | None = None
    # triggered
    trigger: HttpTrigger | None = None
    expect: ExpectedMessage | None = None
    # both
    imap: ImapMailbox
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600, description="give up waiting")
    max_latency_seconds: float = Field(default=10.0, gt=0, description="accepted -> visible")
    use_idle: bool = Field(default=True, description="IMAP IDLE when offered, else polling")
    poll_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    trusted_authserv_ids: list[str] = Field(
        default_factory=list,
        description="exact ids, or *.example.com for a provider whose id names the host",
    )
    trust_topmost_without_id: bool = Field(
        default=False,
        description="trust the topmost Authentication-Results header when it has no "
        "authserv-id (Microsoft 365 writes none)",
    )
    require_auth_results: bool = Field(
        default=False,
        description="a trusted Authentication-Results header must report spf, dkim or dmarc",
    )
    require_dkim: bool = Field(default=True, description="an aligned, valid DKIM signature")
    spamd: SpamdScoring | None = None
    sweep_after_minutes: float | None = Field(
        default=60.0, gt=0, description="delete probe messages older than this (crashed runs)"
    )

    @property
    def kind(self) -> Literal["direct", "triggered"]:
        return "triggered" if self.trigger is not None else "direct"

    @field_validator("trusted_authserv_ids")
    @classmethod
    def _lower_ids(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value]

    @field_validator("trusted_authserv_ids")
    @classmethod
    def _wildcards_are_suffixes(cls, value: list[str]) -> list[str]:
        for entry in value:
            if "*" in entry and (not entry.startswith("*.") or "*" in entry[2:]):
                raise ValueError(
                    f"{entry!r}: a wildcard is only allowed as a leading '*.' (e.g. "
                    "'*.mail.yahoo.com'), matching that domain's hosts"
                )
        return value

    @field_validator("require_auth_results")
    @classmethod
    def _required_needs_trusted(cls, value: bool, info: ValidationInfo) -> bool:
        # both are declared (so validated) first; absent if they were invalid
        if (
            value
            and "trusted_authserv_ids" in info.data
            and not info.data["trusted_authserv_ids"]
            and not info.data.get("trust_topmost_without_id")
        ):
            raise ValueError(
                "true needs at least one entry in trusted_authserv_ids (or "
                "trust_topmost_without_id = true), and there is none: no "
                "Authentication-Results header could ever count (list the receiving side's "
                "authserv-ids there, or set require_auth_results = false)"
            )
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Probe:
        direct = [k for k in ("smtp", "from_address", "to_address") if getattr(self, k) is not None]
        triggered = [k for k in ("trigger", "expect") if getattr(self, k) is not None]
        if direct and triggered:
            raise ValueError(
                f"a probe is either direct (smtp, from_address, to_address) or triggered "
                f"(trigger, expect), not both: found {', '.join(direct + triggered)} "
                "(fix: split it into two probes)"
            )
        if not direct and not triggered:
            raise ValueError(
                "neither direct (smtp, from_address, to_address) nor triggered "
                "(trigger, expect) (fix: add one of the two sets)"
            )
        wanted = ("smtp", "from_address", "to_address") if direct else ("trigger", "expect")
        missing = [k for k in wanted if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {self.kind} probe also needs {', '.join(missing)} (fix: add it)")
        if self.trigger is not None and not self.trigger.carries_token:
            raise ValueError(
                "trigger: no {token} in url or json: each run's message must be told apart "
                "from every other run's, or two runs at once (and a run whose application "
                "sent nothing) would claim another run's message (fix: put {token} where the "
                "application carries it into the message, e.g. json = { email = "
                '"probe@example.com", name = "Probe {token}" } when the invitation greets '
                'the invitee by name, or a plus-address "probe+{token}@example.com" in json '
                "and expect.to)"
            )
        if self.max_latency_seconds > self.timeout_seconds:
            raise ValueError(
                f"max_latency_seconds ({self.max_latency_seconds:g}) exceeds timeout_seconds "
                f"({self.timeout_seconds:g}): a slow message would time out instead"
            )
        return self


class EnvSource(StrictModel):
    """Where an application's environment is read: an env file on this host, or the
    output of a command (no shell), e.g. ``["docker", "exec", "app", "printenv"]``."""

    env_file: str | None = None
    command: list[str] | None = Field(default=None, min_length=1)
    command_timeout_seconds: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> EnvSource:
        if (self.env_file is None) == (self.command is None):
            raise ValueError("set exactly one of env_file or command")
        return self


class AppEnvironment(EnvSource):
    """Keys that must not be set in production (dev/test-only settings)."""

    forbidden_keys: list[EnvName] = Field(
        default_factory=lambda: ["EMAIL_REDIRECT_TO"], min_length=1
    )


class RedisEndpoint(_Endpoint):
    port: Port = 6379
    tls: bool = False
    username: str | None = None
    password_env: SecretEnvName | None = None
    db: int = Field(default=0, ge=0, le=255)
    timeout_seconds: Timeout = 5.0


Limit = Annotated[int | None, Field(ge=0)]


class QueueBacklog(StrictModel):
    """A BullMQ queue (``<prefix>:<queue>:wait``, ``delayed``, ``failed``... and the job
    hashes beside them): the most jobs allowed in each state, and how old the oldest
    waiting job may be. The defaults, and why each is what it is:
    ``opsdrill.mail.backlog.Thresholds``."""

    redis: RedisEndpoint
    queue: str = Field(pattern=_NAME)
    prefix: str = Field(default="bull", min_length=1)
    max_waiting: Limit = Field(default=100, description="the wait list")
    max_prioritized: Limit = 100
    max_paused: Limit = Field(default=0, description="jobs held by a paused queue")
    max_active: Limit = 100
    max_delayed: Limit = Field(default=None, description="not judged unless set")
    max_overdue: Limit = Field(default=0, description="delayed jobs past due + grace")
    overdue_grace_seconds: float = Field(default=60, ge=0)
    max_failed: Limit = Field(default=10, description="failed within failed_window_seconds")
    failed_window_seconds: float = Field(default=3600, gt=0)
    max_oldest_age_seconds: float = Field(default=600, gt=0)


ProbeName = Annotated[str, Field(pattern=_NAME)]


def insecure_tls(
    probes: dict[str, Probe], queues: dict[str, QueueBacklog]
) -> list[tuple[str, str, bool]]:
    """(inventory key, host, is loopback) of every connection with ``verify = false``:
    TLS that checks no certificate, so anyone on the path can read the password."""
    found: list[tuple[str, str, bool]] = []
    for name, probe in probes.items():
        parts: list[tuple[str, Any]] = [("smtp", probe.smtp), ("imap", probe.imap)]
        for section, endpoint in parts:
            if endpoint is not None and not endpoint.verify and endpoint.tls != "none":
                host = endpoint.host
                found.append((f"probes.{name}.{section}.verify", host, _loopback(host)))
        trigger = probe.trigger
        if trigger is not None and not trigger.verify and trigger.url.startswith("https:"):
            host = urlsplit(trigger.url).hostname or ""
            found.append((f"probes.{name}.trigger.verify", host, _loopback(host)))
    for name, queue in queues.items():
        redis = queue.redis
        if redis.tls and not redis.verify:
            found.append((f"queues.{name}.redis.verify", redis.host, _loopback(redis.host)))
    return found


def probe_env_refs(
    probes: dict[str, Probe], queues: dict[str, QueueBacklog]
) -> list[tuple[str, str]]:
    """(inventory key, variable) of every secret these sections name."""
    refs: list[tuple[str, str]] = []
    for name, probe in probes.items():
        where = f"probes.{name}"
        if probe.smtp is not None and probe.smtp.password_env:
            refs.append((f"{where}.smtp.password_env", probe.smtp.password_env))
        if probe.trigger is not None and probe.trigger.bearer_token_env:
            refs.append((f"{where}.trigger.bearer_token_env", probe.trigger.bearer_token_env))
        if probe.trigger is not None:
            refs += [
                (f"{where}.trigger.headers.{name}.env", var)
                for name, var in probe.trigger.secret_headers().items()
            ]
        refs.append((f"{where}.imap.password_env", probe.imap.password_env))
    for name, queue in queues.items():
        if queue.redis.password_env:
            refs.append((f"queues.{name}.redis.password_env", queue.redis.password_env))
    return refs
