"""``lqjobs jobs`` through the real CLI against a real database, and ``cancel`` of a
running job against a real bridge, Celery worker and HTTP function."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from lqjobs.bridge.loop import application_name
from lqjobs.celery import create_app
from lqjobs.db import JobsDB
from lqjobs.db.fence import ADVISORY_NAMESPACE
from lqjobs.lease import TASK_NAME
from lqjobs.ops.cli import EXIT_FAILURE, main
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests.stack import TENANT, bridge, flush_broker, make_settings, worker

pytestmark = pytest.mark.integration

QUEUE = JobsDB().queue
GONE = "bridge-gone-host-0123456789ab"  # an lqjobs bridge id no session announces
ALIVE = "bridge-live-host-ba9876543210"
NODE = "worker-0"  # the Node runtime's default worker id: it announces nothing
OTHER_TENANT = "99999999-8888-7777-6666-555555555555"


def jobs(db_url: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, ["--database-url", db_url, "jobs", *args], input=input)


def add(conn: psycopg.Connection[Any], task: str, payload: Any = None, **kwargs: Any) -> int:
    return QUEUE.add_job(conn, TENANT, task, {} if payload is None else payload, **kwargs).id


def take(conn: psycopg.Connection[Any], job_id: int, worker_id: str) -> None:
    """get_job as ``worker_id``; ``job_id`` must be the one it locks."""
    task = conn.execute(
        "SELECT task_identifier FROM app_jobs.jobs WHERE id = %s", [job_id]
    ).fetchone()
    assert task is not None
    job = QUEUE.get_job(conn, worker_id, [task[0]])
    assert job is not None and job.id == job_id


def failed(conn: psycopg.Connection[Any], task: str, **kwargs: Any) -> int:
    """A job parked after its only attempt failed."""
    job_id = add(conn, task, max_attempts=1, **kwargs)
    take(conn, job_id, NODE)
    assert QUEUE.fail_job(conn, NODE, job_id, "boom\nline two") is not None
    return job_id


def age(conn: psycopg.Connection[Any], job_id: int, column: str, seconds: float) -> None:
    """Move ``column`` (locked_at, created_at, updated_at) ``seconds`` into the past,
    around the trigger that keeps created_at and updated_at (needs a superuser)."""
    assert column in {"locked_at", "created_at", "updated_at"}
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            f"UPDATE app_jobs.jobs SET {column} = now() - make_interval(secs => %s) WHERE id = %s",
            [seconds, job_id],
        )


def row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    cur = conn.execute(
        "SELECT attempts, max_attempts, locked_by, last_error, run_at <= now() AS due "
        "FROM app_jobs.jobs WHERE id = %s",
        [job_id],
    )
    found = cur.fetchone()
    if found is None:
        return None
    assert cur.description is not None
    return dict(zip([c.name for c in cur.description], found, strict=True))


def listed(db_url: str, *args: str) -> dict[int, str]:
    result = jobs(db_url, "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return {item["id"]: item["state"] for item in json.loads(result.output)}


def shown_fields(shown: Result) -> dict[str, str]:
    """``jobs show``'s ``name  value`` lines (after ``job <id>``) as a dict."""
    assert shown.exit_code == 0, shown.output
    return dict(line.split(None, 1) for line in shown.output.splitlines()[1:])


@pytest.fixture
def holder(db_url: str) -> Iterator[None]:
    """A session announcing ALIVE as a bridge does."""
    with psycopg.connect(db_url, application_name=application_name(ALIVE)):
        yield


def test_list_judges_every_state(db_url: str, conn: psycopg.Connection[Any], holder: None) -> None:
    ready = add(conn, "a")
    delayed = add(conn, "a", run_at=datetime.now(UTC) + timedelta(hours=1))
    parked = failed(conn, "b")
    backing_off = add(conn, "c")
    take(conn, backing_off, NODE)
    QUEUE.fail_job(conn, NODE, backing_off, "try later")
    node_lock, live_lock, gone_lock, gone_young, expired = (add(conn, f"l{i}") for i in range(5))
    for job_id, worker_id in [
        (node_lock, NODE),
        (live_lock, ALIVE),
        (gone_lock, GONE),
        (gone_young, GONE),
        (expired, NODE),
    ]:
        take(conn, job_id, worker_id)
    # Past the settle window (361 s with the default ladder) but within the expiry (600 s).
    for job_id in (node_lock, live_lock, gone_lock):
        age(conn, job_id, "locked_at", 400)
    age(conn, expired, "locked_at", 601)

    assert listed(db_url) == {
        ready: "ready",
        delayed: "delayed",
        parked: "failed",
        backing_off: "delayed",
        node_lock: "locked",  # a Node worker announces nothing: judged by the expiry only
        live_lock: "locked",  # its bridge is connected
        gone_lock: "stranded",  # its bridge is gone, no call runs, past the settle window
        gone_young: "locked",  # gone, but a live delivery could still settle it
        expired: "stranded",
    }
    assert listed(db_url, "--state", "stranded") == {gone_lock: "stranded", expired: "stranded"}
    assert set(listed(db_url, "--task", "a")) == {ready, delayed}
    assert listed(db_url, "--database-id", OTHER_TENANT) == {}
    assert len(listed(db_url, "--database-id", str(TENANT))) == 9
    age(conn, ready, "created_at", 3600)
    assert listed(db_url, "--older-than", "59m") == {ready: "ready"}
    assert listed(db_url, "--older-than", "2h") == {}

    table = jobs(db_url, "list", "--state", "failed")
    assert table.exit_code == 0, table.output
    header, line, *rest = table.output.splitlines()
    assert header.split()[:4] == ["id", "task", "state", "attempts"] and not rest
    assert line.split()[:4] == [str(parked), "b", "failed", "1/1"]
    assert "boom\\nline two" in line  # last_error on its one line
    limited = jobs(db_url, "list", "--limit", "2")
    assert len(limited.output.splitlines()) == 4 and "raise --limit" in limited.output
    bad = jobs(db_url, "list", "--older-than", "soon")
    assert bad.exit_code == 2 and "not an age" in bad.output


def test_a_call_running_keeps_a_gone_holders_lock_locked(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    job_id = add(conn, "t")
    take(conn, job_id, GONE)
    age(conn, job_id, "locked_at", 400)
    assert listed(db_url) == {job_id: "stranded"}
    with psycopg.connect(db_url, autocommit=True) as calling:  # a worker's session mid-call
        calling.execute("SELECT pg_advisory_lock(%s, %s)", [ADVISORY_NAMESPACE, job_id])
        assert listed(db_url) == {job_id: "locked"}
        shown = jobs(db_url, "show", str(job_id))
        assert "running" in shown.output and "no session connected" in shown.output


def test_show_names_attempts_error_and_holder_and_the_payload_only_when_asked(
    db_url: str, conn: psycopg.Connection[Any], holder: None
) -> None:
    hostile = "evil\nstate  ready\x1b[2J"
    job_id = add(conn, hostile, {"secret": "CANARY-3"}, queue_name="q\u2028x")
    take(conn, job_id, ALIVE)
    shown = jobs(db_url, "show", str(job_id))
    assert shown.exit_code == 0, shown.output
    assert "CANARY-3" not in shown.output and "\x1b" not in shown.output
    fields = shown_fields(shown)
    assert fields["task"] == "evil\\nstate  ready\\x1b[2J"
    assert fields["queue"] == "q\\u2028x"
    assert fields["attempts"] == "1 of 25"
    assert fields["locked_by"] == ALIVE and fields["holder"] == "connected"
    assert fields["call"] == "none running" and fields["state"] == "locked"
    with_payload = jobs(db_url, "show", str(job_id), "--payload")
    assert '"secret": "CANARY-3"' in with_payload.output
    as_json = json.loads(jobs(db_url, "show", str(job_id), "--json", "--payload").output)
    assert as_json["payload"] == {"secret": "CANARY-3"} and as_json["state"] == "locked"
    assert as_json["task_identifier"] == hostile
    assert "payload" not in json.loads(jobs(db_url, "show", str(job_id), "--json").output)

    table = jobs(db_url, "list")
    assert "\x1b" not in table.output and "\u2028" not in table.output
    assert len(table.output.splitlines()) == 2  # the header and the job's one line
    missing = jobs(db_url, "show", "424242")
    assert missing.exit_code == EXIT_FAILURE and "no such job: 424242" in missing.output


def test_retry_makes_failed_jobs_runnable_now_with_every_attempt(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    parked = failed(conn, "t")
    ready = add(conn, "t")
    refused = jobs(db_url, "retry", str(parked), str(ready), "999")
    assert refused.exit_code == EXIT_FAILURE
    assert f"job {ready}: ready: it has not failed" in refused.output
    assert "job 999: no such job" in refused.output and "nothing changed" in refused.output
    assert row(conn, parked) == {
        "attempts": 1,
        "max_attempts": 1,
        "locked_by": None,
        "last_error": "boom\nline two",
        "due": False,
    }
    with psycopg.connect(db_url, autocommit=True) as bridge_session:
        bridge_session.execute('LISTEN "lqjobs:wake"')
        done = jobs(db_url, "retry", str(parked))
        assert done.exit_code == 0, done.output
        assert done.output.strip() == f"retried 1 job: {parked}"
        woken = list(bridge_session.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in woken] == ["lqjobs:wake"]  # no NOTIFY announces a reschedule
    assert row(conn, parked) == {
        "attempts": 0,
        "max_attempts": 1,
        "locked_by": None,
        "last_error": "boom\nline two",
        "due": True,
    }
    taken = [QUEUE.get_job(conn, NODE, ["t"]) for _ in range(3)]
    assert {job.id for job in taken if job is not None} == {ready, parked}  # runnable again


def test_retry_all_failed_asks_first_and_dry_run_changes_nothing(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    parked = [failed(conn, "a"), failed(conn, "b")]
    dry = jobs(db_url, "retry", "--all-failed", "--dry-run")
    assert dry.exit_code == 0 and "would retry 2 jobs" in dry.output
    declined = jobs(db_url, "retry", "--all-failed", input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert listed(db_url) == dict.fromkeys(parked, "failed")
    by_task = jobs(db_url, "retry", "--task", "a", input="y\n")
    assert by_task.exit_code == 0 and f"retried 1 job: {parked[0]}" in by_task.output
    assert listed(db_url) == {parked[0]: "ready", parked[1]: "failed"}
    every = jobs(db_url, "retry", "--all-failed", "--yes")
    assert every.output.strip() == f"retried 1 job: {parked[1]}"
    assert jobs(db_url, "retry", "--all-failed", "--yes").output.strip() == "no jobs to retry"
    both = jobs(db_url, "retry", "1", "--all-failed")
    assert both.exit_code == 2 and "not both" in both.output


def test_discard_deletes_failed_jobs_only(db_url: str, conn: psycopg.Connection[Any]) -> None:
    parked = failed(conn, "t", queue_name="serial")
    ready = add(conn, "t", queue_name="serial")
    refused = jobs(db_url, "discard", str(ready), "--yes")
    assert refused.exit_code == EXIT_FAILURE and "not failed (cancel removes it)" in refused.output
    assert jobs(db_url, "discard", str(parked), input="n\n").exit_code == 1
    assert row(conn, parked) is not None
    done = jobs(db_url, "discard", str(parked), input="y\n")
    assert done.exit_code == 0 and f"discarded 1 job: {parked}" in done.output
    assert row(conn, parked) is None and row(conn, ready) is not None
    count = conn.execute("SELECT job_count FROM app_jobs.job_queues WHERE queue_name = 'serial'")
    assert count.fetchone() == (1,)  # the queue's bookkeeping followed (complete_jobs' trigger)


def test_purge_deletes_jobs_failed_longer_ago(db_url: str, conn: psycopg.Connection[Any]) -> None:
    old, recent = failed(conn, "t"), failed(conn, "t")
    age(conn, old, "updated_at", 8 * 86400)
    age(conn, recent, "created_at", 30 * 86400)  # queued long ago, failed just now: kept
    pending = add(conn, "t")
    age(conn, pending, "updated_at", 8 * 86400)
    assert jobs(db_url, "purge", "--older-than", "7d").exit_code == 2  # --failed is required
    dry = jobs(db_url, "purge", "--failed", "--older-than", "7d", "--dry-run")
    assert f"would purge 1 job ({old})" in dry.output and row(conn, old) is not None
    done = jobs(db_url, "purge", "--failed", "--older-than", "7d", "--yes")
    assert done.exit_code == 0 and done.output.strip() == f"purged 1 job: {old}"
    assert row(conn, old) is None and row(conn, recent) is not None and row(conn, pending)


def test_unlock_gives_a_stranded_lease_back_and_refuses_a_live_one(
    db_url: str, conn: psycopg.Connection[Any], holder: None
) -> None:
    stranded, live = add(conn, "s"), add(conn, "l")
    take(conn, stranded, NODE)
    take(conn, live, ALIVE)
    age(conn, stranded, "locked_at", 601)
    refused = jobs(db_url, "unlock", str(live))
    assert refused.exit_code == EXIT_FAILURE and "locked, not stranded" in refused.output
    assert row(conn, live)["locked_by"] == ALIVE  # type: ignore[index]
    with psycopg.connect(db_url, autocommit=True) as calling:
        calling.execute("SELECT pg_advisory_lock(%s, %s)", [ADVISORY_NAMESPACE, stranded])
        busy = jobs(db_url, "unlock", str(stranded))
        assert busy.exit_code == EXIT_FAILURE and "a call is running" in busy.output
    done = jobs(db_url, "unlock", str(stranded))
    assert done.exit_code == 0 and done.output.strip() == f"unlocked 1 job: {stranded}"
    after = row(conn, stranded)
    assert after is not None and after["locked_by"] is None and after["due"]
    assert after["attempts"] == 0  # the attempt that never ended is given back
    assert (
        "lqjobs jobs unlock" in after["last_error"] and "LQJOBS_JOB_EXPIRY" in after["last_error"]
    )
    job = QUEUE.get_job(conn, NODE, ["s"])
    assert job is not None and job.id == stranded


def test_unlock_all_stranded(db_url: str, conn: psycopg.Connection[Any]) -> None:
    gone = add(conn, "t")
    take(conn, gone, GONE)
    age(conn, gone, "locked_at", 400)
    young = add(conn, "u")
    take(conn, young, GONE)
    declined = jobs(db_url, "unlock", "--all-stranded", input="n\n")
    assert declined.exit_code == 1 and row(conn, gone)["locked_by"] == GONE  # type: ignore[index]
    done = jobs(db_url, "unlock", "--all-stranded", "--yes")
    assert done.output.strip() == f"unlocked 1 job: {gone}"
    assert row(conn, young)["locked_by"] == GONE  # type: ignore[index]


def test_cancel_removes_or_parks_pending_jobs(db_url: str, conn: psycopg.Connection[Any]) -> None:
    ready = add(conn, "t", queue_name="serial")
    delayed = add(conn, "t", run_at=datetime.now(UTC) + timedelta(hours=1))
    parked_later = add(conn, "p")
    other = add(conn, "keep")
    assert jobs(db_url, "cancel", str(ready), input="n\n").exit_code == 1
    assert row(conn, ready) is not None
    done = jobs(db_url, "cancel", "--task", "t", "--yes")
    assert done.exit_code == 0 and done.output.strip() == f"cancelled 2 jobs: {ready}-{delayed}"
    assert row(conn, ready) is None and row(conn, delayed) is None
    assert conn.execute("SELECT count(*) FROM app_jobs.job_queues").fetchone() == (0,)
    parked = jobs(db_url, "cancel", str(parked_later), "--park", "--yes")
    assert parked.exit_code == 0, parked.output
    assert row(conn, parked_later) == {
        "attempts": 25,
        "max_attempts": 25,
        "locked_by": None,
        "last_error": "cancelled by an operator (lqjobs jobs cancel)",
        "due": True,
    }
    assert listed(db_url) == {parked_later: "failed", other: "ready"}
    missing = jobs(db_url, "cancel", "31337", "--yes")
    assert missing.exit_code == EXIT_FAILURE and "job 31337: no such job" in missing.output


# -- cancel of a running job, with a real bridge, worker and function ---------------


def _run_gated_job(
    db_url: str, redis_url: str, functions: FunctionServer, *, cancel: bool
) -> tuple[int, Any]:
    """A job whose call waits at a gate and then fails (so that, unless cancelled, the
    SQL retries it after e^1 s); cancelled (or not) while its call runs. Returns the
    job id and the worker's result counts once a sentinel job due after that retry
    has been completed."""
    settings = make_settings(
        db_url, redis_url, executor="knative", knative_ingress_url=functions.url
    )
    flush_broker(redis_url)
    app = create_app(settings)
    with psycopg.connect(db_url, autocommit=True) as conn, worker(app), bridge(settings, app):
        job_id = add(conn, "gated", {"gate": "release", "fail_times": 1})
        wait_until(lambda: functions.calls_in_progress() == 1, 30, "the call to start")
        shown = shown_fields(jobs(db_url, "show", str(job_id)))
        assert shown["state"] == "locked: a call is running", shown
        assert shown["holder"] == "connected"  # the bridge announces its worker id
        if cancel:
            done = jobs(db_url, "cancel", str(job_id), "--yes")
            assert done.exit_code == 0, done.output
            assert f"cancelled 1 job: {job_id} (locked when cancelled: {job_id};" in done.output
            assert row(conn, job_id) is None
        functions.open_gate("release")
        functions.calls.wait_for_calls(1, timeout=30, job_id=job_id)
        # Due after the retry would be (the call fails now; e^1 = 2.7 s of back-off).
        due = datetime.now(UTC) + timedelta(seconds=5)
        sentinel = add(conn, "sentinel", run_at=due)
        runner = app.tasks[TASK_NAME].runners.get()
        completed = 1 if cancel else 2  # the sentinel, and without the cancel the retry
        wait_until(lambda: runner.results["completed"] == completed, 60, "the sentinel")
        assert row(conn, sentinel) is None and row(conn, job_id) is None
        results = runner.results.copy()
    return job_id, results


def test_cancel_of_a_running_job_drops_its_outcome_and_it_never_runs_again(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    job_id, results = _run_gated_job(db_url, redis_url, functions, cancel=True)
    calls = functions.calls.calls_for(job_id)
    assert len(calls) == 1 and calls[0].status == 500  # it ran once, and failed
    assert results["stale"] == 1  # its fenced outcome found no lease: dropped
    assert results["failed"] == 0 and results["completed"] == 1  # the sentinel alone


def test_without_the_cancel_the_same_job_is_retried_and_completes(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    """Negative control: the same run, no cancel: the failure is recorded, the job is
    called again after its back-off, and that call completes it."""
    job_id, results = _run_gated_job(db_url, redis_url, functions, cancel=False)
    calls = functions.calls.calls_for(job_id)
    assert [call.status for call in calls] == [500, 200]
    assert results["failed"] == 1 and results["stale"] == 0
