"""The BullMQ email queue's backlog (redis-py): how many jobs wait, and for how long.

BullMQ's layout (verified against its Lua scripts, v5): a queue's keys live under
``<prefix>:<queue>:``; waiting jobs are ids in the ``wait`` list (``paused`` list on
older versions while the queue is paused; v5 keeps them in ``wait`` and sets ``paused``
in the ``meta`` hash), prioritised jobs in the ``prioritized`` sorted set (score =
priority and a counter, not a time). ``addStandardJob`` LPUSHes new jobs (RPUSH for
``lifo``) and workers ``RPOPLPUSH wait active``, so the oldest FIFO job is the list's
tail (index -1). Both ends are read and the older counts; LIFO jobs (RPUSHed onto the
tail) would push the oldest FIFO job inside the list, making the age a lower bound.
Each job is the hash ``<prefix>:<queue>:<id>`` whose ``timestamp`` field is its creation
time in ms since the epoch (for a delayed job that became due, the age includes the
delay). BullMQ <5 could also keep a marker ``0:<n>`` at the tail; markers are neither
counted nor aged. (The runbook's ``bull:email:waiting``
is not a BullMQ key: the list is ``wait``.)

For the prioritised set, where the oldest job can be anywhere, a bounded sample of each
end is aged: a check must stay cheap on a huge backlog.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from opsdrill.errors import TargetUnreachable
from opsdrill.mail.errors import AuthRejected, ProbeFailed

STAGE = "queue"
PRIORITY_SAMPLE = 50


class RedisLike(Protocol):
    """The few commands used, so unit tests can pass a tiny fake."""

    def type(self, name: str) -> Any: ...
    def llen(self, name: str) -> Any: ...
    def lindex(self, name: str, index: int) -> Any: ...
    def zcard(self, name: str) -> Any: ...
    def zrange(self, name: str, start: int, end: int) -> Any: ...
    def hget(self, name: str, key: str) -> Any: ...
    def hexists(self, name: str, key: str) -> Any: ...
    def exists(self, *names: str) -> Any: ...


@dataclass(frozen=True)
class Backlog:
    queue: str
    prefix: str
    waiting: int  # wait list (markers excluded)
    paused_list: int  # legacy paused list
    prioritized: int
    queue_paused: bool  # meta hash says paused
    queue_known: bool  # any of the queue's keys exist: a typo in the name shows here
    oldest_job_id: str | None
    oldest_timestamp_ms: int | None
    oldest_age_seconds: float | None
    keys: tuple[str, ...] = field(default=())

    @property
    def total_waiting(self) -> int:
        return self.waiting + self.paused_list + self.prioritized

    def evidence(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "prefix": self.prefix,
            "total_waiting": self.total_waiting,
            "wait": self.waiting,
            "paused": self.paused_list,
            "prioritized": self.prioritized,
            "queue_paused": self.queue_paused,
            "queue_known": self.queue_known,
            "oldest_job_id": self.oldest_job_id,
            "oldest_timestamp_ms": self.oldest_timestamp_ms,
            "oldest_age_seconds": None
            if self.oldest_age_seconds is None
            else round(self.oldest_age_seconds, 1),
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


def backlog_from_client(
    client: RedisLike,
    queue: str,
    prefix: str = "bull",
    *,
    now_ms: int | None = None,
    sample: int = PRIORITY_SAMPLE,
) -> Backlog:
    base = f"{prefix}:{queue}:"
    waiting, wait_ends = _list_info(client, base + "wait")
    paused, paused_ends = _list_info(client, base + "paused")
    prioritized, candidates = 0, [*wait_ends, *paused_ends]
    if _s(client.type(base + "prioritized")) == "zset":
        prioritized = int(client.zcard(base + "prioritized"))
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
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    keys = ("meta", "id", "wait", "paused", "prioritized", "active", "completed", "events")
    known = bool(client.exists(*(base + k for k in keys)))
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
        keys=tuple(base + k for k in ("wait", "paused", "prioritized")),
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
) -> Backlog:
    """Read the backlog of ``<prefix>:<queue>``. Raises ``TargetUnreachable`` when Redis
    cannot be reached, ``AuthRejected`` (a ``CredentialsRejected``) when it refuses the
    credentials: both mean nothing could be judged."""
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
        # RESP2: Redis < 6 has no HELLO; no retries: the timeout is the bound.
        protocol=2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return backlog_from_client(client, queue, prefix)
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
        raise TargetUnreachable(f"{where}: {type(exc).__name__}: {exc}") from None
    except redis.exceptions.InvalidResponse as exc:  # something else answers on that port
        raise TargetUnreachable(f"{where}: not a Redis server: {exc}") from None
    except redis.exceptions.RedisError as exc:
        raise ProbeFailed(STAGE, f"{where}: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()


def over_thresholds(backlog: Backlog, max_waiting: int, max_age_seconds: float) -> Sequence[str]:
    """Problems, one sentence each (empty when the queue is healthy)."""
    problems = []
    name = f"{backlog.prefix}:{backlog.queue}"
    if not backlog.queue_known:
        problems.append(f"queue {name}: no keys found (wrong queue name or prefix?)")
    if backlog.total_waiting > max_waiting:
        problems.append(
            f"queue {name}: {backlog.total_waiting} jobs waiting (threshold {max_waiting}): "
            "is the worker running?"
        )
    age = backlog.oldest_age_seconds
    if age is not None and age > max_age_seconds:
        problems.append(
            f"queue {name}: oldest waiting job {backlog.oldest_job_id} is {age:.0f} s old "
            f"(threshold {max_age_seconds:g} s)"
        )
    return problems
