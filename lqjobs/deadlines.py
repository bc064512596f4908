"""Deadlines for jobs deferred to an asynchronous callback (reliability.md F19).

When an executor answers ``Deferred`` the job stays locked until its function
posts the result. The OpenFaaS queue-worker posts that callback once and only
logs a failed POST, so a callback can simply never come. The Celery task then
records the lease in a Redis sorted set (score: the deadline) and the callback
service's reaper fails every lease whose deadline has passed, through the same
fenced ``fail_job`` as everything else: a callback that settled the job first
turns the reaper's write into a no-op.

Times come from the Redis server's clock, so skew between the worker and the
callback hosts does not move a deadline. Redis is only an accelerator here: if
it loses the set (restart without persistence, eviction), the job's lock still
expires after ``LQJOBS_JOB_EXPIRY`` and a bridge re-picks it; nothing is lost,
it only waits longer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from lqjobs.lease import Lease

KEY = "lqjobs:deferred"
RETRY_SECONDS = 5.0  # when a due lease could not be failed (database away), try again then
log = logging.getLogger(__name__)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode(lease: Lease) -> str:
    """The lease as a compact sorted-set member (worker ids never contain ``|``)."""
    return f"{lease.job_id}|{lease.worker_id}|{lease.attempts}|{lease.locked_at_us}"


def decode(member: bytes | str) -> Lease | None:
    text = member.decode() if isinstance(member, bytes) else member
    try:
        job_id, worker_id, attempts, locked_us = text.split("|")
        locked_at = _EPOCH + timedelta(microseconds=int(locked_us))
        return Lease(int(job_id), worker_id, int(attempts), locked_at)
    except ValueError:
        return None


class DeferredDeadlines:
    """The ``lqjobs:deferred`` sorted set: member = lease, score = deadline (unix time)."""

    def __init__(self, client: redis.Redis, key: str = KEY) -> None:
        self.client = client
        self.key = key

    def _now(self) -> float:
        seconds, micros = self.client.time()
        return float(seconds) + float(micros) / 1_000_000

    def record(self, lease: Lease, seconds: float) -> bool:
        """Fail ``lease`` if it is still held ``seconds`` from now. Never raises: without
        Redis the lease expiry is the fallback."""
        try:
            self.client.zadd(self.key, {encode(lease): self._now() + seconds})
            return True
        except redis.RedisError as exc:
            log.warning(
                "callback deadline not recorded", extra=_fields(lease, "deadline_lost", exc)
            )
            return False

    def forget(self, lease: Lease) -> None:
        """The job is settled: its deadline is moot (a no-op if it was never recorded)."""
        try:
            self.client.zrem(self.key, encode(lease))
        except redis.RedisError as exc:
            log.warning("callback deadline not removed", extra=_fields(lease, "deadline_kept", exc))

    def pop_due(self, limit: int = 100) -> list[Lease]:
        """Remove and return leases whose deadline has passed. Each ZREM is atomic, so
        of several reapers only the one that removed a member acts on it."""
        due: list[Any] = self.client.zrangebyscore(self.key, "-inf", self._now(), 0, limit)
        if not due:
            return []
        pipe = self.client.pipeline(transaction=False)
        for member in due:
            pipe.zrem(self.key, member)
        removed = pipe.execute()
        leases = [decode(member) for member, gone in zip(due, removed, strict=True) if gone]
        return [lease for lease in leases if lease is not None]

    def pending(self) -> int:
        return int(self.client.zcard(self.key))


class DeadlineReaper:
    """A thread that hands every due lease to ``fail``, about every ``interval`` seconds.

    ``fail`` records the failure (fenced) and returns; if it raises, the lease is put
    back ``RETRY_SECONDS`` later instead of being forgotten.
    """

    def __init__(
        self, deadlines: DeferredDeadlines, fail: Callable[[Lease], None], interval: float = 1.0
    ) -> None:
        self.deadlines = deadlines
        self._fail = fail
        self.interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deadline-reaper", daemon=True)

    def start(self) -> DeadlineReaper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def reap_once(self) -> int:
        """Fail the leases due now; the number handed to ``fail``."""
        leases = self.deadlines.pop_due()
        for lease in leases:
            try:
                self._fail(lease)
            except Exception as exc:
                log.warning(
                    "deadline failure not recorded", extra=_fields(lease, "reap_retry", exc)
                )
                self.deadlines.record(lease, RETRY_SECONDS)
        return len(leases)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                while self.reap_once() and not self._stopping.is_set():
                    pass  # a full batch may mean more are due
            except redis.RedisError as exc:
                log.warning(
                    "deadline reaper cannot reach redis",
                    extra={"action": "reaper_redis_error", "error": type(exc).__name__},
                )


def _fields(lease: Lease, action: str, exc: Exception) -> dict[str, Any]:
    return {
        "action": action,
        "job_id": lease.job_id,
        "worker_id": lease.worker_id,
        "attempt": lease.attempts,
        "error": type(exc).__name__,
    }
