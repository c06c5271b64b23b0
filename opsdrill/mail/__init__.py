"""Mail delivery probes: SMTP -> IMAP round trips and the runbook's diagnosis steps.

Plain parameters and small frozen dataclasses in, rich results out; no pytest and no
inventory models (the fixtures map the inventory onto these). Every network call is
bounded by a timeout. Failure kinds follow ``opsdrill.errors``: a server that cannot be
reached raises ``TargetUnreachable`` and a server that refused opsdrill's own
credentials (SMTP 535, IMAP LOGIN refused, Redis WRONGPASS, a 401/403 to the trigger's
bearer token) raises ``AuthRejected``, a ``CredentialsRejected``: either way nothing was
judged and a check is *broken*. A server that answered no to what is verified (a refused
recipient, a message that never arrived, a 500 from the application) raises
``ProbeFailed`` or a subclass (a check *fails*).

Modules: ``smtp`` (submit a probe), ``imap`` (sessions, delete, sweep), ``wait`` (IDLE
or polling until a matcher finds the message), ``message`` (tokens, headers, links),
``dkim_verify``, ``authresults`` (RFC 8601, trusted authserv-ids only), ``spam``
(spamd), ``trigger`` (the application's HTTP trigger, link fetch), ``backlog`` (BullMQ),
``appenv`` (EMAIL_REDIRECT_TO), ``probe`` (a whole run and its ``ProbeResult``).
"""

from opsdrill.mail.appenv import forbidden_keys_set, read_app_env
from opsdrill.mail.authresults import (
    AuthResult,
    AuthResultsHeader,
    AuthResultsReport,
    authentication_results,
    parse_header,
)
from opsdrill.mail.backlog import (
    Backlog,
    Thresholds,
    backlog_from_client,
    bullmq_backlog,
    over_thresholds,
)
from opsdrill.mail.dkim_verify import DkimReport, DkimSignatureVerdict, aligned, verify_dkim
from opsdrill.mail.errors import AuthRejected, MessageNotFound, ProbeFailed, TlsVerifyFailed
from opsdrill.mail.imap import (
    ImapMailbox,
    delete_messages,
    session,
    snapshot_uidnext,
    sweep_stale,
    sweep_stale_probes,
    uid_batches,
    uid_set,
)
from opsdrill.mail.message import (
    PROBE_HEADER,
    ProbeMessage,
    build_probe_message,
    extract_links,
    from_domain,
    header_values,
    message_text,
    new_run_token,
    new_token,
    shows_token,
)
from opsdrill.mail.probe import (
    Analysis,
    AppTrigger,
    ProbeResult,
    ReceiveOptions,
    SpamdTarget,
    run_direct_probe,
    run_triggered_probe,
)
from opsdrill.mail.smtp import SendReceipt, SmtpEndpoint, send_probe, submit
from opsdrill.mail.spam import SpamRule, SpamVerdict, parse_response, score_with_spamd
from opsdrill.mail.trigger import LinkFetch, TriggerResponse, fetch_link, trigger_app
from opsdrill.mail.wait import (
    AppMessageMatch,
    FoundMessage,
    Matcher,
    TokenMatch,
    recipient_regex,
    sweep_orphaned_invitations,
    wait_for_message,
)

__all__ = [
    "PROBE_HEADER",
    "Analysis",
    "AppMessageMatch",
    "AppTrigger",
    "AuthRejected",
    "AuthResult",
    "AuthResultsHeader",
    "AuthResultsReport",
    "Backlog",
    "DkimReport",
    "DkimSignatureVerdict",
    "FoundMessage",
    "ImapMailbox",
    "LinkFetch",
    "Matcher",
    "MessageNotFound",
    "ProbeFailed",
    "ProbeMessage",
    "ProbeResult",
    "ReceiveOptions",
    "SendReceipt",
    "SmtpEndpoint",
    "SpamRule",
    "SpamVerdict",
    "SpamdTarget",
    "Thresholds",
    "TlsVerifyFailed",
    "TokenMatch",
    "TriggerResponse",
    "aligned",
    "authentication_results",
    "backlog_from_client",
    "build_probe_message",
    "bullmq_backlog",
    "delete_messages",
    "extract_links",
    "fetch_link",
    "forbidden_keys_set",
    "from_domain",
    "header_values",
    "message_text",
    "new_run_token",
    "new_token",
    "over_thresholds",
    "parse_header",
    "parse_response",
    "read_app_env",
    "recipient_regex",
    "run_direct_probe",
    "run_triggered_probe",
    "score_with_spamd",
    "send_probe",
    "session",
    "shows_token",
    "snapshot_uidnext",
    "submit",
    "sweep_orphaned_invitations",
    "sweep_stale",
    "sweep_stale_probes",
    "trigger_app",
    "uid_batches",
    "uid_set",
    "verify_dkim",
    "wait_for_message",
]
