"""Delivery probes: a real message goes from SMTP (or the application) to the mailbox, and
the received copy is judged: where it landed, how long it took, its DKIM signature, the
Authentication-Results the receiving side wrote, and its SpamAssassin score.

One probe run per probe is shared by its checks (``opsdrill_pytest.mail.ProbeTarget``);
``mail.probe.delivery`` is the direct probes' delivery check (a triggered probe's is
``mail.app.delivery``), the others judge every probe's received copy. The message is
deleted when the session ends, whatever the outcome.
"""

from __future__ import annotations

from collections.abc import Sequence

import allure
import pytest

from opsdrill.mail import (
    AuthResultsHeader,
    AuthResultsReport,
    DkimSignatureVerdict,
    MessageNotFound,
    ProbeFailed,
)
from opsdrill_pytest.checks import SHOWN, Check, attach_json, attach_text
from opsdrill_pytest.dns import RUNBOOK_MAIL
from opsdrill_pytest.mail import (
    ProbeTarget,
    attach_probe,
    measured,
    required,
    spam_rules_table,
)

RUNBOOK = f"{RUNBOOK_MAIL}#probe"
# Mail that does not arrive, or lands in junk, is mail customers never read. Blocker.
DELIVERY = Check("mail.probe.delivery", "blocker", RUNBOOK, "mail", "delivery probe")
# Late but delivered: password resets and invitations expire, users retry. Normal.
LATENCY = Check("mail.probe.latency", "normal", RUNBOOK, "mail", "delivery probe")
# No aligned DKIM pass: DMARC rests on SPF alone, and p=reject receivers drop the mail.
DKIM = Check("mail.probe.dkim", "critical", RUNBOOK, "mail", "delivery probe")
# The receiving side says spf/dkim/dmarc failed: it is already treating the mail as suspect.
AUTH_RESULTS = Check("mail.probe.auth_results", "critical", RUNBOOK, "mail", "delivery probe")
# A high score predicts junk filing at receivers that score content. Normal.
SPAM = Check("mail.probe.spam", "normal", RUNBOOK, "mail", "delivery probe")

pytestmark = pytest.mark.mail


@DELIVERY
def check_probe_reaches_the_inbox(
    direct_probe_target: ProbeTarget, request: pytest.FixtureRequest
) -> None:
    target = direct_probe_target
    target.warn_insecure_tls()
    spec = target.spec
    allure.dynamic.title(
        f"probe {target.name}: message from {spec.from_address} reaches "
        f"{spec.to_address}'s {target.inbox} within {spec.timeout_seconds:g} s"
    )
    allure.dynamic.parameter("timeout_s", spec.timeout_seconds)
    try:
        result = target.result(request)
    except MessageNotFound as exc:
        attach_json("not found: what was searched where", {**exc.details, "sent": exc.sent})
        send = exc.sent.get("send", {})
        accepted = (
            f"SMTP accepted it at {send.get('accepted_utc')} (queue id {send.get('queue_id')})"
            if send
            else "it was submitted"
        )
        DELIVERY.fail(
            target.id,
            f"expected the message in {target.inbox} within {spec.timeout_seconds:g} s; "
            f"{accepted}, then {exc.message}",
        )
    except ProbeFailed as exc:  # SMTP refused the sender or recipient, IMAP said NO...
        # (a refusal of the probe's own password is CredentialsRejected: broken, not here)
        attach_json("probe failure", {"error": exc.message, **target.endpoints()})
        what = {"send": "could not be sent", "receive": "could not be looked for"}
        DELIVERY.fail(target.id, f"the probe {what.get(exc.stage, 'failed')}: {exc.message}")
    attach_probe(result)
    measured("folder", result.folder)
    if result.folder not in spec.imap.folders:
        DELIVERY.fail(
            target.id,
            f"expected the message in {target.inbox}, found it in {result.folder}, a junk "
            f"folder of {spec.imap.user}: the receiving side filed it as spam (see "
            "mail.probe.spam and the X-Spam headers in the evidence)",
        )


@LATENCY
def check_probe_latency_within_threshold(
    probe_target: ProbeTarget, request: pytest.FixtureRequest
) -> None:
    target = probe_target
    target.warn_insecure_tls()
    limit = target.spec.max_latency_seconds
    allure.dynamic.title(
        f"probe {target.name}: message is visible over IMAP at most {limit:g} s after "
        f"{target.accepted_from}"
    )
    allure.dynamic.parameter("max_latency_s", limit)
    result = target.received(LATENCY, request)
    latency = result.latency_seconds
    measured("latency_s", round(latency, 3))
    attach_probe(result)
    timing = {
        "latency_seconds": round(latency, 3),
        "max_latency_seconds": limit,
        "accepted_utc": result.accepted_utc.isoformat(),
        "visible_utc": result.visible_utc.isoformat(),
        "internaldate": result.found.internaldate.isoformat()
        if result.found.internaldate
        else None,
        "folder": result.folder,
        "detected_by": result.method,
        "searches": result.found.rounds,
    }
    attach_json("latency", timing)
    if latency > limit:
        LATENCY.fail(
            target.id,
            f"expected the message visible at most {limit:g} s after {target.accepted_from}, "
            f"found {latency:.2f} s (accepted {timing['accepted_utc']}, visible "
            f"{timing['visible_utc']} in {result.folder}, detected by {result.method})",
        )


def _signature(sig: DkimSignatureVerdict, from_domain: str | None) -> str:
    text = f"d={sig.domain} s={sig.selector}: {sig.result}"
    if sig.error:
        text += f" ({sig.error})"
    if sig.passed and sig.aligned is False:
        text += f", but d={sig.domain} does not align with the From domain {from_domain}"
    elif sig.passed and sig.aligned is None:
        text += ", but there is no single From domain to align with"
    return text


@DKIM
def check_probe_dkim_signature_aligned(
    probe_target: ProbeTarget, request: pytest.FixtureRequest
) -> None:
    target = probe_target
    target.warn_insecure_tls()
    sender = target.sender or "the message's From"
    allure.dynamic.title(
        f"probe {target.name}: received message carries a valid DKIM signature whose d= "
        f"aligns with {sender}"
    )
    allure.dynamic.parameter("require_dkim", target.spec.require_dkim)
    result = target.received(DKIM, request)
    attach_probe(result)
    if "dkim" in result.errors:  # DNS could not answer for the key: broken, not failed
        raise result.errors["dkim"]
    report = required(result.dkim, f"{target.id}: the DKIM report")  # a resolver is configured
    attach_json("DKIM verdicts", report.evidence())
    found = "; ".join(_signature(s, report.from_domain) for s in report.signatures)
    found = found or "no DKIM-Signature header"
    measured("dkim", found)
    if report.aligned_pass:
        return
    if not target.spec.require_dkim:
        pytest.skip(
            f"{target.id}: require_dkim = false in the inventory; found {found} "
            f"(From domain {report.from_domain})"
        )
    hint = " (is the signer configured for this From domain?)" if not report.signatures else ""
    DKIM.fail(
        target.id,
        f"expected a valid DKIM signature with d= aligned ({report.alignment}) to the From "
        f"domain {report.from_domain}, found {found}{hint}",
    )


def _claims(headers: Sequence[AuthResultsHeader]) -> str:
    """``evil.example claiming dkim=pass, spf=pass`` for each header."""
    return "; ".join(
        f"{h.authserv_id or '(no authserv-id)'} claiming "
        + (", ".join(f"{r.method}={r.result}" for r in h.results) or "nothing")
        for h in headers[:SHOWN]
    )


def _seen(report: AuthResultsReport) -> str:
    """The authserv-ids of the headers that were ignored, for a skip reason."""
    ids = sorted({h.authserv_id or "(no authserv-id)" for h in report.ignored})
    if not ids:
        other = " other" if report.trusted else ""
        return f"the message carried no{other} Authentication-Results header"
    return (
        f"the message carried {len(report.ignored)} header(s) from {', '.join(ids)}, all "
        "ignored as untrusted"
    )


@AUTH_RESULTS
def check_probe_authentication_results_pass(
    probe_target: ProbeTarget, request: pytest.FixtureRequest
) -> None:
    target = probe_target
    target.warn_insecure_tls()
    spec = target.spec
    trusted = spec.trusted_authserv_ids
    sources = [*trusted]
    if spec.trust_topmost_without_id:
        sources.append("the topmost header without an authserv-id")
    allure.dynamic.title(
        f"probe {target.name}: Authentication-Results from {', '.join(sources) or 'no one'} "
        "show spf, dkim and dmarc passing where present"
    )
    allure.dynamic.parameter("require_auth_results", spec.require_auth_results)
    result = target.received(AUTH_RESULTS, request)
    attach_probe(result)
    report = required(result.auth_results, f"{target.id}: the Authentication-Results report")
    attach_json("Authentication-Results: trusted and ignored", report.evidence())
    measured("trusted_headers", len(report.trusted))
    measured("ignored_headers", len(report.ignored))
    ignored = _claims(report.ignored)
    ignored_note = (
        f"; ignored {len(report.ignored)} header(s) from untrusted authserv-ids: {ignored}"
        if report.ignored
        else ""
    )
    if not sources:
        pytest.skip(
            f"{target.id}: no trusted_authserv_ids in the inventory (nor "
            "trust_topmost_without_id), so no Authentication-Results header can be "
            f"believed{ignored_note}"
        )
    bad = report.not_passing()
    if bad:
        found = ", ".join(
            f"{r.method}={r.result}" + (f" ({r.reason})" if r.reason else "") for r in bad
        )
        AUTH_RESULTS.fail(
            target.id,
            f"expected spf, dkim and dmarc to pass where the trusted receiving side "
            f"({', '.join(sources)}) reports them, found {found}{ignored_note}",
        )
    if report.reported():
        return  # at least one of spf, dkim, dmarc reported by a trusted header, all pass
    # Nothing was judged: say so (a skip), or fail where the inventory requires a header.
    looked_for = ", ".join(sources)
    if report.trusted:
        methods = ", ".join(sorted(report.by_method())) or "no method"
        nothing = (
            f"the trusted header(s) from {looked_for} report none of spf, dkim, dmarc "
            f"(only {methods})"
        )
    else:
        nothing = f"no Authentication-Results header from {looked_for}"
    key = f"probes.{target.name}.trusted_authserv_ids"
    if spec.require_auth_results:
        AUTH_RESULTS.fail(
            target.id,
            f"expected an Authentication-Results header from {looked_for} reporting spf, "
            f"dkim or dmarc (require_auth_results = true), found {nothing}; {_seen(report)} "
            f"(is the receiving side writing one, and is {key} spelt as it writes its "
            "authserv-id?)",
        )
    hint = (
        ""
        if report.trusted
        else " A single-hop server (one that accepts the message and delivers it itself) "
        f"writes none; otherwise check the spelling of {key} against the authserv-id the "
        "receiving side writes."
    )
    pytest.skip(
        f"{target.id}: nothing to judge: {nothing}; {_seen(report)}.{hint} Set "
        f"probes.{target.name}.require_auth_results = true to make this a failure"
    )


@SPAM
def check_probe_spam_score_below_threshold(
    probe_target: ProbeTarget, request: pytest.FixtureRequest
) -> None:
    target = probe_target
    target.warn_insecure_tls()
    spamd = target.spec.spamd
    limit = f"{spamd.max_score:g}" if spamd else "the threshold"
    allure.dynamic.title(f"probe {target.name}: SpamAssassin scores the message below {limit}")
    if spamd is None:
        pytest.skip(
            f"{target.id}: no spamd in the inventory (probes.{target.name}.spamd), so the "
            "received message is not scored"
        )
    allure.dynamic.parameter("max_score", spamd.max_score)
    result = target.received(SPAM, request)
    attach_probe(result)
    if "spam" in result.errors:  # spamd unreachable: broken
        raise result.errors["spam"]
    verdict = required(result.spam, f"{target.id}: the SpamAssassin verdict")
    measured("score", verdict.score)
    attach_text("SpamAssassin rules that fired", spam_rules_table(result))
    attach_json("SpamAssassin verdict", verdict.evidence())
    attach_text("SpamAssassin report", verdict.report)
    if not verdict.score < spamd.max_score:
        rules = ", ".join(
            f"{r.name} {r.score:+.1f}"
            for r in sorted(verdict.rules, key=lambda r: -r.score)[:SHOWN]
        )
        SPAM.fail(
            target.id,
            f"expected a SpamAssassin score below {spamd.max_score:g} (spamd "
            f"{spamd.host}:{spamd.port}), found {verdict.score:g}; rules that fired: "
            f"{rules or 'none'}",
        )
