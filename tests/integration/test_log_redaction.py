"""S4 log redaction at DEBUG: the real processes (bridge, Celery worker, callback
service, scheduler), each logging at DEBUG and connected as its least-privilege
login, run sync, async, failing, oversized and scheduled jobs with canary secrets
everywhere a secret lives:

- ``pw-CANARY-1``: the database password (URL, conninfo and PGPASSWORD forms);
- ``CANARY-2``: the callback signing key (LQJOBS_CALLBACK_KEYS);
- ``CANARY-3``: job and scheduled-job payloads;
- ``CANARY-4``: the Redis password (requirepass on a private Redis);
- ``CANARY-5``: a forged callback's query string and body.

No captured log line of any component may contain ``CANARY``, a callback token or
its query string. Positive controls show the grep is not vacuous: the canaries did
reach the function server, the logs are DEBUG logs, and the secrets were in use.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit
from uuid import UUID

import httpx
import psycopg
import pytest
import redis

from lqjobs.db import JobsDB
from lqjobs.ops.embedded import EmbeddedRedis, free_port, wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests import processes
from tests.least_privilege import Logins, granted_logins
from tests.stack import count

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]
TENANT = UUID("11111111-2222-3333-4444-555555555555")
DB_PASSWORD = "pw-CANARY-1"
CALLBACK_KEYS = "k1:CANARY-2-" + "s" * 40
PAYLOAD_SECRET = "CANARY-3"
REDIS_PASSWORD = "redis-CANARY-4"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of its own that requires ``REDIS_PASSWORD``; its URL carries it."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        client = redis.Redis(port=server.port)
        client.config_set("requirepass", REDIS_PASSWORD)
        client.close()
        yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


@pytest.fixture
def logins(db_url: str) -> Iterator[Logins]:
    with granted_logins(db_url, password=DB_PASSWORD) as granted:
        yield granted


def as_url(conninfo: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    return (
        f"postgresql://{params['user']}:{quote(str(params['password']))}@{params['host']}:"
        f"{params['port']}/{params['dbname']}"
    )


def environments(
    logins: Logins, broker_url: str, functions: FunctionServer, callback_port: int
) -> dict[str, dict[str, str]]:
    common = {
        "LQJOBS_LOG_LEVEL": "DEBUG",
        "LQJOBS_CALLBACK_KEYS": CALLBACK_KEYS,
        "LQJOBS_CALLBACK_DEADLINE": "3",
        "LQJOBS_EXECUTOR": "openfaas",
        "LQJOBS_TASK_EXECUTORS": json.dumps({"async-fn": "openfaas-async"}),
        "INTERNAL_GATEWAY_URL": functions.url,
        "INTERNAL_JOBS_CALLBACK_URL": f"http://127.0.0.1:{callback_port}/callback",
        "LQJOBS_MAX_PAYLOAD_BYTES": "400",
    }
    env = {
        # Three spellings of the password: URL, libpq conninfo, PG* variables.
        "bridge": processes.environment(as_url(logins.urls["bridge"]), broker_url, **common),
        "worker": processes.environment(as_url(logins.urls["worker"]), broker_url, **common),
        "callback": processes.environment(logins.urls["callback"], broker_url, **common),
    }
    params = psycopg.conninfo.conninfo_to_dict(logins.urls["scheduler"])
    scheduler = processes.environment("", broker_url, **common)
    del scheduler["DATABASE_URL"]
    scheduler |= {
        "PGHOST": str(params["host"]),
        "PGPORT": str(params["port"]),
        "PGUSER": str(params["user"]),
        "PGPASSWORD": str(params["password"]),
        "PGDATABASE": str(params["dbname"]),
    }
    env["scheduler"] = scheduler
    return env


def add_jobs(db_url: str) -> set[int]:
    """The jobs that must end up parked (failed permanently); the rest complete."""
    secret = {"secret": PAYLOAD_SECRET}
    jobs_db = JobsDB()
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(3):
            jobs_db.queue.add_job(conn, TENANT, "sync-fn", {**secret, "i": i})
            jobs_db.queue.add_job(conn, TENANT, "async-fn", {**secret, "i": i})
        parked = {
            jobs_db.queue.add_job(
                conn, TENANT, "sync-fn", {**secret, "error": "boom"}, max_attempts=1
            ).id,
            jobs_db.queue.add_job(conn, TENANT, "sync-fn", {**secret, "status": 400}).id,
            jobs_db.queue.add_job(conn, TENANT, "sync-fn", {**secret, "pad": "x" * 500}).id,
            jobs_db.queue.add_job(
                conn, TENANT, "async-fn", {**secret, "error": "async boom"}, max_attempts=1
            ).id,
            jobs_db.queue.add_job(
                conn, TENANT, "async-fn", {**secret, "drop_callback": True}, max_attempts=1
            ).id,
        }
        jobs_db.scheduled.add_scheduled_job(
            conn, TENANT, "tick-fn", secret, {"rule": "* * * * * *"}
        )
    return parked


def forge_callback(callback_port: int) -> int:
    """A callback with a bad token and a canary in its query string and body."""
    url = f"http://127.0.0.1:{callback_port}/callback?token=v1.k1.CANARY-5.CANARY-5&x=CANARY-5"
    reply = httpx.post(url, content=b'{"status": "CANARY-5"}', timeout=5)
    return reply.status_code


def test_no_component_logs_a_secret_at_debug(
    db_url: str, private_redis: str, logins: Logins, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    callback_port = free_port()
    with FunctionServer() as functions:
        env = environments(logins, private_redis, functions, callback_port)
        parked = add_jobs(db_url)
        with processes.running(
            processes.callback(env["callback"], logs, callback_port),
            processes.worker(env["worker"], logs, "worker", 4, loglevel="DEBUG"),
            processes.bridge(env["bridge"], logs),
            processes.scheduler(env["scheduler"], logs),
        ) as running:
            unsettled = (
                "task_identifier <> 'tick-fn' AND NOT (locked_by IS NULL AND attempts >= "
                "max_attempts)"
            )
            wait_until(lambda: count(db_url, unsettled) == 0, 60, "every job to settle")
            wait_until(
                lambda: any(call.task == "tick-fn" for call in functions.calls.all()),
                20,
                "the scheduled job to fire and run",
            )
            assert forge_callback(callback_port) == 401
            with psycopg.connect(db_url, autocommit=True) as conn:
                users = {
                    row[0]
                    for row in conn.execute("SELECT usename FROM pg_stat_activity").fetchall()
                }
                parked_now = {
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM app_jobs.jobs WHERE task_identifier <> 'tick-fn'"
                    ).fetchall()
                }
            for process in running:
                assert process.proc.poll() is None, f"{process.name} died:\n{process.output()}"
        outputs = {process.name: process.output() for process in running}

    # Positive controls: the secrets were in use and the canaries really travelled.
    assert set(logins.users.values()) <= users  # every component used its password
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=urlsplit(private_redis).port).ping()
    assert parked_now == parked  # async callbacks were verified with the CANARY-2 key
    calls = functions.calls.all()
    assert sum(PAYLOAD_SECRET.encode() in call.body for call in calls) >= 10
    callback_urls = [
        call.headers["x-callback-url"] for call in calls if call.route == "openfaas-async"
    ]
    tokens = [parse_qs(urlsplit(url).query)["token"][0] for url in callback_urls]
    assert len(tokens) >= 5 and all(token.startswith("v1.k1.") for token in tokens)
    for name, output in outputs.items():
        assert output.strip(), f"{name} logged nothing"
        if name != "scheduler":  # it has no DEBUG line of its own to show
            assert re.search(r"\bDEBUG\b", output), f"{name} did not log at DEBUG"

    # The assertion: no secret, no token, no query string in any component's log.
    assert_no_secrets(outputs, tokens)


def assert_no_secrets(outputs: dict[str, str], tokens: list[str] = []) -> None:  # noqa: B006
    leaks = {
        name: sorted(
            {line for line in output.splitlines() if "CANARY" in line or "token=" in line}
            | {line for line in output.splitlines() for token in tokens if token in line}
        )
        for name, output in outputs.items()
    }
    assert not any(leaks.values()), "secrets in logs:\n" + json.dumps(leaks, indent=1)


def test_no_secret_in_logs_while_postgres_and_redis_are_unreachable(tmp_path: Path) -> None:
    """The error paths: connection failures, back-offs, ``check`` and ``doctor``."""
    port = free_port()  # nothing listens there
    env = processes.environment(
        f"postgresql://jobs:{DB_PASSWORD}@127.0.0.1:{port}/jobs",
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0",
        LQJOBS_LOG_LEVEL="DEBUG",
        LQJOBS_CALLBACK_KEYS=CALLBACK_KEYS,
    )
    with processes.running(
        processes.bridge(env, tmp_path),
        processes.scheduler(env, tmp_path),
        processes.callback(env, tmp_path, free_port()),
        processes.worker(env, tmp_path, "worker", 2, loglevel="DEBUG"),
    ) as running:
        outage = re.compile(r"Cannot connect|_backoff|cannot reach redis")
        wait_until(
            lambda: all(outage.search(p.output()) for p in running),
            30,
            "every component to report the outage",
        )
    outputs = {process.name: process.output() for process in running}
    for command in (["check"], ["doctor"]):
        done = subprocess.run(
            [sys.executable, "-m", "lqjobs", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1
        outputs[command[0]] = done.stdout + done.stderr
    assert "***" in outputs["doctor"]  # it does show the (redacted) URLs
    assert_no_secrets(outputs)
