"""The inventory's probes, application environments and queues mapped to library calls,
as ``opsdrill.dns.suite`` maps sending domains.

For a ``[probes.NAME]``: the SMTP endpoint, the IMAP mailbox, the application trigger
(each secret resolved through ``Inventory.secret``, so registered for redaction), how to
wait for the message and how to judge it, then one run (``run_probe``). For an
``[app_environment.NAME]``: where the environment is read and its variables. For a
``[queues.NAME]``: the thresholds and the backlog. Errors are the ones a check reports:
a server refusing opsdrill's *own* credentials is ``CredentialsRejected`` naming the
inventory key and the environment variable to fix (``Inventory.secret_setting``), a
certificate that does not verify is ``TargetUnreachable`` naming the ``ca_file`` key, both
raised without the library's frames (pytest prints each frame's arguments, and those of
``trigger_app`` or ``bullmq_backlog`` hold secrets).

``target`` is the label messages start with (``probe:transactional``, ``queue:email``).
No pytest here: one run per session, Allure and warnings are the plugin's.
"""

from __future__ import annotations

from email.utils import getaddresses
from typing import Any, TypeVar

from opsdrill.config.inventory import Inventory
from opsdrill.config.probes import AppEnvironment, Probe, QueueBacklog
from opsdrill.dns.resolver import Resolver
from opsdrill.errors import CredentialsRejected, OpsdrillError, TargetUnreachable
from opsdrill.findings import Finding
from opsdrill.mail.appenv import read_app_env
from opsdrill.mail.backlog import Backlog, Thresholds, bullmq_backlog
from opsdrill.mail.errors import AuthRejected, TlsVerifyFailed
from opsdrill.mail.imap import ImapMailbox
from opsdrill.mail.probe import (
    Analysis,
    AppTrigger,
    ProbeResult,
    ReceiveOptions,
    SpamdTarget,
    run_direct_probe,
    run_triggered_probe,
)
from opsdrill.mail.smtp import SmtpEndpoint
from opsdrill.redact import redact

T = TypeVar("T")


def required(value: T | None, what: str) -> T:
    """``value`` narrowed from ``None``, for what the inventory model guarantees (a direct
    probe has ``smtp``, a triggered one ``trigger`` and ``expect``...). Raises
    ``RuntimeError``, which a check reports as *broken*, should it be missing anyway: an
    ``assert`` would raise ``AssertionError``, reported as a *failure* of the target."""
    if value is None:
        raise RuntimeError(
            f"{what} is missing although the inventory model requires it (an opsdrill "
            "bug: please report it with the inventory section)"
        )
    return value


def rejected(
    exc: AuthRejected, key: str, var: str | None, inv: Inventory, target: str
) -> CredentialsRejected:
    """``exc`` (a server refused opsdrill's own credentials) as the error a check reports
    *broken*: what was refused, by whom, and the inventory key and variable to fix."""
    fix = (
        inv.secret_setting(key, var)
        if var
        else f"{key} is not set in the inventory, but the server wants a password: set it "
        "to the environment variable holding one"
    )
    return CredentialsRejected(
        f"{target}: {exc.message}: opsdrill's own credentials were refused, so nothing "
        f"could be checked (fix: {fix})"
    )


def ca_hint(exc: TlsVerifyFailed, key: str) -> TargetUnreachable:
    """An untrusted certificate: broken like any unreachable server, naming ``key``."""
    return TargetUnreachable(
        f"{exc.message}: the server's certificate is not trusted (fix: set {key} to the PEM "
        "file of the CA that issued it, e.g. your private CA or the server's self-signed "
        "certificate; do not set verify = false)"
    )


# -- probes ------------------------------------------------------------------------------


def _path(inv: Inventory, value: str | None) -> str | None:
    return str(inv.resolve_path(value)) if value else None


def smtp_endpoint(inv: Inventory, name: str) -> SmtpEndpoint:
    cfg = required(inv.probe(name).smtp, f"probes.{name}.smtp")
    return SmtpEndpoint(
        host=cfg.host,
        port=cfg.port,
        tls=cfg.tls,
        user=cfg.user,
        password=inv.secret(cfg.password_env) if cfg.password_env else None,
        ca_file=_path(inv, cfg.ca_file),
        verify=cfg.verify,
        timeout=cfg.timeout_seconds,
    )


def imap_mailbox(inv: Inventory, name: str) -> ImapMailbox:
    cfg = inv.probe(name).imap
    return ImapMailbox(
        host=cfg.host,
        port=cfg.port,
        tls=cfg.tls,
        user=cfg.user,
        password=inv.secret(cfg.password_env),
        ca_file=_path(inv, cfg.ca_file),
        verify=cfg.verify,
        timeout=cfg.timeout_seconds,
    )


def app_trigger(inv: Inventory, name: str) -> AppTrigger:
    cfg = required(inv.probe(name).trigger, f"probes.{name}.trigger")
    secret = cfg.secret_headers()  # header -> variable; inv.secret registers each value
    return AppTrigger(
        headers={k: v for k, v in cfg.headers.items() if isinstance(v, str)},
        secret_headers={header: inv.secret(var) for header, var in secret.items()},
        url=cfg.url,
        method=cfg.method,
        json_body=cfg.json_body,
        bearer_token=inv.secret(cfg.bearer_token_env) if cfg.bearer_token_env else None,
        timeout=cfg.timeout_seconds,
        ca_file=_path(inv, cfg.ca_file),
        verify=cfg.verify,
    )


def receive_options(spec: Probe) -> ReceiveOptions:
    return ReceiveOptions(
        folders=(*spec.imap.folders, *spec.imap.junk_folders),
        timeout=spec.timeout_seconds,
        interval=spec.poll_interval_seconds,
        use_idle=spec.use_idle,
        sweep_older_than_minutes=spec.sweep_after_minutes,
    )


def analysis(spec: Probe, resolver: Resolver) -> Analysis:
    spamd = spec.spamd
    return Analysis(
        resolver=resolver,
        trusted_authserv_ids=tuple(spec.trusted_authserv_ids),
        trust_topmost_without_id=spec.trust_topmost_without_id,
        spamd=SpamdTarget(spamd.host, spamd.port, spamd.timeout_seconds) if spamd else None,
    )


def credential(spec: Probe, name: str, exc: AuthRejected) -> tuple[str, str | None]:
    """The inventory key and variable of the secret ``exc`` says was refused."""
    where = f"probes.{name}"
    if exc.credential == "smtp" and spec.smtp is not None:
        return f"{where}.smtp.password_env", spec.smtp.password_env
    if exc.credential == "trigger" and spec.trigger is not None:
        if spec.trigger.bearer_token_env or not spec.trigger.secret_headers():
            return f"{where}.trigger.bearer_token_env", spec.trigger.bearer_token_env
        header, var = sorted(spec.trigger.secret_headers().items())[0]
        return f"{where}.trigger.headers.{header}.env", var
    return f"{where}.imap.password_env", spec.imap.password_env


def ca_key(name: str, exc: TlsVerifyFailed) -> str:
    """The ``ca_file`` key of the connection whose certificate did not verify."""
    section = {"link": "trigger"}.get(exc.endpoint, exc.endpoint)
    return f"probes.{name}.{section}.ca_file"


def probe_endpoints(spec: Probe, name: str) -> dict[str, Any]:
    """Where the probe sends and looks, from the inventory (no secret is resolved)."""
    out: dict[str, Any] = {
        "probe": name,
        "kind": spec.kind,
        "imap": spec.imap.model_dump(exclude={"password_env"}),
        "timeout_seconds": spec.timeout_seconds,
        "max_latency_seconds": spec.max_latency_seconds,
    }
    if spec.smtp is not None:
        out["smtp"] = spec.smtp.model_dump(exclude={"password_env"})
        out["from"], out["to"] = spec.from_address, spec.to_address
    if spec.trigger is not None and spec.expect is not None:
        out["trigger"] = {
            "method": spec.trigger.method,
            "url": redact(spec.trigger.url),
            "headers": sorted(spec.trigger.headers),  # names only: a value may be secret
        }
        out["expect"] = spec.expect.model_dump()
    return out


def run_probe(inv: Inventory, name: str, resolver: Resolver, target: str) -> ProbeResult:
    """One run of ``[probes.NAME]``: direct (SMTP, then IMAP) or triggered (the
    application's HTTP trigger, then IMAP). A refused credential or an untrusted
    certificate is raised as the error naming what to fix (see the module docstring);
    an untrusted certificate of a later step (the link) is kept in ``result.errors``
    with the same hint."""
    spec = inv.probe(name)
    try:
        result = _run(inv, name, spec, resolver)
    except AuthRejected as exc:
        key, var = credential(spec, name, exc)
        raise rejected(exc, key, var, inv, target) from None
    except TlsVerifyFailed as exc:
        raise ca_hint(exc, ca_key(name, exc)) from None
    for step, error in list(result.errors.items()):
        if isinstance(error, TlsVerifyFailed):
            result.errors[step] = ca_hint(error, ca_key(name, error))
    return result


def _run(inv: Inventory, name: str, spec: Probe, resolver: Resolver) -> ProbeResult:
    if spec.kind == "direct":
        return run_direct_probe(
            smtp_endpoint(inv, name),
            imap_mailbox(inv, name),
            sender=required(spec.from_address, f"probes.{name}.from_address"),
            recipient=required(spec.to_address, f"probes.{name}.to_address"),
            receive=receive_options(spec),
            analysis=analysis(spec, resolver),
        )
    expect = required(spec.expect, f"probes.{name}.expect")
    return run_triggered_probe(
        app_trigger(inv, name),
        imap_mailbox(inv, name),
        recipient=expect.to,
        subject_pattern=expect.subject_pattern,
        link_pattern=expect.link_pattern,
        fetch_first_link=expect.fetch_link,
        link_timeout=expect.link_timeout_seconds,
        receive=receive_options(spec),
        analysis=analysis(spec, resolver),
        window=expect.window_seconds,
    )


def from_findings(result: ProbeResult, expected: str | None) -> list[Finding]:
    """The received message's From against ``expected`` (``expect.from_address``): exactly
    that one address, case folded. Nothing expected, nothing found."""
    if expected is None:
        return []
    froms = [a.lower() for _, a in getaddresses(result.headers.get("From", [])) if a]
    if froms == [expected.lower()]:
        return []
    found = ", ".join(froms) or "no From"
    return [Finding("probe.from_address", f"expected From {expected}, found {found}")]


# -- application environments -------------------------------------------------------------


def app_env_source(cfg: AppEnvironment, name: str, inv: Inventory) -> str:
    """Where ``[app_environment.NAME]`` is read, in words."""
    if cfg.env_file is not None:
        return f"env file {inv.resolve_path(cfg.env_file)}"
    command = required(cfg.command, f"app_environment.{name}.command")
    return f"the output of `{' '.join(command)}`"


def read_app_environment(inv: Inventory, name: str, target: str) -> dict[str, str]:
    """The variables; the forbidden keys' values are left unregistered (a check shows
    them when set), every other value is registered as a secret. A command that cannot
    run, fails or times out is ``TargetUnreachable`` naming the inventory key."""
    cfg = inv.app_environment(name)
    try:
        return read_app_env(
            env_file=inv.resolve_path(cfg.env_file) if cfg.env_file else None,
            command=cfg.command,
            timeout=cfg.command_timeout_seconds,
            public=cfg.forbidden_keys,
        )
    except TargetUnreachable as exc:
        raise TargetUnreachable(
            f"{target}: {exc.message}, so the application's environment could not be "
            f"read (fix: is the application running where app_environment.{name}."
            "command looks for it?)"
        ) from None


# -- queues -------------------------------------------------------------------------------


def queue_where(cfg: QueueBacklog) -> str:
    redis = cfg.redis
    return f"Redis {redis.host}:{redis.port}/{redis.db}"


def queue_thresholds(cfg: QueueBacklog) -> Thresholds:
    return Thresholds(
        max_waiting=cfg.max_waiting,
        max_prioritized=cfg.max_prioritized,
        max_paused=cfg.max_paused,
        max_active=cfg.max_active,
        max_delayed=cfg.max_delayed,
        max_overdue=cfg.max_overdue,
        max_failed=cfg.max_failed,
        max_oldest_age_seconds=cfg.max_oldest_age_seconds,
        overdue_grace_seconds=cfg.overdue_grace_seconds,
        failed_window_seconds=cfg.failed_window_seconds,
    )


def queue_backlog(inv: Inventory, name: str, target: str) -> Backlog:
    """The queue's backlog; a refused Redis password is ``CredentialsRejected`` naming
    ``queues.NAME.redis.password_env`` (broken, like Redis unreachable), an untrusted
    certificate names ``queues.NAME.redis.ca_file``."""
    cfg = inv.queue(name)
    try:
        return _backlog(inv, cfg)
    except AuthRejected as exc:
        key = f"queues.{name}.redis.password_env"
        raise rejected(exc, key, cfg.redis.password_env, inv, target) from None
    except TlsVerifyFailed as exc:
        hinted = ca_hint(exc, f"queues.{name}.redis.ca_file")
        raise hinted.with_traceback(None) from None
    except OpsdrillError as exc:
        raise exc.with_traceback(None) from None


def _backlog(inv: Inventory, cfg: QueueBacklog) -> Backlog:
    redis = cfg.redis
    return bullmq_backlog(
        redis.host,
        redis.port,
        inv.secret(redis.password_env) if redis.password_env else None,
        redis.db,
        cfg.queue,
        cfg.prefix,
        redis.timeout_seconds,
        username=redis.username,
        tls=redis.tls,
        ca_file=str(inv.resolve_path(redis.ca_file)) if redis.ca_file else None,
        verify=redis.verify,
        overdue_grace_seconds=cfg.overdue_grace_seconds,
        failed_window_seconds=cfg.failed_window_seconds,
    )
