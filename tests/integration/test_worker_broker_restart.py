"""F22: Redis restarts while the worker runs calls, and the worker rides it out.

A real ``celery -A lqjobs.app worker`` process (not supervised: an exit is the failure)
runs slow calls against the function server; the bridge runs in this process. Redis
is shut down mid-call and started again on the same port, once with its data saved
(persistence) and once empty. Afterwards: the worker is the same process, each
running call's outcome is recorded once, the worker takes new jobs, and nothing is
left locked in Postgres or waiting in Redis.

Without lqjobs' channel guard (lqjobs/transport.py) kombu closes the worker's
broken channel a second time, tries to restore its unacknowledged messages through
a transport it already detached, and the worker exits 1 with "Unrecoverable error:
AttributeError: 'NoneType' object has no attribute 'hostname'"."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from lqjobs.celery import create_app
from lqjobs.ops.embedded import EmbeddedRedis, wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests import processes
from tests.stack import QUEUE, add_jobs, bridge, count, make_settings

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]

JOBS = 3
CONCURRENCY = 4  # every job runs at once, with a slot to spare for the bridge's copies
CALL_SECONDS = 2.0
# A short ladder, so that a persisted message whose ack was lost comes back quickly:
# T_http 1 + 3 < soft 5 < hard 6 < V 8; W 8 + V 8 + hard 6 < E 60.
LADDER = {
    "http_connect_timeout": 1.0,
    "http_timeout": 3.0,
    "task_soft_time_limit": 5.0,
    "task_time_limit": 6.0,
    "visibility_timeout": 8.0,
    "max_queue_wait": 8.0,
    "job_expiry": 60.0,
}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def worker_and_bridge(
    db_url: str, server: EmbeddedRedis, functions: FunctionServer, logs: Path
) -> Iterator[processes.Process]:
    """The worker process and a bridge thread (reconciler on) over ``server``."""
    knative = {"executor": "knative", "knative_ingress_url": functions.url}
    env = processes.environment(
        db_url,
        server.url,
        **{f"LQJOBS_{name.upper()}": str(value) for name, value in (LADDER | knative).items()},
    )
    settings = make_settings(db_url, server.url, reconcile_interval=0.5, **LADDER, **knative)
    with (
        processes.running(processes.worker(env, logs, concurrency=CONCURRENCY)) as (worker,),
        bridge(settings, create_app(settings)),
    ):
        yield worker


def broker_backlog(server: EmbeddedRedis) -> tuple[int, int]:
    """(messages queued, messages delivered and not acknowledged) in the broker."""
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.llen(QUEUE)), int(client.hlen("unacked"))
    finally:
        client.close()


def alive(worker: processes.Process) -> bool:
    return worker.proc.poll() is None


def last_error(worker: processes.Process) -> str:
    lines = [line for line in worker.output().splitlines() if "Error" in line]
    return lines[-1] if lines else "(no error logged)"


@pytest.mark.parametrize("persisted", [True, False], ids=["saved", "empty"])
def test_the_worker_rides_out_a_redis_restart_during_its_calls(
    db_url: str,
    own_redis: EmbeddedRedis,
    functions: FunctionServer,
    tmp_path: Path,
    persisted: bool,
) -> None:
    running = add_jobs(db_url, "slow", JOBS, {"sleep": CALL_SECONDS})
    with worker_and_bridge(db_url, own_redis, functions, tmp_path) as worker:
        wait_until(lambda: functions.calls_in_progress() == JOBS, 30, "every call running")
        own_redis.shutdown(save=persisted)
        wait_until(lambda: "Connection to broker lost" in worker.output(), 10, "the loss seen")
        own_redis.start()
        wait_until(lambda: count(db_url) == 0, 30, "the running calls' outcomes")
        later = add_jobs(db_url, "slow", 1, {"sleep": 0})
        wait_until(lambda: count(db_url) == 0 or not alive(worker), 30, "a job added later")
        assert alive(worker), f"the worker exited {worker.proc.returncode}: {last_error(worker)}"
        # a persisted delivery whose ack went to the dead connection comes back after V;
        # the lease check drops it, and the broker is left with nothing
        wait_until(lambda: broker_backlog(own_redis) == (0, 0), 30, "an empty broker")
        assert alive(worker)
    assert "Unrecoverable error" not in worker.output()
    completed = Counter(call.job_id for call in functions.calls.all() if call.status == 200)
    assert completed == Counter(running + later), "every job called exactly once"
    assert count(db_url) == 0, "nothing left locked or queued in Postgres"
