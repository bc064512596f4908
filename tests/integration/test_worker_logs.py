"""S3 log injection: a task name is chosen by whoever may call ``add_job``, and the
bridge hands it to Celery as the ``shadow`` name that Celery logs and Flower shows.
A name holding a newline, a forged ``[ERROR/MainProcess]`` line and ANSI escapes
must not forge a line in any log, and the worker must log in lqjobs' format, its own
lines carrying ``job_id`` and ``task``. The real processes run: ``lqjobs bridge`` and
``celery -A lqjobs.app worker``, with jobs added through ``add_job``."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from lqjobs.celery import create_app
from lqjobs.db import JobsDB
from lqjobs.lease import TASK_NAME, Lease
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.settings import Settings
from tests import processes
from tests.stack import QUEUE, TENANT, count, flush_broker, make_settings

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]

FORGED = "[2026-01-01 00:00:00,000: ERROR/MainProcess] FORGED"
# Called: its development URL is keyed by the hostile name, so the router can only
# find it if the name reaches it unchanged.
CALLED = f"fine\n{FORGED} by a newline\x1b[31m red\x1b[0m"
# Refused (no URL): lqjobs logs it, with a fake field to forge as well.
REFUSED = f"gone\r\n{FORGED} by CRLF job_id=999\u2028FORGED by U+2028"
OVERSIZED = f"big\n{FORGED} by the bridge"
# A record of lqjobs' format: date, time, level, logger, message, key=value fields.
RECORD = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.-]+: \S"
)
FIELD = re.compile(r' (\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


def add_jobs(db_url: str) -> dict[str, int]:
    jobs_db = JobsDB()
    with psycopg.connect(db_url, autocommit=True) as conn:
        return {
            name: jobs_db.queue.add_job(conn, TENANT, name, payload, max_attempts=1).id
            for name, payload in (
                (CALLED, {"i": 1}),
                (REFUSED, {"i": 2}),
                (OVERSIZED, {"pad": "x" * 600}),
                ("plain", {"i": 3}),
            )
        }


def environment(db_url: str, redis_url: str, functions: FunctionServer) -> dict[str, str]:
    urls = {CALLED: functions.dev_url("called"), "plain": functions.dev_url("plain")}
    return processes.environment(
        db_url,
        redis_url,
        LQJOBS_EXECUTOR="devmap",
        INTERNAL_GATEWAY_DEVELOPMENT_MAP=json.dumps(urls),
        LQJOBS_MAX_PAYLOAD_BYTES="400",
    )


def quiet_worker(
    env: dict[str, str], logs: Path, name: str = "worker", app: str = "lqjobs.app", *options: str
) -> processes.Process:
    """``celery -q -A <app> worker`` at INFO: no banner, so every line is a log line."""
    argv = [sys.executable, "-m", "celery", "-q", "-A", app, "worker", "--pool", "threads"]
    argv += ["--concurrency", "2", "--loglevel", "INFO", "--hostname", f"{name}@%h"]
    argv += ["--without-heartbeat", "--without-mingle", "--without-gossip", *options]
    return processes.Process(name, argv, env, logs)


def lease(job_id: int) -> Lease:
    """A lease no row holds: its delivery is dropped as stale, and logged."""
    return Lease(job_id, "bridge-elsewhere-1", 1, datetime(2026, 1, 1, tzinfo=UTC))


def send(settings: Settings, lease: Lease, shadow: str) -> None:
    """A run_job message with this ``shadow``, as any publisher could send it."""
    with create_app(settings) as app:
        args = lease.message_args(shadow, str(TENANT))
        app.send_task(TASK_NAME, args=args, task_id=lease.task_id(), shadow=shadow)


RAW = f"raw\n{FORGED} in a raw shadow\x1b[2J"
RAW_SHOWN = f"raw\\n{FORGED} in a raw shadow\\x1b[2J"  # as the bridge publishes it


# What Celery writes itself, not through logging: the warning a worker started as
# root prints before logging is set up, and the shutdown notice.
CELERY_WRITES = re.compile(
    r"^\S+ SecurityWarning: You're running the worker with superuser privileges.*?\n"
    r"  _warn_or_raise_security_error\(.*?\n|^worker: Warm shutdown \(MainProcess\)\n",
    re.DOTALL | re.MULTILINE,
)


def log_lines(output: str) -> list[str]:
    return [line for line in CELERY_WRITES.sub("", output).splitlines() if line]


def forged_lines(output: str) -> list[str]:
    """Lines that are neither a record of lqjobs' format nor a record's continuation
    (indented), and any line a forged record could start."""
    lines = log_lines(output)
    return [line for line in lines if not RECORD.match(line) and line[:1] != " "] + [
        line for line in lines if line.startswith(("[", "FORGED"))
    ]


def fields(line: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in FIELD.findall(line):
        found.setdefault(key, []).append(value)
    return found


def assert_one_line_records(output: str) -> None:
    assert not forged_lines(output), "forged:\n" + "\n".join(forged_lines(output))
    assert "\x1b" not in output and "\r" not in output and "\u2028" not in output


def test_a_hostile_task_name_forges_no_line_and_lqjobs_fields_are_logged(
    db_url: str, redis_url: str, functions: FunctionServer, tmp_path: Path
) -> None:
    flush_broker(redis_url)
    ids = add_jobs(db_url)
    env = environment(db_url, redis_url, functions)
    with processes.running(
        quiet_worker(env, tmp_path),
        processes.bridge(env, tmp_path),
    ) as (worker, bridge):
        wait_until(
            lambda: count(db_url, "NOT (locked_by IS NULL AND attempts >= max_attempts)") == 0,
            30,
            "every job to settle",
        )
        wait_until(lambda: "succeeded in" in worker.output(), 10, "the worker's last lines")
    assert {call.job_id for call in functions.calls.all()} == {ids[CALLED], ids["plain"]}
    assert count(db_url) == 2  # the refused and the oversized job, parked

    log = worker.output()
    assert_one_line_records(log)
    assert_one_line_records(bridge.output())
    # Not vacuous: the hostile names did reach both logs, escaped.
    assert "Task fine\\n[2026-01-01 00:00:00,000: ERROR/MainProcess] FORGED" in log
    assert 'task="big\\\\n[2026-01-01' in bridge.output()

    invoked = [line for line in log.splitlines() if "action=function_invoked" in line]
    refused = [line for line in log.splitlines() if "action=invocation_refused" in line]
    assert len(invoked) == 2 and len(refused) == 1
    called = next(fields(line) for line in invoked if f"job_id={ids[CALLED]} " in line)
    assert called["task"] == [f'"fine\\\\n{FORGED} by a newline\\\\x1b[31m red\\\\x1b[0m"']
    assert called["attempt"] == ["1"] and called["status"] == ["200"]
    shown = fields(refused[0])
    assert shown["job_id"] == [str(ids[REFUSED])]  # the name's fake field stays inside it
    assert shown["task"][0].startswith('"gone\\\\r\\\\n[2026-01-01')
    assert "job_id=999" in shown["task"][0]


def test_the_worker_escapes_a_raw_shadow_from_any_publisher(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The worker's own defence, for a message lqjobs' bridge did not publish (an
    older bridge, anything else with the broker's password): its format escapes
    whatever Celery logs."""
    flush_broker(redis_url)
    send(make_settings(db_url, redis_url), lease(424242), RAW)
    env = processes.environment(db_url, redis_url)
    logfile = tmp_path / "worker-file.log"  # --logfile is honoured too
    with processes.running(quiet_worker(env, tmp_path, "worker", "lqjobs.app", "-f", str(logfile))):
        wait_until(
            lambda: logfile.exists() and "stale delivery dropped" in logfile.read_text(),
            20,
            "the delivery",
        )
    log = logfile.read_text()
    assert_one_line_records(log)
    assert "Task raw\\n[2026-01-01 00:00:00,000: ERROR/MainProcess] FORGED" in log
    stale = next(line for line in log.splitlines() if "action=stale_dropped" in line)
    assert fields(stale)["job_id"] == ["424242"]


def test_the_host_s_logging_is_left_alone_unless_it_opts_in(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """``register`` on a host app changes no logging; ``install_log_format("lqjobs")``
    gives lqjobs' own loggers lqjobs' format and leaves Celery's lines in the host's.
    The task name is escaped as the bridge publishes it."""
    flush_broker(redis_url)
    settings = make_settings(db_url, redis_url)
    env = processes.environment(db_url, redis_url)
    outputs = {}
    for opt_in in ("", "1"):
        send(settings, lease(515151), RAW_SHOWN)
        name = f"host-{opt_in or 'default'}"
        # register() adds lqjobs' queue, which a host's worker consumes when told to.
        host = quiet_worker(env | {"HOST_OPTS_IN": opt_in}, tmp_path, name, HOST_APP, "-Q", QUEUE)
        with processes.running(host):
            wait_until(lambda p=host: "stale delivery dropped" in p.output(), 20, name)
        outputs[opt_in] = host.output()
    for output in outputs.values():
        assert "\x1b" not in output
        assert all(HOST_LINE.match(line) or RECORD.match(line) for line in log_lines(output))
        received = [line for line in output.splitlines() if "Task raw" in line]
        assert received and all(HOST_LINE.match(line) for line in received)
    default = next(line for line in outputs[""].splitlines() if "stale delivery" in line)
    assert HOST_LINE.match(default) and "job_id=" not in default
    opted = next(line for line in outputs["1"].splitlines() if "stale delivery" in line)
    assert RECORD.match(opted) and fields(opted)["job_id"] == ["515151"]


HOST_APP = "tests.integration.host_app"
HOST_LINE = re.compile(r"HOST (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.-]+ \| \S")
