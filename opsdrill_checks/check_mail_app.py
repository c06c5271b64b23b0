"""Application-triggered probes: an HTTP request makes the application itself send (the
portal invite), the message is recognised by recipient, subject and time, and its
activation link works.

The run is shared with the probe checks of ``check_mail_probe.py`` (latency, DKIM,
Authentication-Results, spam judge this message too), and deleted when the session ends.
"""

from __future__ import annotations

import allure
import pytest

from opsdrill.mail import MessageNotFound, ProbeFailed, extract_links
from opsdrill.mail.suite import from_findings
from opsdrill.redact import redact
from opsdrill_pytest.checks import SHOWN, Check, attach_json
from opsdrill_pytest.dns import RUNBOOK_MAIL
from opsdrill_pytest.mail import ProbeTarget, attach_probe, measured, required

RUNBOOK = f"{RUNBOOK_MAIL}#app-probe"
# The application's own mail does not arrive: invitations, resets, notifications. Blocker.
DELIVERY = Check("mail.app.delivery", "blocker", RUNBOOK, "mail", "application probe")
# The invitation arrives but cannot be acted on. Critical.
LINK = Check("mail.app.link", "critical", RUNBOOK, "mail", "application probe")

pytestmark = pytest.mark.mail


def _request_line(target: ProbeTarget) -> str:
    trigger = target.trigger_cfg
    return f"{trigger.method} {redact(trigger.url)}"


@DELIVERY
def check_app_message_arrives(
    app_probe_target: ProbeTarget, request: pytest.FixtureRequest
) -> None:
    target = app_probe_target
    target.warn_insecure_tls()
    spec = target.spec
    expect = target.expect
    allure.dynamic.title(
        f"probe {target.name}: {_request_line(target)} makes the application send a message "
        f"to {expect.to} with a subject matching '{expect.subject_pattern}', arriving in "
        f"{target.inbox} within {spec.timeout_seconds:g} s"
    )
    allure.dynamic.parameter("timeout_s", spec.timeout_seconds)
    try:
        result = target.result(request)
    except MessageNotFound as exc:
        attach_json("not found: what was searched where", {**exc.details, "sent": exc.sent})
        answered = exc.sent.get("trigger", {})
        DELIVERY.fail(
            target.id,
            f"expected the application's message in {target.inbox} within "
            f"{spec.timeout_seconds:g} s; the trigger answered {answered.get('status')}, "
            f"then {exc.message}",
        )
    except ProbeFailed as exc:  # the trigger answered non-2xx (not 401/403 to our token)...
        # (a refused bearer token or IMAP password is CredentialsRejected: broken, not here)
        attach_json("probe failure", {"error": exc.message, **target.endpoints()})
        expected = "a 2xx answer from the trigger" if exc.stage == "trigger" else "the message"
        DELIVERY.fail(target.id, f"expected {expected}, found {exc.message}")
    attach_probe(result)
    if result.trigger is not None:
        attach_json("trigger response", result.trigger.evidence())
        measured("trigger_status", result.trigger.status)
    measured("folder", result.folder)
    problems = [f.message for f in from_findings(result, expect.from_address)]
    if result.folder not in spec.imap.folders:
        problems.append(
            f"expected the message in {target.inbox}, found it in {result.folder}, a junk "
            f"folder of {spec.imap.user} (see mail.probe.spam)"
        )
    if problems:
        DELIVERY.fail(target.id, "; ".join(problems))


@LINK
def check_app_link_present_and_answers(
    app_probe_target: ProbeTarget, request: pytest.FixtureRequest
) -> None:
    target = app_probe_target
    target.warn_insecure_tls()
    expect = target.expect
    pattern = expect.link_pattern
    answers = " that answers 2xx" if expect.fetch_link else ""
    allure.dynamic.title(
        f"probe {target.name}: the message holds a link matching '{pattern}'{answers}"
    )
    if pattern is None:
        pytest.skip(
            f"{target.id}: no link_pattern in probes.{target.name}.expect, so there is no "
            "link to look for"
        )
    allure.dynamic.parameter("fetch_link", expect.fetch_link)
    result = target.received(LINK, request)
    attach_probe(result)
    every = extract_links(result.raw)
    attach_json(
        "links",
        {
            "pattern": pattern,
            "matching": result.links,
            "all_links": every,
            "fetch": result.link_fetch.evidence() if result.link_fetch else None,
        },
    )
    if not result.links:
        others = ", ".join(every[:SHOWN]) or "none"
        LINK.fail(
            target.id,
            f"expected a link matching '{pattern}' in the message, found no such link "
            f"(links in the message: {others})",
        )
    if not expect.fetch_link:
        return
    if "link" in result.errors:  # the link's server did not answer: broken
        raise result.errors["link"]
    fetched = required(result.link_fetch, f"{target.id}: the link fetch")
    measured("link_status", fetched.status)
    if not fetched.ok:
        LINK.fail(
            target.id,
            f"expected GET {fetched.url} to answer 2xx, found {fetched.status} (after "
            f"{fetched.redirects} redirects, final URL {fetched.final_url})",
        )
