"""An existing Celery shop runs app_jobs jobs next to its own tasks: its project
directory has its own ``tasks.py`` (pickle, a Redis result backend, a task with a 5 s
time limit) that registers lqjobs as the README shows, and one
``celery -A tasks worker -Q celery,lqjobs`` runs both kinds. The shop's tasks keep
its serializer, results and time limits; the jobs go through lqjobs' queue with the
guarantees the other tests check: one call per job, a fenced completion."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis
from celery.exceptions import TimeLimitExceeded

from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests import processes
from tests.integration import host_project
from tests.stack import QUEUE, add_jobs, count, flush_broker

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]
HOST_QUEUE = "celery"  # the shop's default queue
PICKLE = "application/x-python-serialize"


def queued(client: redis.Redis, queue: str) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def test_one_worker_runs_the_shop_s_tasks_and_app_jobs_jobs_each_as_its_own(
    db_url: str, redis_url: str, functions: FunctionServer, tmp_path: Path
) -> None:
    project = host_project.write(tmp_path / "shop")
    env = host_project.environment(db_url, redis_url, functions)
    results_url = env["HOST_RESULT_BACKEND"]
    flush_broker(redis_url)
    flush_broker(results_url)
    http_ids = add_jobs(db_url, host_project.HTTP_TASK, 6)
    native_ids = add_jobs(db_url, host_project.NATIVE_TASK, 2)
    broker = redis.Redis.from_url(redis_url)
    results = redis.Redis.from_url(results_url)
    try:
        with host_project.client(env) as shop, processes.running(processes.bridge(env, tmp_path)):
            # Before any worker: the jobs wait on lqjobs' queue, as JSON.
            wait_until(lambda: broker.llen(QUEUE) == 8, 30, "the bridge to publish every job")
            assert {m["content-type"] for m in queued(broker, QUEUE)} == {"application/json"}
            assert broker.llen(HOST_QUEUE) == 0
            value = shop.send_task("tasks.work", args=(0, {"a", "set"}))  # pickle only
            over = shop.send_task("tasks.work", args=(host_project.HOST_TIME_LIMIT + 3, "late"))
            outlives_lqjobs = float(host_project.LQJOBS_LIMITS["LQJOBS_TASK_TIME_LIMIT"]) + 2
            untimed = shop.send_task("tasks.nap", args=(outlives_lqjobs,))
            assert {m["content-type"] for m in queued(broker, HOST_QUEUE)} == {PICKLE}

            with processes.running(host_project.worker(env, project, tmp_path)) as (worker,):
                wait_until(lambda: count(db_url) == 0, 60, "every job to complete")
                assert value.get(timeout=30) == {"a", "set"}
                assert untimed.get(timeout=30) == {"slept": outlives_lqjobs}
                with pytest.raises(TimeLimitExceeded):
                    over.get(timeout=30)
            log = worker.output()
            started = sorted(k.decode() for k in broker.scan_iter("lqjobs:started:*"))
            stored = {k.decode() for k in results.scan_iter("celery-task-meta-*")}
    finally:
        broker.close()
        results.close()

    # Exactly one call per job, each settled by its fenced completion (the rows gone).
    assert Counter(call.job_id for call in functions.calls.all()) == dict.fromkeys(http_ids, 1)
    native_calls = (project / "native-calls.txt").read_text().split()
    assert Counter(map(int, native_calls)) == dict.fromkeys(native_ids, 1)
    # LQJOBS_BROKER_URL unset: the worker's start claims are in the shop's broker.
    assert [key.split("-")[1] for key in started] == sorted(
        str(job) for job in http_ids + native_ids
    )
    # The shop's results are stored; lqjobs' task stores none.
    assert {f"celery-task-meta-{r.id}" for r in (value, over, untimed)} == stored
    # The worker told what in the shop's worker settings weakens lqjobs, and refused nothing.
    assert "host setting weakens lqjobs: worker_prefetch_multiplier" in log
    assert "accept_content" not in log and "Refusing" not in log


def test_doctor_loads_the_shop_s_app_from_its_directory(
    db_url: str, redis_url: str, functions: FunctionServer, tmp_path: Path
) -> None:
    """``lqjobs doctor --app tasks``, run in the project: the shop's ``tasks`` module,
    not lqjobs' package; LQJOBS_BROKER_URL unset, so the app's broker is the one checked."""
    project = host_project.write(tmp_path / "shop")
    env = host_project.worker_environment(host_project.environment(db_url, redis_url, functions))
    done = subprocess.run(
        [sys.executable, "-m", "lqjobs", "doctor", "--app", "tasks"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split()[1]: line.split()[0] for line in done.stdout.splitlines()}
    assert lines["host"] == "ok"  # "host app": lqjobs registered on the shop's app
    assert lines["worker_prefetch_multiplier"] == "warn"
    assert "accept_content" not in lines
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    broker_line = next(line for line in done.stdout.splitlines() if line.split()[1] == "broker")
    assert f":{port}" in broker_line  # the shop's broker, not lqjobs' default
