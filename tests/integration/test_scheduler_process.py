"""The real `lqjobs scheduler` process: SIGKILLed and restarted mid-schedule, stopped
with SIGTERM, refusing a bad scheduler id."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from lqjobs.db import JobsDB
from lqjobs.ops.embedded import wait_until
from tests import processes
from tests.job_sink import install_sink, sunk, whole_seconds

pytestmark = pytest.mark.integration
TENANT = UUID("11111111-2222-3333-4444-555555555555")
SCHEDULER_ID = "scheduler-proc-host"  # HOSTNAME=proc-host in processes.environment
NO_BROKER = "redis://127.0.0.1:9/0"  # the scheduler never talks to the broker


@pytest.fixture
def env(db_url: str) -> dict[str, str]:
    return processes.environment(db_url, NO_BROKER)


def locked(conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
    return conn.execute(
        "SELECT id, locked_by FROM app_jobs.scheduled_jobs WHERE locked_by IS NOT NULL"
    ).fetchall()


def test_sigkill_and_restart_never_runs_a_tick_twice_and_sigterm_exits_0(
    db_url: str, conn: psycopg.Connection[Any], env: dict[str, str], tmp_path: Path
) -> None:
    install_sink(db_url)
    sid = (
        JobsDB()
        .scheduled.add_scheduled_job(conn, TENANT, "sink-tick", {}, {"rule": "* * * * * *"})
        .id
    )

    def ticks() -> int:
        return len(sunk(conn, "sink-tick"))

    def two_more(what: str) -> None:
        seen = ticks()
        wait_until(lambda: ticks() >= seen + 2, 15, what)

    process = processes.scheduler(env, tmp_path, "scheduler-0")
    try:
        for restart in range(1, 5):
            two_more(f"two ticks before kill {restart}")
            process.signal(signal.SIGKILL)
            process.wait(5)
            # the dead scheduler's lock stays: only a scheduler with its id releases it
            assert locked(conn) == [(sid, SCHEDULER_ID)]
            process = processes.scheduler(env, tmp_path, f"scheduler-{restart}")
        two_more("two ticks after the last restart")
        stopped_at = time.monotonic()
        process.signal(signal.SIGTERM)
        assert process.wait(5) == 0, process.output()
        assert time.monotonic() - stopped_at < 3
    finally:
        process.stop()
    assert "scheduler stopped" in process.output()
    assert locked(conn) == []
    seconds = whole_seconds(sunk(conn, "sink-tick"))
    assert len(seconds) >= 10
    assert len(set(seconds)) == len(seconds), f"two jobs in one second: {seconds}"


def test_the_scheduler_refuses_a_bad_id(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lqjobs", "scheduler"],
        env=env | {"LQJOBS_SCHEDULER_ID": "sched\r\nX-Injected: 1"},
        cwd=processes.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "invalid LQJOBS_SCHEDULER_ID" in done.stderr
    assert "Traceback" not in done.stderr
