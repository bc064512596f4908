"""The real processes: `lqjobs bridge` and `celery -A lqjobs.app worker`, several at once,
stopped with SIGTERM mid-stream, refusing a bad configuration."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests import processes
from tests.stack import add_jobs, count, flush_broker

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]


@pytest.fixture
def env(db_url: str, redis_url: str, functions: FunctionServer) -> dict[str, str]:
    flush_broker(redis_url)
    return processes.environment(
        db_url, redis_url, LQJOBS_EXECUTOR="knative", LQJOBS_KNATIVE_INGRESS_URL=functions.url
    )


def called_once_each(functions: FunctionServer, job_ids: list[int]) -> bool:
    per_job = Counter(call.job_id for call in functions.calls.all() if call.status == 200)
    return set(per_job) == set(job_ids) and max(per_job.values()) == 1


def test_two_bridges_and_two_workers_never_run_a_job_twice(
    db_url: str, env: dict[str, str], functions: FunctionServer, tmp_path: Path
) -> None:
    job_ids = add_jobs(db_url, "noop", 1000)
    env = env | {"LQJOBS_MAX_IN_FLIGHT": "40"}
    with processes.running(
        processes.worker(env, tmp_path, "worker-a", 4),
        processes.worker(env, tmp_path, "worker-b", 4),
        processes.bridge(env, tmp_path, "bridge-a", "--batch-size", "10"),
        processes.bridge(env, tmp_path, "bridge-b", "--batch-size", "10"),
    ):
        wait_until(lambda: count(db_url) == 0, 120, "every job to complete")
    assert called_once_each(functions, job_ids)
    bridges = Counter(call.headers["x-worker-id"] for call in functions.calls.all())
    assert len(bridges) == 2, "both bridges should have handed out jobs"


def test_sigterm_mid_stream_loses_nothing_and_leaves_nothing_locked(
    db_url: str, env: dict[str, str], functions: FunctionServer, tmp_path: Path
) -> None:
    job_ids = add_jobs(db_url, "noop", 600, {"sleep": 0.01})
    with processes.running(processes.worker(env, tmp_path, "worker", 8)):
        first = processes.bridge(env, tmp_path, "bridge-1")
        wait_until(lambda: len(functions.calls) >= 50, 30, "the first calls")
        stopped_at = time.monotonic()
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0, first.output()
        assert time.monotonic() - stopped_at < 5
        assert "bridge stopped" in first.output()
        assert count(db_url) > 0, "the test needs jobs left when the first bridge stops"
        with processes.running(processes.bridge(env, tmp_path, "bridge-2")):
            wait_until(lambda: count(db_url) == 0, 60, "every job to complete")
    assert called_once_each(functions, job_ids)
    with psycopg.connect(db_url, autocommit=True) as conn:
        queues = conn.execute(
            "SELECT count(*) FROM app_jobs.job_queues WHERE locked_by IS NOT NULL"
        ).fetchone()
    assert queues == (0,)


def test_the_worker_refuses_a_broken_timeout_ladder(env: dict[str, str], tmp_path: Path) -> None:
    env = env | {"LQJOBS_VISIBILITY_TIMEOUT": "5"}  # below the hard time limit
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "lqjobs.app", "worker"],
        env=env,
        cwd=processes.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "timeout ladder violated" in done.stderr
    assert "LQJOBS_VISIBILITY_TIMEOUT" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_bridge_refuses_a_bad_hostname(env: dict[str, str], tmp_path: Path) -> None:
    env = env | {"HOSTNAME": "pod\r\nX-Injected: 1"}
    done = subprocess.run(
        [sys.executable, "-m", "lqjobs", "bridge"],
        env=env,
        cwd=processes.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "invalid HOSTNAME" in done.stderr
