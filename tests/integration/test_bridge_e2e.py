"""Bridge -> Redis -> real Celery worker -> HTTP function -> fenced complete/fail."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import psycopg
import pytest

from lqjobs.celery import create_app
from lqjobs.lease import TASK_NAME
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests.stack import (
    TENANT,
    add_jobs,
    bridge,
    count,
    flush_broker,
    make_settings,
    stack,
    wait_for_empty_queue,
    worker,
)

pytestmark = pytest.mark.integration


def knative(functions: FunctionServer) -> dict[str, Any]:
    return {"executor": "knative", "knative_ingress_url": functions.url}


def assert_each_called_once(functions: FunctionServer, job_ids: list[int]) -> None:
    per_job = Counter(call.job_id for call in functions.calls.all() if 200 <= call.status < 300)
    assert {job_id: per_job[job_id] for job_id in job_ids} == dict.fromkeys(job_ids, 1)


def test_1000_jobs_through_knative_each_called_once(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    job_ids = add_jobs(db_url, "noop", 1000)
    with stack(make_settings(db_url, redis_url, **knative(functions))):
        wait_for_empty_queue(db_url, timeout=90)
    assert_each_called_once(functions, job_ids)
    call = functions.calls.calls_for(job_ids[0])[0]
    assert call.route == "knative"
    assert call.headers["x-job-id"] == str(job_ids[0])
    assert call.headers["x-database-id"] == str(TENANT)
    assert call.headers["x-worker-id"].startswith("bridge-test-host-")
    assert call.body == b'{"i": 0}'


@pytest.mark.parametrize("executor", ["openfaas", "devmap"])
def test_jobs_through_openfaas_sync_and_devmap(
    db_url: str, redis_url: str, functions: FunctionServer, executor: str
) -> None:
    job_ids = add_jobs(db_url, "hello", 1000)
    settings = make_settings(
        db_url,
        redis_url,
        executor=executor,
        internal_gateway_url=functions.url,
        internal_gateway_development_map={"hello": functions.dev_url("hello")},
    )
    with stack(settings):
        wait_for_empty_queue(db_url, timeout=60)
    assert_each_called_once(functions, job_ids)
    assert {call.route for call in functions.calls.all()} == {
        "openfaas" if executor == "openfaas" else "plain"
    }


def test_a_failing_job_is_retried_on_the_sql_backoff(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    [job_id] = add_jobs(db_url, "flaky", 1, {"fail_times": 1})
    with stack(make_settings(db_url, redis_url, **knative(functions))):
        wait_for_empty_queue(db_url, timeout=30)
    first, second = functions.calls.calls_for(job_id)
    assert first.status == 500 and second.status == 200
    assert (first.headers["x-job-attempt"], second.headers["x-job-attempt"]) == ("1", "2")
    gap = second.started - first.ended
    # fail_job moves run_at by exp(1) s; the bridge's timer must fire on time,
    # not on the next safety poll.
    assert math.e - 0.1 <= gap <= math.e + 0.5, gap


def test_a_permanent_failure_is_parked_after_one_call(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    [job_id] = add_jobs(db_url, "invalid", 1, {"status": 422}, max_attempts=5)
    with stack(make_settings(db_url, redis_url, **knative(functions))) as bridge:
        functions.calls.wait_for_calls(1, timeout=20, job_id=job_id)
        wait_until_unlocked(db_url)
        assert bridge.counters["dispatched"] == 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        attempts, max_attempts, error = conn.execute(
            "SELECT attempts, max_attempts, last_error FROM app_jobs.jobs WHERE id = %s", [job_id]
        ).fetchone()
    assert attempts == max_attempts == 5
    assert "422" in error
    assert len(functions.calls.calls_for(job_id)) == 1


def test_a_trickling_function_fails_each_attempt_at_the_http_deadline(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    # T_http 0.5 + 1 s; the soft limit is 8 s, V 20 s, the lease 60 s
    settings = make_settings(
        db_url, redis_url, http_connect_timeout=0.5, http_timeout=1.0, **knative(functions)
    )
    [job_id] = add_jobs(db_url, "trickle", 1, {"trickle": 0.3}, max_attempts=2)
    flush_broker(redis_url)
    app = create_app(settings)
    with worker(app), bridge(settings, app):
        parked = f"id = {job_id} AND attempts = 2 AND locked_by IS NULL"
        wait_until(lambda: count(db_url, parked) == 1, 30, "the trickling job to be parked")
        calls = functions.calls.wait_for_calls(2, timeout=5, job_id=job_id)
        results = dict(app.tasks[TASK_NAME].runners.get().results)
    assert results == {"failed": 2}  # each attempt's outcome recorded, none dropped as stale
    assert [call.attempt for call in calls] == [1, 2]
    for call in calls:  # each hung up on at the deadline, well inside the soft limit
        assert call.status == 499
        assert call.ended - call.started < 1.5 + 0.5
    with psycopg.connect(db_url, autocommit=True) as conn:
        (error,) = conn.execute(
            "SELECT last_error FROM app_jobs.jobs WHERE id = %s", [job_id]
        ).fetchone()
    assert error == "timeout after 1.5s (whole exchange) calling trickle"


def wait_until_unlocked(db_url: str) -> None:
    wait_until(lambda: count(db_url, "locked_by IS NOT NULL") == 0, 20, "jobs to be unlocked")
