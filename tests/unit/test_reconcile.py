"""The F4 reconciler's decisions, with a scripted broker probe and lease source
(the real thing, with a Redis killed mid-run, is in
tests/integration/test_reconcile_redis_restart.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

import pytest
import redis

from lqjobs.bridge.reconcile import Reconciler, build, may_defer, republish_window
from lqjobs.db.reads import Reads
from lqjobs.models import JobRow
from lqjobs.settings import Settings

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
WORKER = "bridge-test-abc"


def job(job_id: int, task: str = "noop") -> JobRow:
    return JobRow(
        id=job_id,
        database_id=UUID(int=1),
        queue_name=None,
        task_identifier=task,
        payload='{"secret": 1}',
        priority=0,
        run_at=T0,
        attempts=1,
        max_attempts=25,
        key=None,
        last_error=None,
        locked_at=T0,
        locked_by=WORKER,
        created_at=T0,
        updated_at=T0,
    )


class Probe:
    """Answers (run_id, marker kept) from a script; an exception in it is raised."""

    def __init__(self, *answers: tuple[str, bool] | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.closed = False

    def observe(self) -> tuple[str, bool]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        self.closed = True


class Leases:
    def __init__(self, jobs: list[JobRow]) -> None:
        self.jobs = jobs
        self.asked: list[tuple[str, timedelta]] = []

    def jobs_locked_by(self, conn: Any, worker_id: str, locked_within: timedelta) -> list[JobRow]:
        self.asked.append((worker_id, locked_within))
        return list(self.jobs)


class Publisher:
    def __init__(self, fail_times: int = 0) -> None:
        self.batches: list[list[int]] = []
        self.fail_times = fail_times

    def publish(self, jobs: Sequence[JobRow]) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise redis.ConnectionError("broker went away")
        self.batches.append([j.id for j in jobs])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reconciler(
    probe: Probe | None,
    leases: Leases,
    publisher: Publisher,
    clock: Clock,
    *,
    interval: float = 5.0,
    deferrable: Any = lambda task: False,
    batch_size: int = 50,
) -> Reconciler:
    return Reconciler(
        probe,
        cast(Reads, leases),
        WORKER,
        publisher,
        Counter(),
        interval=interval,
        window=timedelta(seconds=30),
        deferrable=deferrable,
        batch_size=batch_size,
        clock=clock,
    )


def test_first_run_id_is_remembered_and_an_unchanged_one_does_nothing() -> None:
    probe, leases, publisher = Probe(("r1", False), ("r1", True)), Leases([job(1)]), Publisher()
    rec = reconciler(probe, leases, publisher, Clock())
    assert rec.check(None) == 0  # type: ignore[arg-type]
    assert rec.run_id == "r1"
    rec.check_soon()
    assert rec.check(None) == 0  # type: ignore[arg-type]
    assert publisher.batches == [] and leases.asked == []  # no database read either


def test_a_new_run_id_republishes_every_held_lease_in_batches() -> None:
    leases = Leases([job(i) for i in range(1, 6)])
    publisher, clock = Publisher(), Clock()
    rec = reconciler(Probe(("r1", True), ("r2", False)), leases, publisher, clock, batch_size=2)
    rec.check(None)  # type: ignore[arg-type]
    clock.now += 5
    assert rec.check(None) == 5  # type: ignore[arg-type]
    assert publisher.batches == [[1, 2], [3, 4], [5]]
    assert leases.asked == [(WORKER, timedelta(seconds=30))]
    assert rec.counters["republished"] == 5 and rec.counters["broker_restarts"] == 1
    assert rec.run_id == "r2"


def test_checks_are_rate_limited_and_the_wait_is_cut_to_the_next_check() -> None:
    probe, clock = Probe(("r1", True)), Clock()
    rec = reconciler(probe, Leases([]), Publisher(), clock, interval=5.0)
    rec.check(None)  # type: ignore[arg-type]
    clock.now += 2
    rec.check(None)  # type: ignore[arg-type]
    assert probe.calls == 1
    assert rec.cap_wait(15.0) == pytest.approx(3.0)
    assert rec.cap_wait(1.0) == 1.0
    clock.now += 3
    rec.check(None)  # type: ignore[arg-type]
    assert probe.calls == 2


def test_an_unreachable_broker_raises_and_keeps_the_baseline() -> None:
    leases, publisher, clock = Leases([job(1)]), Publisher(), Clock()
    probe = Probe(("r1", True), redis.ConnectionError("refused"), ("r2", False))
    rec = reconciler(probe, leases, publisher, clock)
    rec.check(None)  # type: ignore[arg-type]
    clock.now += 5
    with pytest.raises(redis.ConnectionError):
        rec.check(None)  # type: ignore[arg-type]
    assert rec.run_id == "r1"
    assert rec.check(None) == 1  # type: ignore[arg-type]  # due at once after a failure
    assert publisher.batches == [[1]]


def test_a_failed_republish_is_repeated_and_remembers_that_data_was_lost() -> None:
    leases = Leases([job(1, "sync"), job(2, "async")])
    publisher, clock = Publisher(fail_times=1), Clock()
    probe = Probe(("r1", True), ("r2", False), ("r2", True))  # marker re-written meanwhile
    rec = reconciler(probe, leases, publisher, clock, deferrable=lambda task: task == "async")
    rec.check(None)  # type: ignore[arg-type]
    clock.now += 5
    with pytest.raises(redis.ConnectionError):
        rec.check(None)  # type: ignore[arg-type]
    assert rec.run_id == "r1"
    rec.check_soon()
    assert rec.check(None) == 1  # type: ignore[arg-type]
    assert publisher.batches == [[1]]  # the deferrable lease is still held back


def test_deferrable_leases_are_republished_when_redis_kept_its_data() -> None:
    leases = Leases([job(1, "sync"), job(2, "async")])
    publisher, clock = Publisher(), Clock()
    rec = reconciler(
        Probe(("r1", True), ("r2", True)),
        leases,
        publisher,
        clock,
        deferrable=lambda task: task == "async",
    )
    rec.check(None)  # type: ignore[arg-type]
    clock.now += 5
    assert rec.check(None) == 2  # type: ignore[arg-type]


def test_the_log_line_has_counts_and_no_payload(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rec = reconciler(Probe(("r1", True), ("r2", False)), Leases([job(7)]), Publisher(), clock)
    rec.check(None)  # type: ignore[arg-type]
    clock.now += 5
    with caplog.at_level("WARNING", logger="lqjobs.bridge.reconcile"):
        rec.check(None)  # type: ignore[arg-type]
    [record] = caplog.records
    assert record.action == "leases_republished"  # type: ignore[attr-defined]
    assert (record.worker_id, record.count) == (WORKER, 1)  # type: ignore[attr-defined]
    assert "secret" not in str(record.__dict__)


def test_a_refused_info_turns_the_reconciler_off_instead_of_blocking_the_bridge() -> None:
    probe = Probe(redis.exceptions.NoPermissionError("NOPERM info"))
    rec = reconciler(probe, Leases([job(1)]), Publisher(), Clock())
    assert rec.check(None) == 0  # type: ignore[arg-type]
    assert not rec.enabled and probe.closed
    assert rec.cap_wait(15.0) == 15.0


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": "postgresql://x/y", "hostname": "h"} | overrides
    return Settings(**values)


@pytest.mark.parametrize(
    ("overrides", "enabled"),
    [
        ({}, True),
        ({"broker_url": "rediss://h:6380/0"}, True),
        ({"reconcile_interval": 0}, False),
        ({"broker_url": "amqp://guest@rabbit//"}, False),
        ({"broker_url": "sentinel://h:26379"}, False),
    ],
)
def test_on_for_redis_brokers_only_and_off_at_interval_zero(
    overrides: dict[str, Any], enabled: bool
) -> None:
    rec = build(settings(**overrides), Reads(), WORKER, Publisher(), Counter(), 50)
    assert rec.enabled is enabled
    rec.close()  # no connection was opened: redis-py connects lazily


def test_which_tasks_may_be_deferred() -> None:
    assert not may_defer(settings())("hello")  # no callback URL: nothing defers
    with_callbacks = settings(
        internal_jobs_callback_url="http://cb/callback", task_executors={"n": "native"}
    )
    assert may_defer(with_callbacks)("hello")  # a 202 answer defers any HTTP task
    assert not may_defer(with_callbacks)("n")


def test_the_republish_window_is_the_start_window() -> None:
    # A copy is worth sending while a delivery may still start the call: queue wait
    # 180 + visibility 120 after the lock; a later one gives the lease back unrun.
    assert republish_window(settings()) == timedelta(seconds=300)
    assert republish_window(settings(max_queue_wait=20, visibility_timeout=90)) == timedelta(
        seconds=110
    )
