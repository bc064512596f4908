"""The lqjobs command against a real database: migrate, add-job, status, check."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from lqjobs.db import JobsDB
from lqjobs.ops.cli import EXIT_CONFIG, main
from tests.stack import TENANT

pytestmark = pytest.mark.integration


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result


def test_migrate_installs_then_is_a_no_op(empty_db_url: str) -> None:
    first = run("--database-url", empty_db_url, "migrate")
    assert first.exit_code == 0, first.output
    assert "schema app_jobs: installed" in first.output
    before = function_versions(empty_db_url)
    second = run("--database-url", empty_db_url, "migrate")
    assert second.exit_code == 0
    assert "schema app_jobs: up to date" in second.output
    assert function_versions(empty_db_url) == before  # CREATE OR REPLACE would rewrite them


def function_versions(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT proname, xmin::text FROM pg_proc WHERE pronamespace = 'app_jobs'::regnamespace "
            "ORDER BY proname"
        ).fetchall()
    assert len(rows) > 10
    return rows


def test_migrate_leaves_a_foreign_schema_alone(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app_jobs")
    result = run("--database-url", empty_db_url, "migrate")
    assert result.exit_code == 0
    assert "left alone" in result.output
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('app_jobs.jobs')").fetchone() == (None,)


def test_add_job_then_status_shows_it(db_url: str) -> None:
    added = run(
        "--database-url",
        db_url,
        "add-job",
        "send-email",
        "--payload",
        '{"to": "a@example.com"}',
        "--priority",
        "2",
        "--queue",
        "mail",
    )
    assert added.exit_code == 0, added.output
    assert "task=send-email" in added.output
    run("--database-url", db_url, "add-job", "send-email", "--run-at", "2999-01-01T00:00:00+00:00")
    status = run("--database-url", db_url, "status")
    assert status.exit_code == 0
    header, line = status.output.splitlines()[:2]
    assert header.split() == [
        "task",
        "ready",
        "delayed",
        "locked",
        "last-try",
        "failed",
        "oldest",
        "ready",
    ]
    assert line.split()[:6] == ["send-email", "1", "1", "0", "0", "0"]
    as_json = json.loads(run("--database-url", db_url, "status", "--json").output)
    assert as_json[0]["ready"] == 1 and as_json[0]["delayed"] == 1


def test_status_shows_a_hostile_task_name_on_its_one_line(db_url: str) -> None:
    """A task name is anyone's who may call add_job: a newline or a terminal escape in
    it must not add a forged row to the operator's table (docs/design.md, S3)."""
    hostile = "evil\nsend-email  0  0  0  0  -\x1b[2J"
    with psycopg.connect(db_url, autocommit=True) as conn:
        JobsDB().queue.add_job(conn, TENANT, hostile)
    status = run("--database-url", db_url, "status")
    assert status.exit_code == 0 and "\x1b" not in status.output
    _header, line, *rest = status.output.splitlines()
    assert not rest and line.split()[0] == "evil\\nsend-email"
    shown = json.loads(run("--database-url", db_url, "status", "--json").output)
    assert shown[0]["task_identifier"] == hostile


def test_add_job_rejects_bad_json_clearly(db_url: str) -> None:
    result = CliRunner().invoke(
        main, ["--database-url", db_url, "add-job", "t", "--payload", "{nope"]
    )
    assert result.exit_code == 2
    assert "Invalid value" in result.output


def test_check_exit_codes(db_url: str, empty_db_url: str) -> None:
    assert run("--database-url", db_url, "check").exit_code == 0
    missing = run("--database-url", empty_db_url, "check")
    assert missing.exit_code == 1
    assert "not installed" in missing.output
    down = run("--database-url", "postgresql://u:pw-CANARY-1@127.0.0.1:1/x", "check")
    assert down.exit_code == 1
    assert "pw-CANARY-1" not in down.output


def test_a_bad_environment_is_one_line_and_exit_3() -> None:
    result = run("status", env={"PGPORT": "nope", "PGPASSWORD": "pw-CANARY-1"})
    assert result.exit_code == EXIT_CONFIG
    assert result.output.strip() == (
        "lqjobs: invalid PGPORT: Input should be a valid integer, unable to parse string as "
        "an integer"
    )


def test_help_names_the_environment_variables() -> None:
    top = run("--help").output
    assert "DATABASE_URL" in top and "JOBS_SCHEMA" in top
    bridge = run("bridge", "--help").output
    assert "JOBS_SUPPORTED" in bridge and "LQJOBS_BROKER_URL" in bridge


def test_the_console_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lqjobs", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "0.1.0" in done.stdout


def test_doctor_reports_at_a_glance(db_url: str, redis_url: str) -> None:
    env = {"LQJOBS_BROKER_URL": redis_url, "JOBS_SUPPORTED": "mail"}
    run("--database-url", db_url, "add-job", "resize")  # nobody serves it
    healthy = run("--database-url", db_url, "doctor", env=env)
    assert healthy.exit_code == 0, healthy.output
    lines = healthy.output.splitlines()
    assert any(line.startswith("ok") and "timeout ladder" in line for line in lines)
    assert any(line.startswith("ok") and "noeviction" in line for line in lines)
    assert any(line.startswith("warn") and "1 ready jobs of tasks" in line for line in lines)
    assert any(line.startswith("ok") and "0 scheduled jobs, none stuck" in line for line in lines)
    with psycopg.connect(db_url, autocommit=True) as conn:  # a schedule that cannot parse
        conn.execute(
            "SELECT app_jobs.add_scheduled_job('00000000-0000-0000-0000-000000000001'::uuid, "
            "'report', '{}'::json, '{\"rule\": \"not a cron\"}'::json)"
        )
    flagged = run("--database-url", db_url, "doctor", env=env)
    assert flagged.exit_code == 0
    assert "warn  schedules" in flagged.output and "invalid" in flagged.output
    broken = run(
        "--database-url",
        db_url,
        "doctor",
        env=env | {"LQJOBS_VISIBILITY_TIMEOUT": "5", "JOBS_SUPPORTED": ""},
    )
    assert broken.exit_code == 1
    assert "FAIL  timeout ladder" in broken.output
    assert "neither JOBS_SUPPORTED nor JOBS_SUPPORT_ANY" in broken.output


def test_doctor_prints_no_secret_given_as_a_query_parameter(db_url: str, redis_url: str) -> None:
    """redis-py takes ``?password=``, libpq ``?password=`` / ``sslpassword``: doctor
    shows both URLs with every secret-bearing part masked."""
    parts = psycopg.conninfo.conninfo_to_dict(db_url)
    database = (
        f"postgresql://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"
        "?password=pw-CANARY-1"
    )
    env = {"LQJOBS_BROKER_URL": f"{redis_url}?password=pw-CANARY-2", "JOBS_SUPPORTED": "mail"}
    report = run("--database-url", database, "doctor", env=env)
    assert report.exit_code == 0, report.output  # trust auth: the password is not checked
    assert "CANARY" not in report.output
    assert report.output.count("password=***") == 2
