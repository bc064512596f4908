"""A burst is locked over several connections at once (LQJOBS_LOCK_CONNECTIONS):
every job handed off exactly once, the in-flight cap exact however the lockers
interleave, and a locker's failure rolls its batch back and surfaces."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from lqjobs.bridge import Bridge
from lqjobs.models import JobRow
from tests.stack import add_jobs, count, make_settings

pytestmark = pytest.mark.integration


class RecordingPublisher:
    """Publishes nothing; records which thread handed off which job."""

    def __init__(self, delay: float = 0.0, fail_in: str | None = None) -> None:
        self.delay = delay  # holds every batch's transaction open this long
        self.fail_in = fail_in  # a thread name prefix whose publishes raise
        self.by_thread: Counter[str] = Counter()
        self.job_ids: list[int] = []
        self._lock = threading.Lock()

    def publish(self, jobs: Sequence[JobRow]) -> None:
        name = threading.current_thread().name
        time.sleep(self.delay)
        if self.fail_in is not None and name.startswith(self.fail_in):
            raise OSError("broker gone (test)")
        with self._lock:
            self.by_thread[name.split("_")[0]] += len(jobs)
            self.job_ids.extend(job.id for job in jobs)


def make_bridge(db_url: str, redis_url: str, publisher: Any, **settings: Any) -> Bridge:
    return Bridge(make_settings(db_url, redis_url, **settings), publisher, batch_size=10)


def test_a_burst_is_locked_over_every_connection_each_job_once(db_url: str, redis_url: str) -> None:
    ids = add_jobs(db_url, "noop", 400)
    publisher = RecordingPublisher(delay=0.005)
    bridge = make_bridge(db_url, redis_url, publisher, lock_connections=3, max_in_flight=1000)
    try:
        assert bridge.run_once() == 400
    finally:
        bridge.stop()
        bridge.run_forever()  # stopped already: closes its connections and lockers
    assert sorted(publisher.job_ids) == sorted(ids)  # each job exactly once
    assert set(publisher.by_thread) == {"MainThread", "lqjobs-locker"}
    assert publisher.by_thread["lqjobs-locker"] >= 100  # the other two did real work
    assert count(db_url, "locked_by IS NOT NULL") == 400


def test_light_load_uses_one_connection(db_url: str, redis_url: str) -> None:
    add_jobs(db_url, "noop", 7)  # less than a batch: no burst
    publisher = RecordingPublisher()
    bridge = make_bridge(db_url, redis_url, publisher, lock_connections=3)
    assert bridge.run_once() == 7
    assert set(publisher.by_thread) == {"MainThread"}
    assert bridge._extra_conns == [None, None]  # never opened
    bridge.stop()
    bridge.run_forever()


@contextlib.contextmanager
def reservations_off(enabled: bool) -> Iterator[None]:
    if enabled:
        yield
        return

    @contextlib.contextmanager
    def nothing_reserved(self: Bridge) -> Iterator[int]:
        yield 0

    original = Bridge._reservation
    Bridge._reservation = nothing_reserved  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Bridge._reservation = original  # type: ignore[method-assign]


@pytest.mark.parametrize("protected", [True, False], ids=["reservations", "negative-control"])
def test_the_in_flight_cap_holds_across_lock_connections(
    db_url: str, redis_url: str, protected: bool
) -> None:
    add_jobs(db_url, "noop", 300)
    # Slow publishes hold every locker's transaction open, so all of them count the
    # locked rows before any commits: only the reservations keep them under the cap.
    publisher = RecordingPublisher(delay=0.1)
    bridge = make_bridge(db_url, redis_url, publisher, lock_connections=6, max_in_flight=45)
    with reservations_off(protected):
        bridge.run_once()
    bridge.stop()
    bridge.run_forever()
    locked = count(db_url, "locked_by IS NOT NULL")
    if protected:
        assert locked == 45  # filled to the cap, not past it
    else:
        assert locked > 45  # the bug the reservations prevent


def test_a_failing_locker_rolls_back_its_batch_and_fails_the_pass(
    db_url: str, redis_url: str
) -> None:
    add_jobs(db_url, "noop", 200)
    publisher = RecordingPublisher(delay=0.01, fail_in="lqjobs-locker")
    bridge = make_bridge(db_url, redis_url, publisher, lock_connections=2, max_in_flight=1000)
    with pytest.raises(OSError, match="broker gone"):
        bridge.run_once()
    bridge.stop()
    bridge.run_forever()
    # Only what was really handed off stays locked; the failed batch is free again,
    # with no attempt burned.
    assert count(db_url, "locked_by IS NOT NULL") == len(publisher.job_ids)
    assert count(db_url, "attempts > 0") == len(publisher.job_ids)
    assert publisher.by_thread["lqjobs-locker"] == 0
