"""The bridge's guarantees with a real broker and worker: serial queues, several
bridges and workers, the in-flight cap, broker outages, bad payloads and names."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from lqjobs.bridge import Bridge, CeleryPublisher
from lqjobs.celery import create_app
from lqjobs.executors import handlers
from lqjobs.ops.embedded import free_port, wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests.stack import (
    add_jobs,
    bridge,
    count,
    flush_broker,
    make_settings,
    stack,
    wait_for_empty_queue,
)

pytestmark = pytest.mark.integration


def knative(db_url: str, redis_url: str, functions: FunctionServer, **extra: Any) -> Any:
    return make_settings(
        db_url, redis_url, executor="knative", knative_ingress_url=functions.url, **extra
    )


def test_a_serial_queue_runs_one_job_at_a_time(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    job_ids = add_jobs(db_url, "serial", 15, {"sleep": 0.05}, queue_name="one-at-a-time")
    add_jobs(db_url, "parallel", 30, {"sleep": 0.05})
    # A long safety poll: the queue's next job must not wait for it.
    with stack(knative(db_url, redis_url, functions, poll_interval=30.0), concurrency=8):
        wait_for_empty_queue(db_url, timeout=20)
    serial = sorted(
        (c for c in functions.calls.all() if c.task == "serial"), key=lambda c: c.started
    )
    assert [c.job_id for c in serial] == job_ids  # one queue: in order, too
    for earlier, later in itertools.pairwise(serial):
        assert later.started >= earlier.ended, "two jobs of one serial queue overlapped"
    parallel = [c for c in functions.calls.all() if c.task == "parallel"]
    assert _max_overlap(parallel) > 1  # the control: unqueued jobs do run side by side


def _max_overlap(calls: list[Any]) -> int:
    events = sorted([(c.started, 1) for c in calls] + [(c.ended, -1) for c in calls])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_in_flight_is_capped_when_nobody_consumes(db_url: str, redis_url: str) -> None:
    add_jobs(db_url, "noop", 120)
    settings = make_settings(db_url, redis_url, max_in_flight=25)
    flush_broker(redis_url)
    with bridge(settings, create_app(settings), batch_size=10) as running:
        wait_until(lambda: count(db_url, "locked_by IS NOT NULL") >= 25, 10, "25 jobs locked")
        wait_until(lambda: running.counters["dispatched"] >= 25, 10, "25 jobs published")
        assert count(db_url, "locked_by IS NOT NULL") == 25  # and no more, however long
        assert running.counters["dispatched"] == 25
    assert count(db_url, "locked_by IS NULL AND attempts = 0") == 95


def test_broker_down_rolls_back_and_burns_no_attempt(db_url: str) -> None:
    add_jobs(db_url, "noop", 20)
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    settings = make_settings(db_url, dead_broker)
    running = Bridge(settings, CeleryPublisher(create_app(settings)))
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: running.counters["dispatched"] == 0 and _tried(running), 10, "a failed publish"
        )
        assert count(db_url, "locked_by IS NOT NULL") == 0
        assert count(db_url, "attempts > 0") == 0
    finally:
        running.stop()
        thread.join(10)
    assert not thread.is_alive()


def _tried(running: Bridge) -> bool:
    return running.failures > 0


def test_an_oversized_payload_is_failed_without_publishing(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    [big] = add_jobs(db_url, "noop", 1, {"blob": "x" * 5000})
    [small] = add_jobs(db_url, "noop", 1)
    with stack(knative(db_url, redis_url, functions, max_payload_bytes=4096)) as running:
        functions.calls.wait_for_calls(1, timeout=20, job_id=small)
        wait_until(lambda: count(db_url) == 1, 20, "the small job to complete")
    assert running.counters["oversized"] == 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        attempts, max_attempts, locked_by, error = conn.execute(
            "SELECT attempts, max_attempts, locked_by, last_error FROM app_jobs.jobs WHERE id = %s",
            [big],
        ).fetchone()  # type: ignore[misc]
    assert (attempts, locked_by) == (max_attempts, None)
    assert error == "payload too large: 5012 bytes (limit 4096)"
    assert functions.calls.calls_for(big) == []


@pytest.fixture
def canary() -> Iterator[socket.socket]:
    """A would-be attacker on another loopback address: nothing may connect to it."""
    listener = socket.socket()
    listener.bind(("127.0.0.2", 0))
    listener.listen()
    listener.settimeout(0.2)
    yield listener
    listener.close()


def hostile_names(canary: socket.socket) -> list[str]:
    target = f"127.0.0.2:{canary.getsockname()[1]}"
    return [
        f"{target}/x#",
        f"{target}?",
        f"user@{target}#",
        f"x\r\nHost: {target}",
        "evil.com/x",
        "169.254.169.254#",
        "a b",
        "UPPER",
        "../admin",
        "a" * 100,
    ]


@pytest.mark.parametrize("mode", ["support-any", "supported-list"])
def test_hostile_task_names_reach_nothing(
    db_url: str, redis_url: str, functions: FunctionServer, canary: socket.socket, mode: str
) -> None:
    names = hostile_names(canary)
    hostile_ids = [add_jobs(db_url, name, 1)[0] for name in names]
    [good] = add_jobs(db_url, "fine", 1)
    routing = (
        {"jobs_support_any": True}
        if mode == "support-any"
        else {"jobs_support_any": False, "jobs_supported": ("fine",)}
    )
    with stack(knative(db_url, redis_url, functions, **routing)):
        functions.calls.wait_for_calls(1, timeout=20, job_id=good)
        if mode == "support-any":  # catch-all: named, failed permanently, routed nowhere
            wait_until(
                lambda: count(db_url, "attempts >= max_attempts") == len(names),
                30,
                "every hostile job to be failed permanently",
            )
    with pytest.raises(TimeoutError):
        canary.accept()
    assert {call.task for call in functions.calls.all()} == {"fine"}
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT attempts, last_error FROM app_jobs.jobs WHERE id = ANY(%s)", [hostile_ids]
        ).fetchall()
    if mode == "supported-list":  # never picked: untouched
        assert rows and all(attempts == 0 for attempts, _ in rows)
    else:
        assert all(err and "\n" not in err and "\r" not in err for _, err in rows)


def test_native_handlers_run_in_the_celery_worker(db_url: str, redis_url: str) -> None:
    seen: list[Any] = []

    @handlers.handler("native-sum")
    def native_sum(payload: Any, job: Any) -> None:
        seen.append((payload["a"] + payload["b"], job.job_id))

    try:
        job_ids = add_jobs(db_url, "native-sum", 1000, {"a": 2, "b": 3})
        with stack(make_settings(db_url, redis_url, executor="native")):
            wait_for_empty_queue(db_url, timeout=60)
        assert sorted(seen) == [(5, job_id) for job_id in job_ids]  # each exactly once
    finally:
        handlers.unregister("native-sum")


def test_the_bridge_reconnects_when_its_sessions_are_terminated(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    settings = knative(db_url, redis_url, functions, poll_interval=60.0)
    with stack(settings) as running:
        [first] = add_jobs(db_url, "noop", 1)
        functions.calls.wait_for_calls(1, timeout=10, job_id=first)
        with psycopg.connect(db_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        # The bridge's listener and work connection, and the worker's pooled sessions.
        assert killed is not None and killed[0] >= 3
        wait_until(lambda: running.counters["failures"] >= 1, 10, "the bridge to notice")
        [second] = add_jobs(db_url, "noop", 1)
        # Picked up after the reconnect (LISTEN first, then a poll), long before the 60 s
        # poll; the worker's dead pooled session makes it redeliver, not drop, the message.
        functions.calls.wait_for_calls(1, timeout=10, job_id=second)
    assert count(db_url) == 0


def test_bridge_metrics_endpoint(db_url: str, redis_url: str) -> None:
    import urllib.request

    from lqjobs.metrics import MetricsServer

    add_jobs(db_url, "served", 30)
    add_jobs(db_url, "nobody-serves-this", 2)
    settings = make_settings(
        db_url, redis_url, jobs_support_any=False, jobs_supported=("served",), max_in_flight=10
    )
    flush_broker(redis_url)
    with bridge(settings, create_app(settings)) as running:
        wait_until(lambda: running.counters["dispatched"] >= 10, 10, "10 jobs published")
        server = MetricsServer("127.0.0.1", 0, running.metrics).start()
        try:
            url = f"http://127.0.0.1:{server.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
                assert response.headers["Content-Type"].startswith("text/plain")
        finally:
            server.stop()
    worker = f'worker_id="{running.worker_id}"'
    assert f"lqjobs_jobs_dispatched_total{{{worker}}} 10" in text
    assert f"lqjobs_jobs_in_flight{{{worker}}} 10" in text  # the cap holds
    assert "lqjobs_jobs_ready 20\n" in text
    assert "lqjobs_jobs_unroutable 2\n" in text
    assert "# TYPE lqjobs_jobs_locked_total counter" in text
