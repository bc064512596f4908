"""Everything lqjobs keeps in the broker's Redis, and whether the broker is Redis.

Postgres is the source of truth; these keys only speed recoveries up, and each
user survives their loss (the lease expiry brings every job back):

- ``lqjobs:started:<task id>`` (:class:`StartedMarks`): a delivery claims the
  start of its lease's call, so a second delivery of the lease is told apart;
- ``lqjobs:deferred`` (:class:`DeferredDeadlines`): a sorted set of leases deferred
  to an asynchronous callback, scored by the deadline the callback must meet;
- ``lqjobs:reconcile:<worker id>`` (:class:`RedisProbe`): a bridge's marker, read
  with the server's ``run_id`` to notice a restart and whether it lost its data.

Times come from the Redis server's clock, so skew between hosts moves nothing.
"""

from __future__ import annotations

import enum
import logging
import math
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import redis

from lqjobs.lease import EPOCH, Lease, to_micros

STARTED_PREFIX = "lqjobs:started:"
RECORDING_PREFIX = "lqjobs:recording:"
DEFERRED_KEY = "lqjobs:deferred"
MARKER_PREFIX = "lqjobs:reconcile:"
NEVER_RAN_PREFIX = "lqjobs:never-ran:"
NEVER_RAN_TTL = 3600  # seconds a job's count of calls that never ran is kept
PROBE_TIMEOUT = 5.0  # seconds: a hung Redis must not hang the bridge's loop
log = logging.getLogger(__name__)


def is_redis(broker_url: str) -> bool:
    """Whether the broker is Redis (``redis://`` or ``rediss://``), so these keys exist."""
    return urlsplit(broker_url).scheme in {"redis", "rediss"}


def lease_fields(lease: Lease, action: str, exc: Exception) -> dict[str, Any]:
    """Log fields of a broker-state operation on ``lease`` that failed with ``exc``."""
    return {
        "action": action,
        "job_id": lease.job_id,
        "worker_id": lease.worker_id,
        "attempt": lease.attempts,
        "error": type(exc).__name__,
    }


class Claim(enum.Enum):
    """What one delivery learns from claiming the start of its lease's call."""

    FIRST = "first"  # nobody started this lease's call before: make it
    STARTED = "started"  # an earlier delivery started it (its worker died mid-call)
    RECORDING = "recording"  # an earlier delivery's call ended; it is writing the outcome
    DEFERRED = "deferred"  # an earlier delivery started it and handed it to a callback


class StartedMarks:
    """Remembers which leases had their call started, and when (database clock), so
    a second delivery of a lease (a redelivery after a lost worker, a message
    re-published or restored after a broker blip) is told apart from the first
    start of its call, and knows whether that call may still be running.

    One round trip per first delivery: ``SET key <start> NX EX ttl`` claims the
    start. Only a delivery that finds the start claimed already reads the start
    time and asks (``ZSCORE``) the deferred-deadline set whether the earlier
    delivery handed this lease to an asynchronous callback."""

    def __init__(
        self, client: redis.Redis | None, ttl: timedelta, deferred_key: str = DEFERRED_KEY
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.deferred_key = deferred_key

    @staticmethod
    def _key(lease: Lease) -> str:
        return STARTED_PREFIX + lease.task_id()

    def claim(self, lease: Lease, now: datetime) -> tuple[Claim, datetime | None]:
        """The claim, and for a start claimed before, when that start was (``now`` is
        the database's clock). Best effort: without Redis every delivery counts as
        the first (the advisory lock still keeps calls apart; a lost worker's
        redelivery may call a second time, which is at-least-once), because an
        exception here would strand the job."""
        if self.client is None:
            return Claim.FIRST, None
        started = str(to_micros(now)).encode()
        try:
            if self.client.set(self._key(lease), started, nx=True, ex=self.ttl):
                return Claim.FIRST, None
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self._key(lease))
            pipe.zscore(self.deferred_key, lease.encode())
            pipe.exists(RECORDING_PREFIX + lease.task_id())
            earlier, deferred_until, recording = pipe.execute()
        except redis.RedisError:
            log.warning(
                "could not claim the start of the call",
                extra={"action": "start_claim_failed", "job_id": lease.job_id},
            )
            return Claim.FIRST, None
        if deferred_until is not None:
            return Claim.DEFERRED, None
        if recording:
            return Claim.RECORDING, None
        return Claim.STARTED, _from_micros(earlier)

    def count_never_ran(self, job_id: int) -> int | None:
        """How many calls of this job in a row (within NEVER_RAN_TTL) never reached its
        function, this one included; None without Redis or when it cannot answer."""
        if self.client is None:
            return None
        key = NEVER_RAN_PREFIX + str(job_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, NEVER_RAN_TTL)
            count, _ = pipe.execute()
        except redis.RedisError:
            return None
        return int(count)

    def recording(self, lease: Lease, ttl: float) -> None:
        """Say for ``ttl`` seconds (Redis' clock: no host's matters) that this lease's
        call is over and its outcome being written, so that a second delivery waits
        instead of taking the worker for lost. Renewed before each retry; best effort."""
        if self.client is None:
            return
        try:
            self.client.set(RECORDING_PREFIX + lease.task_id(), b"1", px=int(ttl * 1000))
        except redis.RedisError:
            log.warning(
                "could not mark the outcome as being written",
                extra={"action": "recording_mark_failed", "job_id": lease.job_id},
            )


def _from_micros(value: bytes | None) -> datetime:
    """A start time read back; anything unreadable counts as long ago."""
    try:
        return EPOCH + timedelta(microseconds=int(value or b"0"))
    except (ValueError, OverflowError):
        return EPOCH


class DeferredDeadlines:
    """The ``lqjobs:deferred`` sorted set: member = the encoded lease, score = the
    deadline (unix time, Redis clock)."""

    def __init__(self, client: redis.Redis, key: str = DEFERRED_KEY) -> None:
        self.client = client
        self.key = key

    def _now(self) -> float:
        seconds, micros = self.client.time()
        return float(seconds) + float(micros) / 1_000_000

    def record(self, lease: Lease, seconds: float) -> bool:
        """Fail ``lease`` if it is still held ``seconds`` from now. Never raises: without
        Redis the lease expiry is the fallback."""
        try:
            self.client.zadd(self.key, {lease.encode(): self._now() + seconds})
            return True
        except redis.RedisError as exc:
            log.warning(
                "callback deadline not recorded", extra=lease_fields(lease, "deadline_lost", exc)
            )
            return False

    def forget(self, lease: Lease) -> None:
        """The job is settled: its deadline is moot (a no-op if it was never recorded)."""
        try:
            self.client.zrem(self.key, lease.encode())
        except redis.RedisError as exc:
            log.warning(
                "callback deadline not removed", extra=lease_fields(lease, "deadline_kept", exc)
            )

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
        leases = [Lease.decode(member) for member, gone in zip(due, removed, strict=True) if gone]
        return [lease for lease in leases if lease is not None]

    def pending(self) -> int:
        return int(self.client.zcard(self.key))


class RedisProbe:
    """A bridge's restart check: ``INFO server`` plus its marker key, in one round trip."""

    def __init__(self, url: str, worker_id: str, marker_ttl: float) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT
        )
        self.marker = MARKER_PREFIX + worker_id
        # The marker only has to outlive the leases it vouches for; it is refreshed at
        # every check, and one left by a dead bridge goes away on its own.
        self.marker_ttl = max(1, math.ceil(marker_ttl))

    def observe(self) -> tuple[str, bool]:
        """The server's run_id, and whether this bridge's marker survived (then
        re-written); raises the client's error when the broker is unreachable."""
        pipe = self.client.pipeline(transaction=False)
        pipe.info("server")
        pipe.exists(self.marker)
        pipe.set(self.marker, b"1", ex=self.marker_ttl)
        info, kept, _ = pipe.execute()
        return str(info["run_id"]), bool(kept)

    def close(self) -> None:
        self.client.close()
