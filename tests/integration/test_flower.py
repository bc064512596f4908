"""Flower shows app_jobs jobs under their task identifier, with job id, attempt and
database id visible: checked in headless Chromium while jobs run. The screenshot is
kept in tests/artifacts/flower-tasks.png."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from lqjobs.db import JobsDB
from lqjobs.ops.embedded import free_port, wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests import processes
from tests.integration import host_project
from tests.stack import add_jobs, count, flush_broker, make_settings, stack

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]
TENANT = UUID("f10e4000-0000-4000-8000-00000000f10e")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str, timeout: float = 60) -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium not installed (apt-get install chromium); CI runs this test")
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={ARTIFACTS / '.chromium'}",
            "--virtual-time-budget=8000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout


@contextlib.contextmanager
def running_flower(
    env: dict[str, str], logs: Path, cwd: Path = processes.ROOT, app: str = "lqjobs.app"
) -> Iterator[str]:
    """``celery -A <app> flower`` in ``cwd``; yields its URL once it answers."""
    port = free_port()
    argv = ["celery", "-A", app, "flower", f"--port={port}", "--address=127.0.0.1"]
    env = env | {"FLOWER_UNAUTHENTICATED_API": "true"}  # lets the test ask for workers
    proc = processes.Process("flower", [sys.executable, "-m", *argv], env, logs, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 30, "Flower to answer")
        yield url
    finally:
        proc.stop()


@pytest.fixture
def flower(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[str]:
    with running_flower(processes.environment(db_url, redis_url), tmp_path) as url:
        yield url


def _answers(url: str, path: str = "/healthcheck", expect: str = "") -> bool:
    try:
        with urllib.request.urlopen(url + path, timeout=2) as response:
            return bool(response.status == 200) and expect in response.read().decode()
    except OSError:
        return False


def test_flower_lists_jobs_under_their_task_identifier(
    db_url: str, redis_url: str, flower: str
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    flush_broker(redis_url)
    with FunctionServer() as functions:
        settings = make_settings(
            db_url, redis_url, executor="knative", knative_ingress_url=functions.url
        )
        with stack(settings):
            wait_until(
                lambda: _answers(flower, "/api/workers?refresh=1", "@"),
                30,
                "Flower to see the worker",
            )
            jobs_db = JobsDB()
            with psycopg.connect(db_url, autocommit=True) as conn:
                ids: list[Any] = [
                    jobs_db.queue.add_job(conn, TENANT, task, {"sleep": 0.3}).id
                    for task in ("send-welcome-email", "resize-avatar") * 3
                ]
            wait_until(lambda: count(db_url) == 0, 30, "the jobs to complete")
            dom = ""
            deadline = time.monotonic() + 30
            while "send-welcome-email" not in dom and time.monotonic() < deadline:
                dom = chromium("--dump-dom", f"{flower}/tasks")
            chromium(
                "--window-size=1400,900",
                f"--screenshot={ARTIFACTS / 'flower-tasks.png'}",
                f"{flower}/tasks",
            )
            task_id = next(t for t in dom.split('"') if t.startswith(f"job-{ids[0]}-1-"))
            detail = chromium("--dump-dom", f"{flower}/task/{task_id}")
    assert "send-welcome-email" in dom and "resize-avatar" in dom
    assert f"job-{ids[0]}-1-" in dom  # the task id: job id and attempt
    assert f"job_id={ids[0]} attempt=1 database_id={TENANT}" in detail
    assert (ARTIFACTS / "flower-tasks.png").stat().st_size > 10_000


def test_flower_shows_a_shop_s_own_tasks_beside_app_jobs_jobs(
    db_url: str, redis_url: str, functions: FunctionServer, tmp_path: Path
) -> None:
    """The shop's Flower (``celery -A tasks flower`` in its project) over its one worker
    (with ``-E``, task events on) lists both kinds of task."""
    ARTIFACTS.mkdir(exist_ok=True)
    flush_broker(redis_url)
    project = host_project.write(tmp_path / "shop")
    env = host_project.environment(db_url, redis_url, functions)
    shop_env = host_project.worker_environment(env)
    worker = host_project.worker(env, project, tmp_path, "-E")
    with (
        host_project.client(env) as shop,
        processes.running(worker, processes.bridge(env, tmp_path)),
        running_flower(shop_env, tmp_path, cwd=project, app="tasks") as url,
    ):
        wait_until(lambda: _answers(url, "/api/workers?refresh=1", "@"), 30, "the worker")
        add_jobs(db_url, host_project.HTTP_TASK, 2)
        add_jobs(db_url, host_project.NATIVE_TASK, 1)
        assert shop.send_task("tasks.work", args=(0, 7)).get(timeout=30) == 7
        wait_until(lambda: count(db_url) == 0, 30, "the jobs to complete")
        dom = ""
        deadline = time.monotonic() + 30
        while not all(name in dom for name in SHOP_TASKS) and time.monotonic() < deadline:
            dom = chromium("--dump-dom", f"{url}/tasks")
        chromium(
            "--window-size=1400,900",
            f"--screenshot={ARTIFACTS / 'flower-shop-tasks.png'}",
            f"{url}/tasks",
        )
    assert all(name in dom for name in SHOP_TASKS), dom[-2000:]


SHOP_TASKS = ("tasks.work", host_project.HTTP_TASK, host_project.NATIVE_TASK)
