"""The BullMQ email queue (redis-py): how many jobs sit in each state, and for how long.

BullMQ's layout (verified against the Lua scripts of bullmq 5.81, the version the tests
drive a real queue with): a queue's keys live under ``<prefix>:<queue>:``.

- ``wait`` (list): jobs ready for a worker. ``addStandardJob`` LPUSHes (RPUSH for
  ``lifo``) and workers take from the tail, so the oldest FIFO job is at index -1. BullMQ
  before 5 could keep a marker ``0:<n>`` at the tail: never counted or aged.
- ``paused`` (list): ``Queue.pause()`` (``pause-7.lua``) RENAMEs ``wait`` to ``paused``
  and sets ``paused`` in the ``meta`` hash; jobs added meanwhile go to ``paused`` too.
- ``prioritized`` (sorted set, score = priority and a counter, not a time).
- ``active`` (list): taken by a worker, not finished. A dead worker's jobs stay here until
  another worker's stalled-job check moves them back.
- ``delayed`` (sorted set, score = due time in ms * 0x1000 + a counter,
  ``getDelayedScore.lua``). **Only a worker moves a due job to ``wait``**: with no worker
  running, a due job waits forever, so a job due more than a grace period ago is
  *overdue* (``ZCOUNT`` up to that score), whatever the length of ``wait``.
- ``failed``, ``completed`` (sorted sets, score = ``finishedOn`` in ms): history, kept as
  the application's ``removeOnFail``/``removeOnComplete`` say; failures *within a window*
  are what tell that sending fails now.
- ``waiting-children`` (sorted set): parents waiting for child jobs (counted, not judged).

Each job is the hash ``<prefix>:<queue>:<id>`` whose ``timestamp`` is its creation time
in ms. For the oldest waiting job, both ends of ``wait`` and ``paused`` and a bounded
sample of each end of ``prioritized`` are aged: a check must stay cheap on a huge backlog.
(The runbook's ``bull:email:waiting`` is not a BullMQ key: the list is ``wait``.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from opsdrill.errors import TargetUnreachable
from opsdrill.mail._net import is_cert_failure
from opsdrill.mail.errors import AuthRejected, ProbeFailed, TlsVerifyFailed

STAGE = "queue"
PRIORITY_SAMPLE = 50
SCORE_SHIFT = 0x1000  # delayed: due_ms * 0x1000 + counter
STATES = ("waiting", "paused", "prioritized", "active", "delayed", "overdue", "failed")


class RedisLike(Protocol):
    """The few commands used, so unit tests can pass a tiny fake."""

    def type(self, name: str) -> Any: ...
    def llen(self, name: str) -> Any: ...
    def lindex(self, name: str, index: int) -> Any: ...
    def zcard(self, name: str) -> Any: ...
    def zcount(self, name: str, min: Any, max: Any) -> Any: ...
    def zrange(self, name: str, start: int, end: int, *, withscores: bool = False) -> Any: ...
    def hget(self, name: str, key: str) -> Any: ...
    def hexists(self, name: str, key: str) -> Any: ...
    def exists(self, *names: str) -> Any: ...


@dataclass(frozen=True)
class Thresholds:
    """The most jobs allowed in each state (``None``: not judged), and the age limits.

    ``waiting``, ``prioritized``, ``paused``: jobs no worker has taken yet; ``paused``
    defaults to 0 because a paused queue sends nothing. ``overdue``: delayed jobs due more
    than ``overdue_grace_seconds`` ago, 0 by default: a running worker promotes a due job
    within milliseconds, so any of them means no worker runs. ``failed``: jobs that
    failed (after their retries) within the last ``failed_window_seconds``. ``delayed``:
    not judged by default (scheduled sends and retries waiting for their backoff are
    normal)."""

    max_waiting: int | None = 100
    max_prioritized: int | None = 100
    max_paused: int | None = 0
    max_active: int | None = 100
    max_delayed: int | None = None
    max_overdue: int | None = 0
    max_failed: int | None = 10
    max_oldest_age_seconds: float = 600.0
    overdue_grace_seconds: float = 60.0
    failed_window_seconds: float = 3600.0

    def evidence(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


@dataclass(frozen=True)
class Backlog:
    queue: str
    prefix: str
    waiting: int  # wait list (markers excluded)
    paused_list: int  # the paused list: jobs of a paused queue
    prioritized: int
    queue_paused: bool  # meta hash says paused
    queue_known: bool  # any of the queue's keys exist: a typo in the name shows here
    oldest_job_id: str | None
    oldest_timestamp_ms: int | None
    oldest_age_seconds: float | None
    active: int = 0
    delayed: int = 0
    overdue: int = 0  # delayed, due more than the grace period ago
    oldest_overdue_job_id: str | None = None
    oldest_overdue_seconds: float | None = None  # how long ago the oldest one was due
    failed: int = 0  # the whole failed set (history)
    failed_recent: int = 0  # finished (failed) within the window
    completed: int = 0
    waiting_children: int = 0
    overdue_grace_seconds: float = 60.0
    failed_window_seconds: float = 3600.0
    keys: tuple[str, ...] = field(default=())

    @property
    def total_waiting(self) -> int:
        return self.waiting + self.paused_list + self.prioritized

    def counts(self) -> dict[str, int]:
        """The count each threshold judges, by state name."""
        return {
            "waiting": self.waiting,
            "paused": self.paused_list,
            "prioritized": self.prioritized,
            "active": self.active,
            "delayed": self.delayed,
            "overdue": self.overdue,
            "failed": self.failed_recent,
        }

    def evidence(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "queue": self.queue,
            "prefix": self.prefix,
            "total_waiting": self.total_waiting,
            "wait": self.waiting,
            "paused": self.paused_list,
            "prioritized": self.prioritized,
            "active": self.active,
            "delayed": self.delayed,
            "overdue": self.overdue,
            "overdue_grace_seconds": self.overdue_grace_seconds,
            "oldest_overdue_job_id": self.oldest_overdue_job_id,
            "oldest_overdue_seconds": rounded(self.oldest_overdue_seconds),
            "failed_total": self.failed,
            "failed_recent": self.failed_recent,
            "failed_window_seconds": self.failed_window_seconds,
            "completed": self.completed,
            "waiting_children": self.waiting_children,
            "queue_paused": self.queue_paused,
            "queue_known": self.queue_known,
            "oldest_job_id": self.oldest_job_id,
            "oldest_timestamp_ms": self.oldest_timestamp_ms,
            "oldest_age_seconds": rounded(self.oldest_age_seconds),
            "keys": list(self.keys),
        }


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _is_marker(job_id: str) -> bool:
    return job_id.startswith("0:")


def _list_info(client: RedisLike, key: str) -> tuple[int, list[str]]:
    """(job count, ids at both ends) of a list; markers sit at the tail when present."""
    if _s(client.type(key)) != "list":
        return 0, []
    count = int(client.llen(key))
    head, tail = client.lindex(key, 0), client.lindex(key, -1)
    ends = [_s(v) for v in (head, tail) if v is not None]
    if tail is not None and _is_marker(_s(tail)):
        count -= 1
        before = client.lindex(key, -2) if count > 0 else None
        if before is not None:  # the oldest job sits next to the marker
            ends.append(_s(before))
    return max(0, count), [v for v in ends if not _is_marker(v)]


def _zcard(client: RedisLike, key: str) -> int:
    return int(client.zcard(key)) if _s(client.type(key)) == "zset" else 0


def _list_len(client: RedisLike, key: str) -> int:
    return int(client.llen(key)) if _s(client.type(key)) == "list" else 0


def backlog_from_client(
    client: RedisLike,
    queue: str,
    prefix: str = "bull",
    *,
    now_ms: int | None = None,
    sample: int = PRIORITY_SAMPLE,
    overdue_grace_seconds: float = 60.0,
    failed_window_seconds: float = 3600.0,
) -> Backlog:
    base = f"{prefix}:{queue}:"
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    waiting, wait_ends = _list_info(client, base + "wait")
    paused, paused_ends = _list_info(client, base + "paused")
    prioritized, candidates = _zcard(client, base + "prioritized"), [*wait_ends, *paused_ends]
    if prioritized:
        ends = [*client.zrange(base + "prioritized", 0, sample - 1)]
        if prioritized > sample:
            ends += [*client.zrange(base + "prioritized", -sample, -1)]
        candidates += [_s(v) for v in ends]
    oldest: tuple[int, str] | None = None
    for job_id in dict.fromkeys(candidates):
        stamp = client.hget(base + job_id, "timestamp")
        if stamp is None or not _s(stamp).lstrip("-").isdigit():
            continue  # removed meanwhile, or not a BullMQ job hash
        if oldest is None or int(_s(stamp)) < oldest[0]:
            oldest = (int(_s(stamp)), job_id)
    delayed = _zcard(client, base + "delayed")
    overdue, first_overdue = 0, None
    if delayed:
        due_by = now - int(overdue_grace_seconds * 1000)
        overdue = int(client.zcount(base + "delayed", "-inf", (due_by + 1) * SCORE_SHIFT - 1))
        if overdue:
            first = client.zrange(base + "delayed", 0, 0, withscores=True)
            if first:
                job, score = first[0]
                first_overdue = (_s(job), int(float(score)) // SCORE_SHIFT)
    failed = _zcard(client, base + "failed")
    since = now - int(failed_window_seconds * 1000)
    failed_recent = int(client.zcount(base + "failed", since, "+inf")) if failed else 0
    keys = ("meta", "id", "wait", "paused", "prioritized", "active", "delayed", "completed")
    known = bool(client.exists(*(base + k for k in (*keys, "failed", "events"))))
    return Backlog(
        queue=queue,
        prefix=prefix,
        waiting=waiting,
        paused_list=paused,
        prioritized=prioritized,
        queue_paused=bool(client.hexists(base + "meta", "paused")),
        queue_known=known,
        oldest_job_id=oldest[1] if oldest else None,
        oldest_timestamp_ms=oldest[0] if oldest else None,
        oldest_age_seconds=max(0.0, (now - oldest[0]) / 1000) if oldest else None,
        active=_list_len(client, base + "active"),
        delayed=delayed,
        overdue=overdue,
        oldest_overdue_job_id=first_overdue[0] if first_overdue else None,
        oldest_overdue_seconds=max(0.0, (now - first_overdue[1]) / 1000) if first_overdue else None,
        failed=failed,
        failed_recent=failed_recent,
        completed=_zcard(client, base + "completed"),
        waiting_children=_zcard(client, base + "waiting-children"),
        overdue_grace_seconds=overdue_grace_seconds,
        failed_window_seconds=failed_window_seconds,
        keys=tuple(base + k for k in ("wait", "paused", "prioritized", "active", "delayed")),
    )


def bullmq_backlog(
    host: str,
    port: int = 6379,
    password: str | None = None,
    db: int = 0,
    queue: str = "email",
    prefix: str = "bull",
    timeout: float = 5.0,
    *,
    username: str | None = None,
    tls: bool = False,
    ca_file: str | None = None,
    verify: bool = True,
    overdue_grace_seconds: float = 60.0,
    failed_window_seconds: float = 3600.0,
) -> Backlog:
    """Read the backlog of ``<prefix>:<queue>``. Raises ``TargetUnreachable`` when Redis
    cannot be reached (``TlsVerifyFailed`` when its certificate is not trusted),
    ``AuthRejected`` (a ``CredentialsRejected``) when it refuses the credentials: both
    mean nothing could be judged."""
    # redis-py loads here, with a queue to read: a run without one never pays for it (~45 ms)
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    where = f"Redis {host}:{port}/{db}"
    client = redis.Redis(
        host=host,
        port=port,
        db=db,
        username=username,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        ssl=tls,
        ssl_ca_certs=ca_file,
        ssl_cert_reqs="required" if verify else "none",
        ssl_check_hostname=verify,
        # RESP2: Redis < 6 has no HELLO; no retries: the timeout is the bound.
        protocol=2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return backlog_from_client(
            client,
            queue,
            prefix,
            overdue_grace_seconds=overdue_grace_seconds,
            failed_window_seconds=failed_window_seconds,
        )
    except redis.exceptions.AuthenticationError as exc:
        raise AuthRejected(
            STAGE, f"{where} rejected the credentials: {exc}", credential="redis"
        ) from None
    except redis.exceptions.ResponseError as exc:
        text = str(exc)
        if text.startswith(("NOAUTH", "WRONGPASS")):
            raise AuthRejected(
                STAGE, f"{where} rejected the credentials: {text}", credential="redis"
            ) from None
        raise ProbeFailed(STAGE, f"{where}: {text}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        if tls and is_cert_failure(exc):
            raise TlsVerifyFailed(
                f"{where}: TLS certificate verification failed: {exc}", endpoint="redis"
            ) from None
        raise TargetUnreachable(f"{where}: {type(exc).__name__}: {exc}") from None
    except redis.exceptions.InvalidResponse as exc:  # something else answers on that port
        raise TargetUnreachable(f"{where}: not a Redis server: {exc}") from None
    except redis.exceptions.RedisError as exc:
        raise ProbeFailed(STAGE, f"{where}: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()


_WHY = {  # state -> (what the count is, what it means)
    "waiting": ("jobs waiting", "is the worker running?"),
    "prioritized": ("prioritised jobs waiting", "is the worker running?"),
    "paused": (
        "jobs held in the paused list",
        "the queue is paused and sends nothing (resume it with queue.resume())",
    ),
    "active": (
        "jobs active (taken by a worker, not finished)",
        "a worker that died mid-job leaves them there until another worker's stalled-job "
        "check moves them back",
    ),
    "delayed": ("delayed jobs", "scheduled sends or retries waiting for their backoff pile up"),
}


def over_thresholds(backlog: Backlog, thresholds: Thresholds) -> Sequence[str]:
    """Problems, one sentence each (empty when the queue is healthy)."""
    problems = []
    name = f"{backlog.prefix}:{backlog.queue}"
    if not backlog.queue_known:
        problems.append(f"queue {name}: no keys found (wrong queue name or prefix?)")
    counts = backlog.counts()
    limits = {
        "waiting": thresholds.max_waiting,
        "prioritized": thresholds.max_prioritized,
        "paused": thresholds.max_paused,
        "active": thresholds.max_active,
        "delayed": thresholds.max_delayed,
        "overdue": thresholds.max_overdue,
        "failed": thresholds.max_failed,
    }
    for state, limit in limits.items():
        count = counts[state]
        if limit is None or count <= limit:
            continue
        if state == "overdue":
            since = backlog.oldest_overdue_seconds
            oldest = f", the oldest due {since:.0f} s ago" if since is not None else ""
            problems.append(
                f"queue {name}: {count} delayed jobs overdue by more than "
                f"{backlog.overdue_grace_seconds:g} s{oldest} (threshold {limit}): only a "
                "worker moves a due job to wait, so no worker is running"
            )
        elif state == "failed":
            problems.append(
                f"queue {name}: {count} jobs failed in the last "
                f"{backlog.failed_window_seconds:g} s (threshold {limit}): the worker runs "
                "but sending fails (see the failed jobs' failedReason)"
            )
        else:
            what, why = _WHY[state]
            problems.append(f"queue {name}: {count} {what} (threshold {limit}): {why}")
    age = backlog.oldest_age_seconds
    if age is not None and age > thresholds.max_oldest_age_seconds:
        problems.append(
            f"queue {name}: oldest waiting job {backlog.oldest_job_id} is {age:.0f} s old "
            f"(threshold {thresholds.max_oldest_age_seconds:g} s)"
        )
    return problems
