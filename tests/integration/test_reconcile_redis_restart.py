"""F4: Redis is SIGKILLed mid-run and comes back empty (no persistence). The real
bridge (in this process, for its counters), the real Celery worker process
(``celery -A lqjobs.app worker --pool threads``) and the function server run throughout.

With the reconciler the bridge sees the new run_id and re-publishes the leases it
holds: every job completes long before the lease expiry E, and no job is called
twice beyond the calls running at the kill. The negative control (reconciler off)
leaves the lost jobs locked, with no message anywhere, past the point where the
protected run was done.

Each test has a Redis of its own, so killing it leaves the suite's Redis alone."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from lqjobs.celery import create_app
from lqjobs.ops.embedded import EmbeddedRedis, wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.ops.function_calls import CallRecord
from tests import processes
from tests.stack import QUEUE, add_jobs, bridge, count, make_settings

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]

JOBS = 48
SLEEP = 0.4  # seconds per call: 48 calls over 8 slots is about 2.5 s of work
CONCURRENCY = 8
KILL_AFTER = 8  # calls finished before the kill
EXPIRY = 60.0  # E (the make_settings default), seconds
RECOVERY = EXPIRY / 3  # after the restart, the protected run is done within this


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def supervised_worker(env: dict[str, str], logs: Path) -> Iterator[list[processes.Process]]:
    """The Celery worker, started again whenever it exits, as docker-compose's restart
    policy does: with celery/kombu 5.7 a Redis killed under a worker with unacked
    messages sometimes crashes it ("Unrecoverable error: AttributeError ... 'hostname'"
    in kombu's redis ``_connparams``, from the consumer's reconnect path)."""
    started = [processes.worker(env, logs, "worker-0", CONCURRENCY)]
    stopping = threading.Event()

    def watch() -> None:
        while not stopping.wait(0.1):
            if started[-1].proc.poll() is not None:
                name = f"worker-{len(started)}"
                started.append(processes.worker(env, logs, name, CONCURRENCY))

    watcher = threading.Thread(target=watch, name="worker-supervisor", daemon=True)
    watcher.start()
    try:
        yield started
    finally:
        stopping.set()
        watcher.join(5)
        for process in started:
            process.stop()


@contextlib.contextmanager
def running_stack(
    db_url: str, server: EmbeddedRedis, functions: FunctionServer, logs: Path, interval: float
) -> Iterator[Any]:
    """A supervised worker process and a bridge thread over ``server``; yields the bridge."""
    env = processes.environment(
        db_url,
        server.url,
        LQJOBS_EXECUTOR="knative",
        LQJOBS_KNATIVE_INGRESS_URL=functions.url,
        LQJOBS_JOB_EXPIRY=str(EXPIRY),
    )
    settings = make_settings(
        db_url,
        server.url,
        executor="knative",
        knative_ingress_url=functions.url,
        job_expiry=EXPIRY,
        reconcile_interval=interval,
    )
    with supervised_worker(env, logs), bridge(settings, create_app(settings)) as running:
        yield running


def kill_and_restart_empty(server: EmbeddedRedis) -> tuple[float, float]:
    """SIGKILL redis-server, start an empty one on the same port; (before, after) times."""
    client = redis.Redis.from_url(server.url)
    old_run_id = client.info("server")["run_id"]
    queued = client.llen(QUEUE)
    # Nothing survives a SIGKILL of this server: no snapshots, no append-only file.
    persistence = (client.config_get("save")["save"], client.config_get("appendonly"))
    client.close()
    assert queued > 0, "the kill should find messages waiting in Redis"
    assert persistence == ("", {"appendonly": "no"})
    killed_at = time.monotonic()
    server.kill()
    server.start()
    restarted_at = time.monotonic()
    client = redis.Redis.from_url(server.url)
    # A new server, empty when it started. Its queue is not checked here: the worker
    # and the reconciler may refill it at once, which is the recovery under test.
    assert client.info("server")["run_id"] != old_run_id
    client.close()
    return killed_at, restarted_at


def in_flight_at(calls: list[CallRecord], moment: tuple[float, float]) -> int:
    before, after = moment
    return sum(1 for call in calls if call.started < after and call.ended > before)


def duplicated(calls: list[CallRecord]) -> int:
    per_job = Counter(call.job_id for call in calls if 200 <= call.status < 300)
    return sum(n - 1 for n in per_job.values() if n > 1)


def locked(db_url: str) -> list[tuple[int, str, float]]:
    """(id, locked_by, seconds until the lease expires) of every locked job."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, locked_by, extract(epoch FROM locked_at + %s * interval '1 second' "
            "- now())::float8 FROM app_jobs.jobs WHERE locked_by IS NOT NULL ORDER BY id",
            [EXPIRY],
        ).fetchall()
    return [(int(r[0]), str(r[1]), float(r[2])) for r in rows]


def test_a_redis_restart_is_recovered_by_republishing_the_held_leases(
    db_url: str, own_redis: EmbeddedRedis, functions: FunctionServer, tmp_path: Path
) -> None:
    job_ids = add_jobs(db_url, "slow", JOBS, {"sleep": SLEEP})
    with running_stack(db_url, own_redis, functions, tmp_path, 0.5) as running:
        functions.calls.wait_for_calls(KILL_AFTER, timeout=20)
        assert count(db_url, "locked_by IS NOT NULL") > KILL_AFTER  # most of them published
        moment = kill_and_restart_empty(own_redis)
        wait_until(lambda: count(db_url) == 0, RECOVERY, "every job to complete after the restart")
    calls = functions.calls.all()
    per_job = Counter(call.job_id for call in calls if 200 <= call.status < 300)
    assert set(per_job) == set(job_ids), "every job was called and completed"
    assert duplicated(calls) <= in_flight_at(calls, moment)
    assert running.counters["broker_restarts"] == 1
    assert running.counters["republished"] >= JOBS - KILL_AFTER - in_flight_at(calls, moment)
    assert count(db_url, "locked_by IS NOT NULL OR attempts > 1") == 0  # no attempt burned


def test_negative_control_without_the_reconciler_jobs_stay_locked_until_expiry(
    db_url: str, own_redis: EmbeddedRedis, functions: FunctionServer, tmp_path: Path
) -> None:
    add_jobs(db_url, "slow", JOBS, {"sleep": SLEEP})
    with running_stack(db_url, own_redis, functions, tmp_path, 0) as running:
        functions.calls.wait_for_calls(KILL_AFTER, timeout=20)
        moment = kill_and_restart_empty(own_redis)
        # The protected run is done within RECOVERY; this one is not, nor anywhere near.
        with pytest.raises(TimeoutError):
            wait_until(lambda: count(db_url) == 0, RECOVERY, "every job to complete")
        stranded = locked(db_url)
        client = redis.Redis.from_url(own_redis.url)
        queued = client.llen(QUEUE)
        client.close()
    assert len(stranded) >= JOBS - KILL_AFTER - in_flight_at(functions.calls.all(), moment)
    assert {holder for _, holder, _ in stranded} == {running.worker_id}
    assert queued == 0  # locked in Postgres with no message anywhere
    assert min(left for _, _, left in stranded) > EXPIRY / 2  # back only at the expiry
    assert running.counters["republished"] == 0
