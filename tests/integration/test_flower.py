"""Flower shows app_jobs jobs under their task identifier, with job id, attempt and
database id visible: checked in headless Chromium while jobs run. The screenshot is
kept in tests/artifacts/flower-tasks.png."""

from __future__ import annotations

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
from tests.stack import count, flush_broker, make_settings, stack

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


@pytest.fixture
def flower(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = processes.environment(db_url, redis_url)
    argv = ["celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"]
    env["FLOWER_UNAUTHENTICATED_API"] = "true"  # lets the test ask which workers it sees
    proc = processes.Process("flower", [sys.executable, "-m", *argv], env, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 30, "Flower to answer")
        yield url
    finally:
        proc.stop()


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
