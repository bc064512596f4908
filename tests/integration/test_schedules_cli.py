"""`lqjobs schedules`: next fire times, holders, and the flags of scheduled jobs that
may never fire again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from click.testing import CliRunner

from lqjobs.db import JobsDB
from lqjobs.models import JobRow
from lqjobs.ops.cli import main
from lqjobs.scheduler.service import application_name

pytestmark = pytest.mark.integration
TENANT = UUID("11111111-2222-3333-4444-555555555555")
jobs_db = JobsDB()


@pytest.fixture
def live_scheduler_session(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A session announcing scheduler-live, as a running scheduler's do."""
    with psycopg.connect(
        db_url, autocommit=True, application_name=application_name("scheduler-live")
    ) as session:
        yield session


def add(conn: psycopg.Connection[Any], task: str, info: Any) -> int:
    return jobs_db.scheduled.add_scheduled_job(conn, TENANT, task, {"secret": "CANARY-3"}, info).id


def hold(conn: psycopg.Connection[Any], holder: str, task: str, age: str) -> None:
    assert jobs_db.scheduled.get_scheduled_job(conn, holder, [task]) is not None
    conn.execute(
        "UPDATE app_jobs.scheduled_jobs SET locked_at = now() - %s::interval "
        "WHERE task_identifier = %s",
        [age, task],
    )


def test_schedules_lists_and_flags(
    db_url: str, conn: psycopg.Connection[Any], live_scheduler_session: psycopg.Connection[Any]
) -> None:
    every_second = {"rule": "* * * * * *"}
    ids = {
        "ok": add(conn, "ok", every_second),
        "gone": add(conn, "gone", every_second),
        "fresh": add(conn, "fresh", every_second),
        "finished": add(conn, "finished", {"rule": "* * * * *", "end": "2000-01-01T00:00:00Z"}),
        "invalid": add(conn, "invalid", {"rule": "61 * * * *"}),
        "blocked": add(conn, "blocked", {"hour": [3], "minute": [0]}),
    }
    hold(live_scheduler_session, "scheduler-live", "ok", "1 hour")
    hold(conn, "scheduler-dead", "gone", "1 hour")
    hold(conn, "scheduler-starting", "fresh", "5 seconds")  # within the grace period
    blocked_job = jobs_db.scheduled.run_scheduled_job(conn, ids["blocked"])
    assert isinstance(blocked_job, JobRow)
    jobs_db.queue.permanently_fail_jobs(conn, [blocked_job.id])

    result = CliRunner().invoke(main, ["--database-url", db_url, "schedules", "--json"])
    assert result.exit_code == 0, result.output
    assert "CANARY-3" not in result.output
    by_task = {item["task"]: item for item in json.loads(result.output)}
    assert {task: by_task[task]["flags"] for task in ids} == {
        "ok": [],
        "gone": ["holder-gone"],
        "fresh": [],
        "finished": ["finished"],
        "invalid": ["invalid"],
        "blocked": ["blocked"],
    }
    assert {task: by_task[task]["id"] for task in ids} == ids
    assert (by_task["ok"]["held_by"], by_task["gone"]["held_by"]) == (
        "scheduler-live",
        "scheduler-dead",
    )
    next_fire = datetime.fromisoformat(by_task["ok"]["next_fire"])
    assert timedelta(0) < next_fire - datetime.now(UTC) <= timedelta(seconds=2)
    assert datetime.fromisoformat(by_task["blocked"]["next_fire"]).time().hour == 3
    assert by_task["invalid"]["next_fire"] is None and "61" in by_task["invalid"]["problem"]
    assert by_task["finished"]["next_fire"] is None

    text = CliRunner().invoke(main, ["--database-url", db_url, "schedules"])
    assert text.exit_code == 0, text.output
    header, *lines = text.output.splitlines()
    assert header.split() == ["id", "task", "rule", "next", "fire", "held", "by", "flags"]
    flags = {line.split()[1]: line.split()[-1] for line in lines}
    assert flags == {
        "ok": "ok",
        "gone": "holder-gone",
        "fresh": "ok",
        "finished": "finished",
        "invalid": "invalid",
        "blocked": "blocked",
    }
    shorter_grace = CliRunner().invoke(
        main, ["--database-url", db_url, "schedules", "--json", "--grace", "1"]
    )
    fresh = next(i for i in json.loads(shorter_grace.output) if i["task"] == "fresh")
    assert fresh["flags"] == ["holder-gone"]


def test_schedules_with_none(db_url: str) -> None:
    result = CliRunner().invoke(main, ["--database-url", db_url, "schedules"])
    assert result.exit_code == 0
    assert "(no scheduled jobs)" in result.output


def test_a_hostile_task_name_or_rule_stays_on_its_row(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    """Names and rules come from whoever may call add_scheduled_job (docs/design.md, S3)."""
    add(conn, "evil\n99  ok  * * * * * *\x1b[2J", {"rule": "* * * * * *"})
    add(conn, "odd-rule", {"rule": "61 *\n99  forged  -  -  ok"})
    text = CliRunner().invoke(main, ["--database-url", db_url, "schedules"])
    assert text.exit_code == 0, text.output
    assert "\x1b" not in text.output
    _header, *lines = text.output.splitlines()
    assert len(lines) == 2
    assert {line.split()[1] for line in lines} == {"evil\\n99", "odd-rule"}
