"""The reconciler: re-publishes the leases whose messages a Redis restart lost.

A Redis restarted without persistence comes back empty while the rows stay locked
by this bridge's worker id; without help they wait for the lease expiry. The
bridge remembers the server's ``run_id``; when it changes, every lease it still
holds (and whose call can still end inside the lease) is published again: the
same lease, so no attempt is burned, and the task's guards absorb the copies.
If Redis also lost this bridge's marker key, the start claims are gone too, so
leases that may have been deferred to a callback are held back. The decisions,
and why each is safe, are in docs/design.md (F4).

:meth:`Reconciler.check` runs in the bridge's loop between passes (never inside
lock -> publish -> commit), at most every ``LQJOBS_RECONCILE_INTERVAL`` seconds.
Off for a non-Redis broker, an interval of 0, or a Redis that refuses the check.
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

from lqjobs.bridge.publisher import Publisher
from lqjobs.broker_state import RedisProbe, is_redis
from lqjobs.db import Connection
from lqjobs.db.reads import Reads
from lqjobs.models import JobRow
from lqjobs.settings import Settings

log = logging.getLogger(__name__)


class BrokerProbe(Protocol):
    def observe(self) -> tuple[str, bool]:
        """The server's run_id, and whether this bridge's marker survived (then
        re-written); raises the client's error when the broker is unreachable."""

    def close(self) -> None: ...


def may_defer(settings: Settings) -> Callable[[str], bool]:
    """Whether a call of the task can end deferred to an asynchronous callback: any
    HTTP executor does on a 202 answer when a callback URL is configured."""
    if settings.internal_jobs_callback_url is None:
        return lambda task: False
    return lambda task: any(name != "native" for name in settings.route_of(task))


def republish_window(settings: Settings) -> timedelta:
    """How old a lease may be for a copy, sent now, to be worth sending: a delivery
    starts its call only inside the start window (judged on the database's clock)."""
    return timedelta(seconds=settings.start_window_seconds())


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
    if interval > 0 and is_redis(url):
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
