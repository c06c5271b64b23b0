"""One probe run, end to end, returning everything a check needs as evidence.

Direct probe: sweep stale probes, submit a message with a fresh token over SMTP, wait
for it over IMAP, then analyse the received copy (DKIM, Authentication-Results, spam).
Triggered probe: sweep orphaned invitations of earlier runs, draw a per-run token and
put it into the trigger (its ``{token}`` placeholders), snapshot the folders' UIDNEXT,
make the application send (HTTP), wait for a message that shows the token and matches
recipient/subject/time, extract (and optionally fetch) the link, analyse.

Error contract, so a check can always clean up and attach evidence:
- before the message is found, failures raise: ``TargetUnreachable`` and ``AuthRejected``
  (our own credentials refused: a ``CredentialsRejected``) mean nothing could be judged,
  ``ProbeFailed`` is a verdict (``MessageNotFound`` carries what was searched and the
  send evidence);
- once it is found, a ``ProbeResult`` is always returned: an analysis that could not run
  (DNS down for the DKIM key, spamd unreachable, the link's server down) is recorded in
  ``errors`` with its original exception, and ``raise_for_errors()`` re-raises it, so
  the check attaches evidence and registers ``cleanup()`` first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from opsdrill.dns.resolver import Resolver
from opsdrill.errors import ConfigError, OpsdrillError
from opsdrill.mail.authresults import AuthResultsReport, authentication_results
from opsdrill.mail.dkim_verify import DkimReport, verify_dkim
from opsdrill.mail.errors import MessageNotFound
from opsdrill.mail.imap import ImapMailbox, delete_messages, snapshot_uidnext, sweep_stale_probes
from opsdrill.mail.message import PLACEHOLDER, extract_links, header_values, new_run_token
from opsdrill.mail.smtp import SendReceipt, SmtpEndpoint, send_probe
from opsdrill.mail.spam import SpamVerdict, score_with_spamd
from opsdrill.mail.trigger import LinkFetch, TriggerResponse, fetch_link, trigger_app
from opsdrill.mail.wait import (
    RECHECK_SECONDS,
    AppMessageMatch,
    FoundMessage,
    TokenMatch,
    sweep_orphaned_invitations,
    wait_for_message,
)


@dataclass(frozen=True)
class ReceiveOptions:
    folders: tuple[str, ...] = ("INBOX", "Junk")
    timeout: float = 30.0
    interval: float = 1.0
    use_idle: bool = True
    # INBOX re-checked this often between rounds (wait.py): how late a message is seen.
    recheck: float = RECHECK_SECONDS
    # Probe messages older than this are deleted before sending (None: no sweep).
    sweep_older_than_minutes: float | None = 60.0


@dataclass(frozen=True)
class SpamdTarget:
    host: str = "127.0.0.1"
    port: int = 783
    timeout: float = 30.0


@dataclass(frozen=True)
class Analysis:
    """What to verify on the received copy; each part is skipped when not configured."""

    resolver: Resolver | None = None  # DKIM keys; None: DKIM not verified
    trusted_authserv_ids: tuple[str, ...] = ()  # exact, or *.example.com (topmost only)
    trust_topmost_without_id: bool = False  # Microsoft 365 writes no authserv-id
    dkim_strict: bool = False
    spamd: SpamdTarget | None = None


@dataclass(frozen=True)
class AppTrigger:
    """The HTTP request that makes the application send mail. ``{token}`` in ``url`` or
    in a string of ``json_body`` is replaced by the run's token (required: see
    ``carries_token``)."""

    url: str
    method: str = "POST"
    json_body: Mapping[str, Any] | None = None
    bearer_token: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    ca_file: str | None = None
    verify: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)  # not secrets
    secret_headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # never shown

    @property
    def carries_token(self) -> bool:
        return PLACEHOLDER in self.url or _mentions(self.json_body, PLACEHOLDER)

    def for_run(self, token: str) -> AppTrigger:
        """This request with the run's token in place of every ``{token}``."""
        body = _substitute(self.json_body, token) if self.json_body is not None else None
        return replace(self, url=self.url.replace(PLACEHOLDER, token), json_body=body)


def _mentions(value: Any, text: str) -> bool:
    if isinstance(value, str):
        return text in value
    if isinstance(value, Mapping):
        return any(_mentions(v, text) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_mentions(v, text) for v in value)
    return False


def _substitute(value: Any, token: str) -> Any:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, token)
    if isinstance(value, Mapping):
        return {k: _substitute(v, token) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_substitute(v, token) for v in value]
    return value


@dataclass
class ProbeResult:
    """A found message and what was learnt about it. ``accepted_*``: SMTP acceptance
    (direct) or the moment the trigger request was sent (triggered: the application may
    send before it answers)."""

    kind: Literal["direct", "triggered"]
    mailbox: ImapMailbox
    found: FoundMessage
    accepted_utc: datetime
    accepted_monotonic: float
    token: str | None = None
    send: SendReceipt | None = None
    smtp: SmtpEndpoint | None = None
    trigger: TriggerResponse | None = None
    headers: dict[str, list[str]] = field(default_factory=dict)
    dkim: DkimReport | None = None
    auth_results: AuthResultsReport | None = None
    spam: SpamVerdict | None = None
    links: list[str] = field(default_factory=list)
    link_fetch: LinkFetch | None = None
    swept: int | None = None
    errors: dict[str, OpsdrillError] = field(default_factory=dict)
    cleaned_up: bool = False

    @property
    def raw(self) -> bytes:
        return self.found.raw

    @property
    def folder(self) -> str:
        return self.found.folder

    @property
    def in_inbox(self) -> bool:
        return self.found.folder.upper() == "INBOX"

    @property
    def method(self) -> str:
        return self.found.method

    @property
    def visible_utc(self) -> datetime:
        return self.found.visible_utc

    @property
    def latency_seconds(self) -> float:
        return self.found.visible_monotonic - self.accepted_monotonic

    @property
    def eml_name(self) -> str:
        return f"probe-{self.token or self.found.uid}.eml"

    def cleanup(self) -> bool:
        """Delete the received message (idempotent). True if it was still there."""
        if self.cleaned_up:
            return False
        deleted = delete_messages(self.mailbox, self.found.folder, [self.found.uid])
        self.cleaned_up = True
        return deleted > 0

    def raise_for_errors(self) -> None:
        """Re-raise the first analysis error (its type decides broken vs failed)."""
        for error in self.errors.values():
            raise error

    def evidence(self) -> dict[str, Any]:
        """JSON-able; no password or bearer token (the probe token is not a secret). The
        raw message is not included: attach ``raw`` as ``eml_name``."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "token": self.token,
            "accepted_utc": self.accepted_utc.isoformat(),
            "visible_utc": self.visible_utc.isoformat(),
            "latency_seconds": round(self.latency_seconds, 3),
            "folder": self.folder,
            "in_inbox": self.in_inbox,
            "received": self.found.evidence(),
            "sha256": hashlib.sha256(self.raw).hexdigest(),
            "mailbox": self.mailbox.evidence(),
            "headers": self.headers,
            "swept_stale_probes": self.swept,
            "errors": {step: e.message for step, e in self.errors.items()},
            "cleaned_up": self.cleaned_up,
        }
        if self.send is not None:
            out["send"] = self.send.evidence()
        if self.smtp is not None:
            out["smtp"] = self.smtp.evidence()
        if self.trigger is not None:
            out["trigger"] = self.trigger.evidence()
        if self.dkim is not None:
            out["dkim"] = self.dkim.evidence()
        if self.auth_results is not None:
            out["authentication_results"] = self.auth_results.evidence()
        if self.spam is not None:
            out["spam"] = self.spam.evidence()
        if self.kind == "triggered":
            out["links"] = self.links
            out["link_fetch"] = self.link_fetch.evidence() if self.link_fetch else None
        return out


def _analyse(result: ProbeResult, analysis: Analysis) -> None:
    raw = result.raw
    result.headers = header_values(raw)
    result.auth_results = authentication_results(
        raw, analysis.trusted_authserv_ids, topmost_without_id=analysis.trust_topmost_without_id
    )
    if analysis.resolver is not None:
        try:
            result.dkim = verify_dkim(raw, analysis.resolver, strict=analysis.dkim_strict)
        except OpsdrillError as exc:
            result.errors["dkim"] = exc
    if analysis.spamd is not None:
        target = analysis.spamd
        try:
            result.spam = score_with_spamd(raw, target.host, target.port, target.timeout)
        except OpsdrillError as exc:
            result.errors["spam"] = exc


def run_direct_probe(
    smtp: SmtpEndpoint,
    mailbox: ImapMailbox,
    *,
    sender: str,
    recipient: str,
    receive: ReceiveOptions | None = None,
    analysis: Analysis | None = None,
) -> ProbeResult:
    receive = receive or ReceiveOptions()
    swept = None
    if receive.sweep_older_than_minutes is not None:
        swept = sweep_stale_probes(mailbox, receive.folders, receive.sweep_older_than_minutes)
    receipt = send_probe(smtp, sender, recipient)
    try:
        found = wait_for_message(
            mailbox,
            TokenMatch(receipt.token),
            folders=receive.folders,
            timeout=receive.timeout,
            interval=receive.interval,
            use_idle=receive.use_idle,
            recheck=receive.recheck,
        )
    except MessageNotFound as exc:
        exc.sent = {"smtp": smtp.evidence(), "send": receipt.evidence()}
        raise
    result = ProbeResult(
        kind="direct",
        mailbox=mailbox,
        found=found,
        accepted_utc=receipt.accepted_utc,
        accepted_monotonic=receipt.accepted_monotonic,
        token=receipt.token,
        send=receipt,
        smtp=smtp,
        swept=swept,
    )
    _analyse(result, analysis or Analysis())
    return result


def run_triggered_probe(
    trigger: AppTrigger,
    mailbox: ImapMailbox,
    *,
    recipient: str,
    subject_pattern: str,
    link_pattern: str | None = None,
    fetch_first_link: bool = False,
    link_timeout: float = 10.0,
    receive: ReceiveOptions | None = None,
    analysis: Analysis | None = None,
    token: str | None = None,
    window: float = 120.0,
) -> ProbeResult:
    """The trigger must carry the run's token (``{token}`` in its URL or JSON body) and
    the application's message must show it: only then is the message this run's. A
    ``{token}`` in ``recipient`` (a plus-address) is replaced too. Messages of earlier
    runs (showing a token's shape, addressed to ``recipient``, matching the subject) older
    than the sweep limit are deleted first; the found message by ``cleanup()``. A message
    received more than ``window`` seconds before the trigger never counts."""
    if not trigger.carries_token:
        raise ConfigError(
            "application trigger: no {token} in its URL or JSON body: the message could not "
            "be told apart from another run's (fix: put {token} where the application "
            "carries it into the message, e.g. the invitee's name or a plus-address)"
        )
    receive = receive or ReceiveOptions()
    token = token or new_run_token()
    swept = None
    if receive.sweep_older_than_minutes is not None:
        swept = sweep_orphaned_invitations(
            mailbox,
            receive.folders,
            receive.sweep_older_than_minutes,
            recipient=recipient,
            subject_pattern=subject_pattern,
        )
    run_trigger = trigger.for_run(token)
    floor = snapshot_uidnext(mailbox, receive.folders)
    since = datetime.now(UTC)
    response = trigger_app(
        run_trigger.url,
        run_trigger.method,
        run_trigger.json_body,
        run_trigger.bearer_token,
        run_trigger.timeout,
        ca_file=run_trigger.ca_file,
        verify=run_trigger.verify,
        headers=run_trigger.headers,
        secret_headers=run_trigger.secret_headers,
    )
    address = recipient.replace(PLACEHOLDER, token)
    match = AppMessageMatch(
        address, subject_pattern, since, token, window_seconds=window, uid_floor=floor
    )
    try:
        found = wait_for_message(
            mailbox,
            match,
            folders=receive.folders,
            timeout=receive.timeout,
            interval=receive.interval,
            use_idle=receive.use_idle,
            recheck=receive.recheck,
        )
    except MessageNotFound as exc:
        exc.sent = {"trigger": response.evidence(), "token": token}
        raise
    result = ProbeResult(
        kind="triggered",
        mailbox=mailbox,
        found=found,
        accepted_utc=response.started_utc,
        accepted_monotonic=response.started_monotonic,
        token=token,
        trigger=response,
        swept=swept,
    )
    if link_pattern is not None:
        result.links = extract_links(found.raw, link_pattern)
        if fetch_first_link and result.links:
            try:
                result.link_fetch = fetch_link(
                    result.links[0], link_timeout, ca_file=trigger.ca_file, verify=trigger.verify
                )
            except OpsdrillError as exc:
                result.errors["link"] = exc
    _analyse(result, analysis or Analysis())
    return result
