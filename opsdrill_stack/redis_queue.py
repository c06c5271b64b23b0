"""Redis for the local stack, holding the application's BullMQ email queue.

Debian's ``redis-server`` on 127.0.0.1:PORT with ``requirepass`` (generated, in
secrets.env; the config file holding it is 0600), no persistence. The queue uses BullMQ's
own layout (checked against BullMQ's Lua scripts, ``addStandardJob`` / ``storeJob``):

- ``bull:email:id``        STRING, the job id counter (INCR)
- ``bull:email:<id>``      HASH: name, data (JSON), opts (JSON), timestamp (ms), delay,
                           priority
- ``bull:email:wait``      LIST of waiting job ids; FIFO jobs are LPUSHed, so the oldest
                           waiting job is the last element (LINDEX -1)
- ``bull:email:completed`` ZSET of finished job ids, scored by finishedOn (ms)
- ``bull:email:events``    STREAM ("added", "waiting", "completed")
- ``bull:email:meta``      HASH (opts.maxLenEvents)

The demo queue is healthy: nothing waiting (a worker keeps up), two completed jobs as
history. A seeded waiting job would grow old as the stack runs and fail the age check of
a long test session, so waiting jobs exist only when a test adds them with
``add_waiting_jobs`` (backdated as it likes) and removes them with ``clear_waiting``.

``BullMQ`` drives a queue with the real ``bullmq`` package from npm (``bullmq/queue.mjs``
under Node: its own Lua scripts and its own Worker), for what hand-written keys cannot
prove: delayed jobs becoming due with no worker to promote them, jobs a worker failed,
a queue paused through ``Queue.pause()``. It needs ``node`` and ``node_modules`` (``make
test`` installs them from package-lock.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from opsdrill_stack.daemon import Daemon, write_private
from opsdrill_stack.mail import PROBE, SENDER
from opsdrill_stack.procs import find_binary, free_port

PASSWORD_ENV = "OPSDRILL_REDIS_PASSWORD"
PREFIX = "bull"
QUEUE = "email"
MAX_EVENTS = 10000

_CONFIG = """\
# Written by opsdrill: the local stack's Redis (BullMQ queues). 0600: holds requirepass.
bind 127.0.0.1
port {port}
protected-mode yes
requirepass {password}
daemonize no
dir {dir}
logfile {log}
save ""
appendonly no
databases 4
"""


def _binary() -> str:
    return find_binary("redis-server", "redis-server")


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RedisServer(Daemon):
    label: ClassVar[str] = "Redis"
    log_name: ClassVar[str] = "redis.log"  # written by Redis itself (``logfile``)
    conf_name: ClassVar[str] = "redis.conf"
    start_timeout: ClassVar[float] = 15.0

    # -- lifecycle -----------------------------------------------------------------
    def start(self, password: str) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        write_private(
            self.conf,
            _CONFIG.format(
                port=self.port,
                password=password,
                dir=self.base.resolve(),
                log=self.logfile.resolve(),
            ),
        )

        def ready() -> bool:
            try:
                return bool(self.client(password, timeout=0.5).ping())
            except Exception:
                return False

        self.run_until_ready([_binary(), str(self.conf.resolve())], ready, quiet=True)

    def version(self) -> str:
        out = subprocess.run([_binary(), "--version"], capture_output=True, text=True, timeout=10)
        words = out.stdout.split()
        return "redis " + next((w[2:] for w in words if w.startswith("v=")), "?")

    def client(self, password: str, db: int = 0, timeout: float = 5.0) -> Any:
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=password,
            db=db,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )


class BullQueue:
    """A BullMQ queue written the way BullMQ's scripts write it (producer side only)."""

    def __init__(self, client: Any, queue: str = QUEUE, prefix: str = PREFIX) -> None:
        self.client = client
        self.queue = queue
        self.prefix = prefix

    def key(self, suffix: str) -> str:
        return f"{self.prefix}:{self.queue}:{suffix}"

    def seed(self) -> None:
        """The demo queue: metadata and two completed invitation jobs, nothing waiting."""
        self.client.hset(self.key("meta"), mapping={"opts.maxLenEvents": MAX_EVENTS})
        for minutes_ago in (30, 5):
            job = self._store("portal-invite", _invite(), _now_ms() - minutes_ago * 60_000)
            finished = _now_ms() - minutes_ago * 60_000 + 800
            self.client.hset(
                self.key(job),
                mapping={"processedOn": finished - 700, "finishedOn": finished, "attemptsMade": 1},
            )
            self.client.zadd(self.key("completed"), {job: finished})
            self.client.xadd(self.key("events"), {"event": "completed", "jobId": job})

    def add_waiting_jobs(
        self, count: int = 1, age_seconds: float = 0.0, name: str = "portal-invite"
    ) -> list[str]:
        """Queue ``count`` jobs created ``age_seconds`` ago (the first is the oldest), as
        ``Queue.add`` does: job hash, LPUSH onto wait, events, the worker marker."""
        ids = []
        created = _now_ms() - int(age_seconds * 1000)
        for i in range(count):
            job = self._store(name, _invite(), created + i)
            self.client.lpush(self.key("wait"), job)
            self.client.xadd(self.key("events"), {"event": "waiting", "jobId": job})
            ids.append(job)
        self.client.zadd(self.key("marker"), {"0": 0})
        return ids

    def waiting(self) -> list[str]:
        """Waiting job ids, newest first (BullMQ's LIST order)."""
        return list(self.client.lrange(self.key("wait"), 0, -1))

    def oldest_waiting_age(self) -> float | None:
        oldest = self.client.lindex(self.key("wait"), -1)
        if oldest is None:
            return None
        return (_now_ms() - int(self.client.hget(self.key(oldest), "timestamp"))) / 1000

    def clear_waiting(self) -> int:
        """Remove every waiting job (ids and hashes); the count removed."""
        ids = self.waiting()
        if ids:
            self.client.delete(self.key("wait"), *(self.key(job) for job in ids))
        self.client.delete(self.key("marker"))
        return len(ids)

    @contextlib.contextmanager
    def backlog(self, count: int = 1, age_seconds: float = 0.0) -> Iterator[list[str]]:
        ids = self.add_waiting_jobs(count, age_seconds)
        try:
            yield ids
        finally:
            self.clear_waiting()

    def _store(self, name: str, data: dict[str, Any], timestamp: int) -> str:
        job = str(self.client.incr(self.key("id")))
        opts = {"attempts": 3, "backoff": {"type": "exponential", "delay": 1000}}
        self.client.hset(
            self.key(job),
            mapping={
                "name": name,
                "data": json.dumps(data),
                "opts": json.dumps(opts),
                "timestamp": timestamp,
                "delay": 0,
                "priority": 0,
            },
        )
        self.client.xadd(self.key("events"), {"event": "added", "jobId": job, "name": name})
        return job


SCRIPT = Path(__file__).resolve().parent / "bullmq" / "queue.mjs"
NODE_TIMEOUT = 120.0


class BullMQ:
    """A queue of the stack's Redis driven by BullMQ itself (see the module docstring)."""

    def __init__(self, port: int, password: str, queue: str = QUEUE, prefix: str = PREFIX):
        self.port = port
        self.password = password
        self.queue = queue
        self.prefix = prefix

    def run(self, action: str, **args: Any) -> dict[str, Any]:
        """``queue.mjs ACTION ARGS``: the action's result and BullMQ's own counts
        (``getJobCounts``) afterwards, under ``counts``."""
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is missing (make system installs it; make test needs it)")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "BULLMQ_REDIS_PORT": str(self.port),
            "BULLMQ_REDIS_PASSWORD": self.password,
            "BULLMQ_QUEUE": self.queue,
            "BULLMQ_PREFIX": self.prefix,
        }
        proc = subprocess.run(
            [node, str(SCRIPT), action, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT,
            env=env,
            cwd=SCRIPT.parent,
        )
        if proc.returncode != 0:
            hint = (
                " (is node_modules installed? make test runs npm ci)"
                if ("ERR_MODULE_NOT_FOUND" in proc.stderr)
                else ""
            )
            raise RuntimeError(f"bullmq {action} failed{hint}: {proc.stderr.strip()[-2000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def add(
        self,
        count: int,
        *,
        delay_ms: int = 0,
        priority: int | None = None,
        age_seconds: float = 0.0,
    ) -> dict[str, Any]:
        """``count`` jobs through ``Queue.addBulk``, created ``age_seconds`` ago (a delayed
        job is due at creation + ``delay_ms``: in the past when the age is larger)."""
        args: dict[str, Any] = {"count": count, "delay": delay_ms, "ageSeconds": age_seconds}
        if priority is not None:
            args["priority"] = priority
        return self.run("add", **args)

    def fail(self, count: int) -> dict[str, Any]:
        """``count`` jobs that a real Worker takes and fails (one attempt each)."""
        return self.run("work", count=count, fail=True)

    def complete(self, count: int) -> dict[str, Any]:
        return self.run("work", count=count, fail=False)

    def take(self, count: int) -> dict[str, Any]:
        """``count`` jobs a Worker takes and then dies with: they stay active."""
        return self.run("take", count=count)

    def pause(self) -> dict[str, Any]:
        return self.run("pause")

    def resume(self) -> dict[str, Any]:
        return self.run("resume")

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self.run("counts")["counts"]
        return counts

    def obliterate(self) -> None:
        self.run("obliterate")

    @contextlib.contextmanager
    def scratch(self) -> Iterator[BullMQ]:
        """This queue, obliterated (every key removed by BullMQ) when the block ends."""
        try:
            yield self
        finally:
            self.obliterate()


def _invite() -> dict[str, Any]:
    return {"to": PROBE.address, "from": SENDER.address, "template": "portal-auth"}
