"""The callback service's deadline reaper: fails the deferred jobs whose callback
never came.

When an executor answers ``Deferred`` the job stays locked until its function
posts the result. The OpenFaaS queue-worker posts that callback once and only
logs a failed POST, so a callback can simply never come. The worker records each
deferred lease with a deadline (:class:`lqjobs.broker_state.DeferredDeadlines`);
this reaper fails every lease whose deadline has passed, through the same fenced
``fail_job`` as everything else, so a callback that settled the job first turns
the reaper's write into a no-op. If Redis loses the set, the lock still expires
after ``LQJOBS_JOB_EXPIRY`` and a bridge re-picks the job: it only waits longer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from lqjobs.broker_state import DeferredDeadlines, lease_fields
from lqjobs.lease import Lease

RETRY_SECONDS = 5.0  # when a due lease could not be failed (database away), try again then
log = logging.getLogger(__name__)


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
                    "deadline failure not recorded", extra=lease_fields(lease, "reap_retry", exc)
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
