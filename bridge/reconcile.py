"""The F4 reconciler: re-publish the leases whose messages a Redis restart lost.

Redis is only the transport (reliability.md F4). Restarted without persistence, it
comes back empty: every message this bridge published and no worker has finished
is gone (queued, reserved by a worker, or unacked), while the rows stay locked by
this bridge's worker id. Without help they wait for the lease expiry
(``LQJOBS_JOB_EXPIRY``) before ``get_job`` re-picks them.

Detection: a Redis server has a ``run_id`` (``INFO server``), new at every start.
The bridge remembers the one it saw; when it changes, the server restarted (or a
failover moved the broker), and every lease the bridge still holds is published
again, through the same :class:`~bridge.publisher.Publisher`. A re-published lease
is the same lease (same attempts and locked_at, so the same Celery task id), not a
new attempt: no attempt is burned, and the task's guards absorb the copies:

- the lease is gone (settled, re-leased): the preflight drops the copy untouched;
- another delivery of it is running: the advisory lock makes the copy wait and
  retry, and a sync call records its outcome before it lets the lock go, so the
  copy then finds the lease settled and is dropped;
- its call had started (the task's per-lease claim in Redis): the copy is failed as
  'worker lost' or, for a job deferred to an asynchronous callback, dropped.

That last guard lives in the broker's Redis, so a restart that lost the data lost
the claims too. A lease deferred to an asynchronous callback then looks like one
never started, and a copy would call the function a second time. So the reconciler
also checks whether Redis kept its data (a marker key of this bridge, written at
every check, must still be there): if it was lost, leases of tasks that may be
deferred (an HTTP executor while a callback URL is configured: a 202 answer defers)
are not re-published; their callback settles them, or the callback deadline or the
lease expiry brings them back, as before the reconciler. The bridge judges this from
its own settings, which must match the workers' (one environment for all roles, as
in docker-compose.yml).

Only leases whose call can still end inside the lease are re-published: a copy may
start until its Celery ``expires`` (``Settings.message_expiry_seconds``: the queue
wait plus one visibility timeout) and run ``LQJOBS_TASK_TIME_LIMIT``, so leases
locked longer than ``E - expires - T_hard`` ago are left to the expiry, which is
close anyway (section 5, the timeout ladder).

Where and how often: :meth:`Reconciler.check` runs in the bridge's loop, before each
pass, at most every ``LQJOBS_RECONCILE_INTERVAL`` seconds (default 5; the bridge's
wait is cut to that interval so an idle bridge checks too). A check is one pipelined
round trip (INFO server, EXISTS and SET of the marker); the leases are read from
Postgres only after a restart. It runs between passes, never inside the lock ->
publish -> commit transaction, so every lease it reads is committed.

- The first run_id seen is just remembered: this incarnation's worker id is new and
  the first check runs before the first ``get_job``, so no lease predates it.
- A check that cannot reach Redis raises the broker error: the bridge treats it as
  the broker outage it is (existing back-off, no ``get_job``), and checks again
  first thing after the back-off, so a restart is caught before new jobs go out.
  The remembered run_id moves only once every lease was re-published: a failed
  re-publish is repeated (duplicates are harmless).
- Brokers other than Redis (no run_id), ``LQJOBS_RECONCILE_INTERVAL=0``, or a Redis
  that refuses the check (an ACL without INFO): off, with a log line saying so.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import redis

from bridge.publisher import Publisher
from lqjobs.db import Connection
from lqjobs.db.reads import Reads
from lqjobs.models import JobRow
from lqjobs.settings import Settings

log = logging.getLogger(__name__)
MARKER_PREFIX = "lqjobs:reconcile:"  # + worker id: "this Redis still holds my writes"
PROBE_TIMEOUT = 5.0  # seconds: a hung Redis must not hang the bridge's loop


class BrokerProbe(Protocol):
    def observe(self) -> tuple[str, bool]:
        """The server's run_id, and whether this bridge's marker survived (then
        re-written); raises the client's error when the broker is unreachable."""

    def close(self) -> None: ...


class RedisProbe:
    """``INFO server`` plus this bridge's marker key, in one round trip."""

    def __init__(self, url: str, worker_id: str, marker_ttl: float) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT
        )
        self.marker = MARKER_PREFIX + worker_id
        # The marker only has to outlive the leases it vouches for; it is refreshed at
        # every check, and one left by a dead bridge goes away on its own.
        self.marker_ttl = max(1, math.ceil(marker_ttl))

    def observe(self) -> tuple[str, bool]:
        pipe = self.client.pipeline(transaction=False)
        pipe.info("server")
        pipe.exists(self.marker)
        pipe.set(self.marker, b"1", ex=self.marker_ttl)
        info, kept, _ = pipe.execute()
        return str(info["run_id"]), bool(kept)

    def close(self) -> None:
        self.client.close()


def may_defer(settings: Settings) -> Callable[[str], bool]:
    """Whether a call of the task can end deferred to an asynchronous callback: any
    HTTP executor does on a 202 answer when a callback URL is configured."""
    if settings.internal_jobs_callback_url is None:
        return lambda task: False
    return lambda task: settings.executor_for(task) != "native"


def republish_window(settings: Settings) -> timedelta:
    """How old a lease may be for a copy, sent now, to end its call inside the lease."""
    seconds = settings.job_expiry - settings.message_expiry_seconds() - settings.task_time_limit
    return timedelta(seconds=max(0.0, seconds))


class Reconciler:
    """Re-publishes this bridge's leases after the broker's run_id changed."""

    def __init__(
        self,
        probe: BrokerProbe | None,
        reads: Reads,
        worker_id: str,
        publisher: Publisher,
        counters: Counter[str],
        *,
        interval: float,
        window: timedelta,
        deferrable: Callable[[str], bool],
        batch_size: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe if interval > 0 else None
        self.reads = reads
        self.worker_id = worker_id
        self.publisher = publisher
        self.counters = counters
        self.interval = interval
        self.window = window
        self.deferrable = deferrable
        self.batch_size = max(1, batch_size)
        self._clock = clock
        self._next_check = -math.inf  # the first pass checks at once: the baseline
        self.run_id: str | None = None
        self._data_lost = False  # sticky until the re-publish after a restart succeeded

    @property
    def enabled(self) -> bool:
        return self.probe is not None

    def check_soon(self) -> None:
        """Check on the next pass (after a failed pass: the broker may have restarted)."""
        self._next_check = -math.inf

    def cap_wait(self, timeout: float) -> float:
        """The bridge's wait, cut so that the next check is not late."""
        if self.probe is None:
            return timeout
        return max(0.0, min(timeout, self._next_check - self._clock()))

    def check(self, conn: Connection) -> int:
        """If due, compare the run_id and re-publish after a change; the number of
        leases re-published. Broker errors propagate (the bridge backs off)."""
        if self.probe is None or self._clock() < self._next_check:
            return 0
        try:
            run_id, kept = self.probe.observe()
        except redis.exceptions.NoPermissionError as exc:  # an ACL without INFO: no outage
            log.error(
                "broker refused the reconciler's check; reconciler off",
                extra={
                    "action": "reconciler_off",
                    "worker_id": self.worker_id,
                    "error": type(exc).__name__,
                },
            )
            self.close()
            self.probe = None
            return 0
        if self.run_id is not None and run_id != self.run_id:
            self._data_lost = self._data_lost or not kept
            count = self._republish(conn)
        else:
            count = 0
        self.run_id = run_id  # only reached once the re-publish (if any) went through
        self._data_lost = False
        self._next_check = self._clock() + self.interval
        return count

    def _republish(self, conn: Connection) -> int:
        leases = self.reads.jobs_locked_by(conn, self.worker_id, self.window)
        held_back: list[JobRow] = []
        if self._data_lost:
            held_back = [job for job in leases if self.deferrable(job.task_identifier)]
            leases = [job for job in leases if not self.deferrable(job.task_identifier)]
        for start in range(0, len(leases), self.batch_size):
            self.publisher.publish(leases[start : start + self.batch_size])
        self.counters["broker_restarts"] += 1
        self.counters["republished"] += len(leases)
        log.warning(
            "broker restarted: re-published the leases this bridge holds",
            extra={
                "action": "leases_republished",
                "worker_id": self.worker_id,
                "count": len(leases),
                "held_back": len(held_back),  # deferrable, and Redis lost their claims
                "broker_data_lost": self._data_lost,
            },
        )
        return len(leases)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()


def build(
    settings: Settings,
    reads: Reads,
    worker_id: str,
    publisher: Publisher,
    counters: Counter[str],
    batch_size: int,
) -> Reconciler:
    """The bridge's reconciler: off for a non-Redis broker or an interval of 0."""
    url = settings.broker_url.get_secret_value()
    interval = settings.reconcile_interval
    probe: BrokerProbe | None = None
    if interval > 0 and url.startswith(("redis:", "rediss:")):
        # The marker must outlive the gap between two checks, and the leases it covers.
        probe = RedisProbe(url, worker_id, marker_ttl=max(settings.job_expiry, 3 * interval))
    elif interval > 0:
        log.info(
            "broker is not Redis: leases lost by the broker come back at the lease expiry",
            extra={"action": "reconciler_off", "worker_id": worker_id},
        )
    return Reconciler(
        probe,
        reads,
        worker_id,
        publisher,
        counters,
        interval=interval,
        window=republish_window(settings),
        deferrable=may_defer(settings),
        batch_size=batch_size,
    )
