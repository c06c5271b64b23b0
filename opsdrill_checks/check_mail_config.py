"""The runbook's "mail didn't arrive" diagnosis steps that are configuration, not delivery:
a dev/test redirect left set in production, and the email queue backing up.

``mail.config.redirect`` shows the value it found: EMAIL_REDIRECT_TO holds an address,
which is what the operator needs to see, not a secret. The application's .env is read
with the forbidden keys left unregistered, and because the secrets-bundle checks may have
registered the whole .env earlier in this process, the message is redacted first and the
address put in afterwards (only a value that is an address list is shown at all).
"""

from __future__ import annotations

import allure
import pytest

from opsdrill.mail import forbidden_keys_set, over_thresholds
from opsdrill_pytest.checks import Check, attach_json
from opsdrill_pytest.dns import RUNBOOK_MAIL
from opsdrill_pytest.mail import (
    AppEnvTarget,
    QueueTarget,
    attach_json_showing,
    fail_showing,
    measured,
    placeholder,
    public_value,
)

# Every email the application sends goes to one address instead of its recipient. Blocker.
REDIRECT = Check(
    "mail.config.redirect", "blocker", f"{RUNBOOK_MAIL}#redirect", "mail", "configuration"
)
# Mail waits in the queue: the worker is down or slow, nothing is being sent. Critical.
BACKLOG = Check("mail.queue.backlog", "critical", f"{RUNBOOK_MAIL}#queue", "mail", "queue")

pytestmark = pytest.mark.mail


@REDIRECT
def check_redirect_unset(app_env_target: AppEnvTarget) -> None:
    target = app_env_target
    keys = target.cfg.forbidden_keys
    allure.dynamic.title(
        f"{target.name}: {', '.join(keys)} unset in the application's environment ({target.source})"
    )
    env = target.read()
    found = forbidden_keys_set(env, keys)
    shown: dict[str, str] = {}
    described: dict[str, str] = {}
    for key, value in found.items():
        public = public_value(value)
        if public is None:
            described[key] = f"{key} (set, {len(value)} characters; not an address: not shown)"
        else:
            mark = placeholder()
            shown[mark] = public
            described[key] = f"{key}={mark}"
    attach_json_showing(
        "application environment",
        {
            "source": target.source,
            "forbidden_keys": keys,
            "set": list(described.values()),
            "keys_present": sorted(env),  # names only
        },
        shown,
    )
    if found:
        fail_showing(
            REDIRECT,
            target.id,
            f"expected {', '.join(keys)} unset in production, found "
            f"{'; '.join(described.values())} in {target.source}: the application sends "
            "every email there instead of to its recipient; remove it from the production "
            "environment and restart the application",
            shown,
        )


@BACKLOG
def check_queue_backlog_below_thresholds(queue_target: QueueTarget) -> None:
    target = queue_target
    target.warn_insecure_tls()
    cfg = target.cfg
    limits = target.thresholds()
    allure.dynamic.title(
        f"queue {target.name}: {cfg.prefix}:{cfg.queue} has every job state within its "
        f"limit (no delayed job overdue by more than {cfg.overdue_grace_seconds:g} s, at "
        f"most {cfg.max_waiting} waiting), the oldest waiting job younger than "
        f"{cfg.max_oldest_age_seconds:g} s"
    )
    backlog = target.backlog()
    for state, count in backlog.counts().items():
        measured(state, count)
    age = backlog.oldest_age_seconds
    measured("oldest_age_s", None if age is None else round(age, 1))
    attach_json(
        "backlog",
        {"where": target.where, **backlog.evidence(), "thresholds": limits.evidence()},
    )
    problems = over_thresholds(backlog, limits)
    if problems:
        paused = " (the queue is paused)" if backlog.queue_paused else ""
        BACKLOG.fail(target.id, f"{target.where}: " + "; ".join(problems) + paused)
