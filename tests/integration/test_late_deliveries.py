"""Deliveries that come late, and leases nobody will settle (docs/design.md, F5).

A message carries no Celery ``expires``: a worker whose clock runs ahead would
discard it unrun and strand its job. The preflight judges lateness on the
database's clock instead and gives a late lease back, its attempt returned; a
lease that expired on its last attempt is failed, visibly, by a bridge's sweep.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from click.testing import CliRunner

from lqjobs.bridge.loop import ABANDONED_MESSAGE
from lqjobs.celery import create_app
from lqjobs.db import JobsDB
from lqjobs.lease import Lease
from lqjobs.ops import doctor
from lqjobs.ops.cli import main
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.worker import JobRunner, Result
from tests import processes
from tests.chaos.scenarios.clock import faketime
from tests.runners import WORKER
from tests.stack import add_jobs, bridge, count, flush_broker, make_settings

pytestmark = pytest.mark.integration
TENANT = UUID("11111111-2222-3333-4444-555555555555")
DEAD_BRIDGE = "bridge-gone-host-000000000000"
# A short ladder: HTTP 0.5+1 s < soft 2 s < hard 3 s < V 4 s; start window 1+4 = 5 s.
SHORT_LADDER = {
    "LQJOBS_HTTP_CONNECT_TIMEOUT": "0.5",
    "LQJOBS_HTTP_TIMEOUT": "1",
    "LQJOBS_TASK_SOFT_TIME_LIMIT": "2",
    "LQJOBS_TASK_TIME_LIMIT": "3",
    "LQJOBS_VISIBILITY_TIMEOUT": "4",
    "LQJOBS_MAX_QUEUE_WAIT": "1",
    "LQJOBS_JOB_EXPIRY": "12",
}


def job_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    cur = conn.execute(
        "SELECT attempts, max_attempts, locked_by, last_error, run_at <= now() AS due "
        "FROM app_jobs.jobs WHERE id = %s",
        [job_id],
    )
    found = cur.fetchone()
    if found is None:
        return None
    names = [column.name for column in cur.description or []]
    return dict(zip(names, found, strict=True))


def lock_aged(conn: psycopg.Connection[Any], worker_id: str, age: timedelta, **job: Any) -> Lease:
    """A job locked by ``worker_id`` whose lease is ``age`` old (database clock)."""
    queue = JobsDB().queue
    added = queue.add_job(conn, TENANT, "noop", {}, **job)
    locked = queue.get_job(conn, worker_id, None)
    assert locked is not None and locked.id == added.id
    conn.execute(
        "UPDATE app_jobs.jobs SET locked_at = locked_at - %s WHERE id = %s", [age, added.id]
    )
    row = conn.execute(
        "SELECT locked_at, attempts FROM app_jobs.jobs WHERE id = %s", [added.id]
    ).fetchone()
    assert row is not None
    return Lease(added.id, worker_id, row[1], row[0])


def test_a_delivery_past_the_start_window_gives_the_lease_back_unrun(
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
) -> None:
    window = timedelta(seconds=runner.settings.start_window_seconds())
    lease = lock_aged(conn, WORKER, window + timedelta(seconds=1), max_attempts=1)
    assert runner.run(lease, "noop", "call-1", redelivered=False) is Result.GIVEN_BACK
    assert len(functions.calls) == 0
    given_back = job_row(conn, lease.job_id)
    assert given_back is not None
    assert given_back["attempts"] == 0 and given_back["locked_by"] is None  # attempt returned
    assert given_back["due"]  # no back-off: it never ran
    assert given_back["last_error"].startswith("not started: delivered")
    # ...so even a job on its last attempt is taken again.
    assert JobsDB().queue.get_job(conn, WORKER, None) is not None


def test_a_delivery_inside_the_start_window_runs(
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
) -> None:
    window = timedelta(seconds=runner.settings.start_window_seconds())
    lease = lock_aged(conn, WORKER, window - timedelta(seconds=2), max_attempts=1)
    assert runner.run(lease, "noop", "call-1", redelivered=False) is Result.COMPLETED
    assert len(functions.calls.calls_for(lease.job_id)) == 1


def run_cli(db_url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--database-url", db_url, *args])


def test_a_lease_expired_on_its_last_attempt_is_shown_then_failed_by_a_bridge(
    db_url: str, redis_url: str, conn: psycopg.Connection[Any]
) -> None:
    settings = make_settings(db_url, redis_url, job_expiry=60.0)
    expired = lock_aged(conn, DEAD_BRIDGE, timedelta(seconds=61), max_attempts=1)
    running = lock_aged(conn, DEAD_BRIDGE, timedelta(seconds=1), max_attempts=1)

    status = run_cli(db_url, "status", "--json").output
    assert '"locked_last_attempt": 2' in status
    findings = {f.check: f for f in doctor.check_database(settings)}
    assert findings["abandoned leases"].level is doctor.Level.FAIL
    assert findings["abandoned leases"].detail.startswith("1 jobs")

    flush_broker(redis_url)
    with bridge(settings, create_app(settings)):
        wait_until(
            lambda: (job_row(conn, expired.job_id) or {}).get("locked_by") is None,
            10,
            "the bridge's sweep to fail the abandoned lease",
        )
    failed = job_row(conn, expired.job_id)
    assert failed is not None
    assert (failed["attempts"], failed["last_error"]) == (1, ABANDONED_MESSAGE)
    still = job_row(conn, running.job_id)
    assert still is not None and still["locked_by"] == DEAD_BRIDGE  # its lease is alive
    findings = {f.check: f for f in doctor.check_database(settings)}
    assert "abandoned leases" not in findings


@pytest.fixture
def env(db_url: str, redis_url: str, functions: FunctionServer) -> dict[str, str]:
    flush_broker(redis_url)
    return processes.environment(
        db_url,
        redis_url,
        LQJOBS_EXECUTOR="knative",
        LQJOBS_KNATIVE_INGRESS_URL=functions.url,
        **SHORT_LADDER,
    )


def lease_age(db_url: str, job_id: int) -> float:
    with psycopg.connect(db_url, autocommit=True) as probe:
        found = probe.execute(
            "SELECT extract(epoch FROM now() - locked_at)::float8 FROM app_jobs.jobs WHERE id = %s",
            [job_id],
        ).fetchone()
    return -1.0 if found is None or found[0] is None else float(found[0])


def test_workers_down_past_the_start_window_strand_nothing(
    db_url: str, env: dict[str, str], functions: FunctionServer, tmp_path: Path
) -> None:
    """The messages wait longer than the start window for a worker: each is given
    back on arrival and runs on the next lease; the last-attempt job too."""
    last_try = add_jobs(db_url, "noop", 3, max_attempts=1)
    retries_left = add_jobs(db_url, "noop", 3, max_attempts=5)
    with processes.running(processes.bridge(env, tmp_path)):
        wait_until(
            lambda: min(lease_age(db_url, i) for i in last_try + retries_left) > 6,
            30,
            "every lease to outlive the 5 s start window with no worker up",
        )
        with processes.running(processes.worker(env, tmp_path, concurrency=4)) as (worker,):
            wait_until(lambda: count(db_url) == 0, 40, "every job to complete")
    calls = {i: functions.calls.calls_for(i) for i in last_try + retries_left}
    assert all(len(made) == 1 for made in calls.values()), calls
    # The first lease was given back with its attempt: each job ran at attempt 1.
    assert {made[0].attempt for made in calls.values()} == {1}
    assert "Discarding revoked task" not in worker.output()


def test_a_worker_whose_clock_runs_ahead_runs_every_job(
    db_url: str, env: dict[str, str], functions: FunctionServer, tmp_path: Path
) -> None:
    ids = add_jobs(db_url, "noop", 20, max_attempts=1)
    ahead = env | faketime("+30s")
    with processes.running(
        processes.worker(ahead, tmp_path, concurrency=4), processes.bridge(env, tmp_path)
    ) as (worker, _bridge):
        wait_until(lambda: count(db_url) == 0, 40, "every job to complete")
    assert sorted(call.job_id for call in functions.calls.all()) == ids
    assert "Discarding revoked task" not in worker.output()


def test_expired_leases_do_not_fill_a_bridges_in_flight_cap(
    conn: psycopg.Connection[Any],
) -> None:
    """Leases whose messages were lost (no delivery will come) stop counting against
    the bridge's cap once expired: its next pass re-takes them and goes on."""
    expiry = timedelta(seconds=60)
    lost = [lock_aged(conn, WORKER, expiry + timedelta(seconds=1)) for _ in range(3)]
    batch = JobsDB().queue.get_jobs_under_cap(conn, WORKER, None, expiry, 10, cap=3)
    assert batch.room == 3
    assert sorted(job.id for job in batch.jobs) == sorted(lease.job_id for lease in lost)
    assert {job.attempts for job in batch.jobs} == {2}  # get_job's expired-lock rule
