"""Facades for the mail checks: one per probe, per application environment, per queue.

``mail_targets(inv)`` builds them once per process and inventory, like ``dns_targets``:
nothing is contacted at construction, so collection never touches a mail server. What a
probe, an environment or a queue means in library calls (endpoints, secrets, the run,
the errors naming the key to fix) is ``opsdrill.mail.suite``'s; what is here is pytest's:
one run per session, Allure evidence, warnings.

One probe run per probe per session. ``ProbeTarget.result(request)`` runs the probe the
first time one of its checks asks (a direct probe: SMTP submission, then IMAP; a triggered
one: the application's HTTP trigger, then IMAP), and every later check of that probe gets
the same ``ProbeResult``, or the same error: the delivery, latency, DKIM,
Authentication-Results and spam checks judge one message. The plugin keeps all checks of
a probe in one xdist group, hence in one process. Once a message was found, its deletion
is registered as a finalizer of the pytest session node: it runs when the session's last
test is torn down, whatever the outcomes (a crash before that leaves the message to the
next direct run's sweep of stale probes).

Failures split as everywhere else: the library's ``ProbeFailed`` (a refused recipient,
message not found, the application answering 500) fails the delivery check with its
message and the checks that needed the received copy say so, pointing at the delivery
check. ``TargetUnreachable`` propagates, so every check of the probe is broken with the
same message, as a DNS outage breaks every DNS check; so does a rejection of opsdrill's
*own* credentials (the probe's SMTP password, the probe mailbox's IMAP password, the
trigger's bearer token, the queue's Redis password): the library's ``AuthRejected`` is
re-raised as a ``CredentialsRejected`` naming the inventory key and the environment
variable to fix (``Inventory.secret_setting``), never as a failure of the target.

Nothing here uses ``assert``: an ``AssertionError`` is what a *failed* check raises, so a
value the inventory model guarantees is narrowed with ``required``, which raises a
``RuntimeError`` (broken) should it ever be missing.

A server whose TLS certificate does not verify (``TlsVerifyFailed``) is broken like
any unreachable one, and the message names the ``ca_file`` key to set
(``probes.NAME.smtp.ca_file``, ``queues.NAME.redis.ca_file``...). The opposite, a
connection with ``verify = false``, is legal but never quiet: every check of that probe
or queue attaches *TLS verification disabled* to its Allure result, shows it as a
parameter, and raises an ``InsecureTlsWarning`` that pytest lists in the terminal's
warnings summary under each check (``warn_insecure_tls``).

The helpers at the bottom attach the evidence (the raw .eml, headers, the probe's
evidence JSON), always through ``redact``.
"""

from __future__ import annotations

import json
import re
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, NoReturn

import allure
import pytest

from opsdrill.config.inventory import Inventory
from opsdrill.config.probes import (
    AppEnvironment,
    ExpectedMessage,
    HttpTrigger,
    Probe,
    QueueBacklog,
    insecure_tls,
)
from opsdrill.errors import OpsdrillError
from opsdrill.mail import Backlog, ProbeFailed, ProbeResult, Thresholds, suite
from opsdrill.mail.suite import required
from opsdrill.redact import redact, register
from opsdrill_pytest.checks import Check, CheckFailed, attach_json, attach_text, table
from opsdrill_pytest.dns import SharedResolver

EML_MIME = "message/rfc822"


class InsecureTlsWarning(UserWarning):
    """A probe or queue connects with ``verify = false``: TLS without certificate checks,
    so anyone on the path can read the password the connection carries."""


def warn_insecure_tls(target: str, keys: list[tuple[str, str, bool]]) -> None:
    """For every check of ``target`` that connects with ``verify = false``: an Allure
    attachment and parameter, and a warning in the terminal's warnings summary."""
    if not keys:
        return
    listed = "; ".join(f"{key} = false ({host})" for key, host, _ in keys)
    text = (
        f"{target}: TLS certificate verification is OFF: {listed}. The connection is "
        "encrypted but the server is not authenticated: anyone on the path can pose as "
        "it and read the password. Passing checks prove nothing about who answered. "
        "(fix: set the matching ca_file to the CA that issued the server's certificate "
        "and remove verify = false)"
    )
    attach_text("TLS verification disabled", text)
    allure.dynamic.parameter("tls_verify", "OFF: " + ", ".join(k for k, _, _ in keys))
    warnings.warn(InsecureTlsWarning(text), stacklevel=2)


class ProbeTarget:
    """A ``[probes.NAME]`` entry: how to run it, and its one run's result."""

    def __init__(self, inv: Inventory, name: str, shared: SharedResolver) -> None:
        self.inv = inv
        self.name = name
        self.shared = shared
        self._outcome: ProbeResult | OpsdrillError | None = None

    @property
    def id(self) -> str:
        return f"probe:{self.name}"

    def __repr__(self) -> str:  # Allure records parameters by repr: keep it to the id
        return self.id

    @property
    def spec(self) -> Probe:
        return self.inv.probe(self.name)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def delivery_check(self) -> str:
        """The check that reports why there is no message to judge."""
        return "mail.probe.delivery" if self.kind == "direct" else "mail.app.delivery"

    @property
    def sender(self) -> str | None:
        spec = self.spec
        if spec.expect is not None:
            return spec.expect.from_address
        return spec.from_address

    @property
    def recipient(self) -> str:
        spec = self.spec
        address = spec.expect.to if spec.expect is not None else spec.to_address
        return required(address, f"probes.{self.name}.to_address")

    @property
    def inbox(self) -> str:
        """The folders that count as delivered, for titles and messages."""
        return " or ".join(self.spec.imap.folders)

    @property
    def accepted_from(self) -> str:
        """Where the latency starts, in words."""
        if self.kind == "direct":
            return "SMTP accepted it"
        return f"the {self.trigger_cfg.method} trigger was sent"

    @property
    def trigger_cfg(self) -> HttpTrigger:
        """``probes.NAME.trigger`` (a triggered probe's; see ``required``)."""
        return required(self.spec.trigger, f"probes.{self.name}.trigger")

    @property
    def expect(self) -> ExpectedMessage:
        """``probes.NAME.expect`` (a triggered probe's; see ``required``)."""
        return required(self.spec.expect, f"probes.{self.name}.expect")

    def warn_insecure_tls(self) -> None:
        """Every check of this probe calls it first (see the module docstring)."""
        warn_insecure_tls(self.id, insecure_tls({self.name: self.spec}, {}))

    def endpoints(self) -> dict[str, Any]:
        """Where the probe sends and looks, from the inventory (no secret is resolved)."""
        return suite.probe_endpoints(self.spec, self.name)

    def result(self, request: pytest.FixtureRequest) -> ProbeResult:
        """The probe's result, run on first use in this process; raises its error.

        The error is raised from here, without the library's frames: pytest prints every
        frame's arguments, and those of ``trigger_app`` hold the bearer token (the
        message says everything: where, what was said, what to fix). That also keeps
        each check's traceback its own instead of growing with every re-raise."""
        if self._outcome is None:
            try:
                self._outcome = suite.run_probe(
                    self.inv, self.name, self.shared.resolver, target=self.id
                )
            except OpsdrillError as exc:
                self._outcome = exc
            else:
                request.session.addfinalizer(self.cleanup)
        if isinstance(self._outcome, OpsdrillError):
            raise self._outcome.with_traceback(None)
        return self._outcome

    def cleanup(self) -> None:
        """Delete the received message (the session finalizer registered by ``result``)."""
        outcome = self._outcome
        if not isinstance(outcome, ProbeResult):
            return
        try:
            outcome.cleanup()
        except OpsdrillError as exc:
            sweep = self.spec.sweep_after_minutes
            later = f"the sweep of a later run deletes it after {sweep:g} min" if sweep else ""
            warnings.warn(
                f"{self.id}: could not delete the probe message from {outcome.folder}: "
                f"{exc.message}{'; ' + later if later and self.kind == 'direct' else ''}",
                stacklevel=1,
            )

    def received(self, check: Check, request: pytest.FixtureRequest) -> ProbeResult:
        """For the checks that judge the received copy: the result, or a failure saying
        there is none (and why: the delivery check's message). Only ``ProbeFailed`` (a
        verdict on the target) becomes a failure: ``TargetUnreachable`` and
        ``CredentialsRejected`` propagate, so the check is broken like the delivery one."""
        try:
            return self.result(request)
        except ProbeFailed as exc:
            attach_json("probe failure", {"error": exc.message, **self.endpoints()})
            check.fail(
                self.id,
                f"no received message to verify: {exc.message} (see {self.delivery_check})",
            )


class AppEnvTarget:
    """An ``[app_environment.NAME]`` entry: where the application's environment is read."""

    def __init__(self, inv: Inventory, name: str) -> None:
        self.inv = inv
        self.name = name

    @property
    def id(self) -> str:
        return f"appenv:{self.name}"

    def __repr__(self) -> str:
        return self.id

    @property
    def cfg(self) -> AppEnvironment:
        return self.inv.app_environment(self.name)

    @property
    def source(self) -> str:
        return suite.app_env_source(self.cfg, self.name, self.inv)

    def read(self) -> dict[str, str]:
        """The variables (``opsdrill.mail.suite.read_app_environment``)."""
        return suite.read_app_environment(self.inv, self.name, target=self.id)


class QueueTarget:
    """A ``[queues.NAME]`` entry: a BullMQ queue in Redis."""

    def __init__(self, inv: Inventory, name: str) -> None:
        self.inv = inv
        self.name = name

    @property
    def id(self) -> str:
        return f"queue:{self.name}"

    def __repr__(self) -> str:
        return self.id

    @property
    def cfg(self) -> QueueBacklog:
        return self.inv.queue(self.name)

    @property
    def where(self) -> str:
        return suite.queue_where(self.cfg)

    def thresholds(self) -> Thresholds:
        return suite.queue_thresholds(self.cfg)

    def warn_insecure_tls(self) -> None:
        warn_insecure_tls(self.id, insecure_tls({}, {self.name: self.cfg}))

    def backlog(self) -> Backlog:
        """The queue's backlog (``opsdrill.mail.suite.queue_backlog``: a refused password
        or an untrusted certificate is broken, naming the key to fix)."""
        return suite.queue_backlog(self.inv, self.name, target=self.id)


@dataclass(frozen=True)
class MailTargets:
    probes: list[ProbeTarget]
    app_envs: list[AppEnvTarget]
    queues: list[QueueTarget]


_BUILT: dict[int, tuple[Inventory, MailTargets]] = {}


def mail_targets(inv: Inventory) -> MailTargets:
    """The mail facades of ``inv``, built once per process (see the module docstring)."""
    hit = _BUILT.get(id(inv))
    if hit is not None and hit[0] is inv:
        return hit[1]
    shared = SharedResolver(inv)
    built = MailTargets(
        probes=[ProbeTarget(inv, name, shared) for name in inv.model.probes],
        app_envs=[AppEnvTarget(inv, name) for name in inv.model.app_environment],
        queues=[QueueTarget(inv, name) for name in inv.model.queues],
    )
    _BUILT[id(inv)] = (inv, built)
    return built


# -- reporting helpers for the checks --------------------------------------------------------


def measured(name: str, value: Any) -> None:
    """An Allure parameter that is a measurement (a latency, a score): shown, but kept out
    of the history id, so the check keeps one history from run to run."""
    allure.dynamic.parameter(name, value, excluded=True)


def attach_message(result: ProbeResult) -> None:
    """The received message as an .eml and its headers of interest, redacted like every
    attachment (a registered secret inside a message is masked, never shown)."""
    raw = result.raw.decode("utf-8", errors="replace")
    allure.attach(redact(raw), name=result.eml_name, attachment_type=EML_MIME, extension="eml")
    lines = [f"{name}: {value}" for name, values in result.headers.items() for value in values]
    attach_text("headers of interest", "\n".join(lines) or "(none)")


def attach_probe(result: ProbeResult) -> None:
    """Everything a reader of any probe check needs: the message and the run's evidence."""
    attach_message(result)
    attach_json("probe evidence", result.evidence())


def spam_rules_table(result: ProbeResult) -> str:
    if result.spam is None:
        return "(not scored)"
    rows = [
        {"score": f"{r.score:+.1f}", "rule": r.name, "description": r.description}
        for r in sorted(result.spam.rules, key=lambda r: -abs(r.score))
    ]
    return table(rows)


# -- showing a value that is public although the process may have registered it ----------

_ADDRESS = re.compile(r"^[^@\s,;<>\"'()\[\]\\]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def public_value(value: str) -> str | None:
    """``value`` when it is one or more email addresses (comma-separated), which is what
    EMAIL_REDIRECT_TO holds and what the check must show; None for anything else, which
    is then registered as a secret and never shown."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if parts and all(_ADDRESS.match(p) for p in parts):
        return ", ".join(parts)
    register(value.strip())
    return None


def _with_public(text: str, values: dict[str, str]) -> str:
    """``redact(text)``, then the public placeholders replaced by their values: a value the
    secrets bundle registered earlier in this process (it registers the whole .env) is
    shown, and anything else secret in ``text`` is still masked."""
    out = redact(text)
    for placeholder, value in values.items():
        out = out.replace(placeholder, value)
    return out


def placeholder() -> str:
    return f"@@public-{uuid.uuid4().hex}@@"


def fail_showing(check: Check, target: str, message: str, values: dict[str, str]) -> NoReturn:
    """``check.fail`` for a message holding public values (``values``: placeholder in
    ``message`` -> the value to show there)."""
    text = f"{target}: {message} (check {check.id}; runbook: {check.runbook})"
    raise CheckFailed(_with_public(text, values))


def attach_json_showing(name: str, data: Any, values: dict[str, str]) -> None:
    allure.attach(
        _with_public(json.dumps(data, indent=2, default=str), values),
        name=name,
        attachment_type=allure.attachment_type.JSON,
    )
