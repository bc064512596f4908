"""add_job and add_scheduled_job (with and without a key), and the
created_at / updated_at trigger on jobs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

pytestmark = pytest.mark.integration

LATER = datetime(2999, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)


# -- add_job without a key ------------------------------------------------------------


def test_add_job_defaults(q, tenant):
    with q.conn.transaction():
        now = q.value("SELECT now()")
        job = q.add_job("send_email")
    assert job["database_id"] == tenant
    assert job["task_identifier"] == "send_email"
    assert job["payload"] == {}
    assert job["queue_name"] is None  # NULL passed explicitly: not the column's random default
    assert job["run_at"] == now
    assert (job["priority"], job["attempts"], job["max_attempts"]) == (0, 0, 25)
    assert (job["key"], job["last_error"], job["locked_at"], job["locked_by"]) == (None,) * 4
    assert job["created_at"] == job["updated_at"] == now
    assert q.job(job["id"]) == job


def test_add_job_stores_exactly_the_given_values(q):
    other = uuid.uuid4()
    job = q.add_job(
        "t",
        db_id=other,
        payload={"x": [1, 2]},
        queue_name="q",
        run_at=LATER,
        max_attempts=3,
        priority=-2,
    )
    assert (job["database_id"], job["payload"], job["queue_name"], job["run_at"]) == (
        other,
        {"x": [1, 2]},
        "q",
        LATER,
    )
    assert (job["max_attempts"], job["priority"], job["key"]) == (3, -2, None)


def test_add_job_without_key_does_not_replace_null_arguments(q):
    """Without a key the given values go in as they are: NULL payload is an error."""
    with pytest.raises(psycopg.errors.NotNullViolation):
        q.add_job("t", payload=None)
    with pytest.raises(psycopg.errors.NotNullViolation):
        q.add_job("t", run_at=None)


def test_add_job_without_key_always_inserts(q):
    first = q.add_job("t", payload={"n": 1})
    second = q.add_job("t", payload={"n": 1})
    assert first["id"] != second["id"]
    assert q.value("SELECT count(*) FROM app_jobs.jobs") == 2


# -- add_job with a key ------------------------------------------------------------------


def test_add_job_with_new_key_inserts_it(q):
    job = q.add_job("t", job_key="k1", payload={"a": 1})
    assert job["key"] == "k1"
    assert q.job(job["id"])["key"] == "k1"


def test_add_job_with_key_overwrites_a_pending_job_and_resets_its_retries(q):
    job = q.add_job("t", job_key="k1", queue_name="qa", payload={"v": 1})
    q.get_job("worker-1")
    q.one("SELECT * FROM app_jobs.fail_job('worker-1', %s, 'boom')", [job["id"]])
    failed = q.job(job["id"])
    assert (failed["attempts"], failed["last_error"], failed["locked_at"]) == (1, "boom", None)

    again = q.add_job(
        "u",
        job_key="k1",
        queue_name="qb",
        payload={"v": 2},
        run_at=LATER,
        max_attempts=4,
        priority=3,
    )
    assert again["id"] == job["id"]
    assert (again["task_identifier"], again["payload"], again["queue_name"]) == (
        "u",
        {"v": 2},
        "qb",
    )
    assert (again["run_at"], again["max_attempts"], again["priority"]) == (LATER, 4, 3)
    assert (again["attempts"], again["last_error"], again["key"]) == (0, None, "k1")
    assert again["created_at"] == job["created_at"]
    assert q.value("SELECT count(*) FROM app_jobs.jobs") == 1
    assert q.queues() == {"qb": 1}  # moved between queues through the triggers


def test_add_job_with_key_falls_back_to_defaults_for_null_arguments(q):
    with q.conn.transaction():
        now = q.value("SELECT now()")
        fresh = q.add_job(
            "t", job_key="k1", payload=None, run_at=None, max_attempts=None, priority=None
        )
    assert (fresh["payload"], fresh["run_at"], fresh["max_attempts"], fresh["priority"]) == (
        {},
        now,
        25,
        0,
    )

    q.add_job("t", job_key="k2", payload={"a": 1}, run_at=LATER, max_attempts=3, priority=9)
    with q.conn.transaction():
        now = q.value("SELECT now()")
        over = q.add_job(
            "t", job_key="k2", payload=None, run_at=None, max_attempts=None, priority=None
        )
    assert (over["payload"], over["run_at"], over["max_attempts"], over["priority"]) == (
        {},
        now,
        25,
        0,
    )


def test_add_job_with_key_of_a_running_job_retires_it_and_adds_a_keyless_job(q):
    running = q.add_job("t", job_key="k1", payload={"v": 1}, max_attempts=5)
    assert q.get_job("worker-1")["id"] == running["id"]

    fresh = q.add_job(
        "t", job_key="k1", payload={"v": 2}, queue_name="q", max_attempts=7, priority=1
    )
    assert fresh["id"] != running["id"]
    assert fresh["key"] is None  # upstream quirk: the replacement does not carry the key
    assert (fresh["payload"], fresh["queue_name"], fresh["max_attempts"], fresh["priority"]) == (
        {"v": 2},
        "q",
        7,
        1,
    )
    assert fresh["attempts"] == 0 and fresh["locked_by"] is None

    old = q.job(running["id"])
    assert old["key"] is None
    assert old["attempts"] == old["max_attempts"] == 5  # it will not be retried
    assert (old["locked_by"], old["payload"]) == ("worker-1", {"v": 1})  # still running, untouched

    # the key is free again: the next add_job with it inserts a keyed job
    third = q.add_job("t", job_key="k1", payload={"v": 3})
    assert third["key"] == "k1" and third["id"] not in (running["id"], fresh["id"])
    assert q.value("SELECT count(*) FROM app_jobs.jobs") == 3


# -- add_scheduled_job ------------------------------------------------------------------


def test_add_scheduled_job_defaults_and_values(q, tenant):
    plain = q.add_scheduled_job("nightly")
    assert (plain["database_id"], plain["task_identifier"], plain["payload"]) == (
        tenant,
        "nightly",
        {},
    )
    assert (plain["schedule_info"], plain["queue_name"], plain["key"]) == ({}, None, None)
    assert (plain["max_attempts"], plain["priority"]) == (25, 0)
    assert (
        plain["locked_at"],
        plain["locked_by"],
        plain["last_scheduled"],
        plain["last_scheduled_id"],
    ) == (None,) * 4

    rule = {"rule": "*/5 * * * *"}
    given = q.add_scheduled_job(
        "t", payload={"a": 1}, schedule_info=rule, queue_name="q", max_attempts=3, priority=2
    )
    assert (given["payload"], given["schedule_info"], given["queue_name"]) == ({"a": 1}, rule, "q")
    assert (given["max_attempts"], given["priority"]) == (3, 2)
    # a scheduled job is not a job: no queue bookkeeping
    assert q.queues() == {}


def test_add_scheduled_job_with_key_updates_a_free_template(q):
    first = q.add_scheduled_job("t", job_key="s1", payload={"v": 1}, schedule_info={"rule": "a"})
    assert first["key"] == "s1"
    again = q.add_scheduled_job(
        "u",
        job_key="s1",
        payload={"v": 2},
        schedule_info={"rule": "b"},
        queue_name="q",
        max_attempts=4,
        priority=5,
    )
    assert again["id"] == first["id"]
    assert (again["task_identifier"], again["payload"], again["schedule_info"]) == (
        "u",
        {"v": 2},
        {"rule": "b"},
    )
    assert (again["queue_name"], again["max_attempts"], again["priority"], again["key"]) == (
        "q",
        4,
        5,
        "s1",
    )
    nulls = q.add_scheduled_job("u", job_key="s1", payload=None, max_attempts=None, priority=None)
    assert nulls["id"] == first["id"]
    assert (nulls["payload"], nulls["max_attempts"], nulls["priority"], nulls["schedule_info"]) == (
        {},
        25,
        0,
        {},
    )
    assert q.value("SELECT count(*) FROM app_jobs.scheduled_jobs") == 1


def test_add_scheduled_job_with_key_of_a_held_template_replaces_it(q):
    held = q.add_scheduled_job("t", job_key="s1", payload={"v": 1})
    assert q.get_scheduled_job("scheduler-1")["id"] == held["id"]
    fresh = q.add_scheduled_job("t", job_key="s1", payload={"v": 2}, schedule_info={"rule": "x"})
    assert fresh["id"] != held["id"]
    assert fresh["key"] is None  # inserted without the key, as upstream does
    assert (fresh["payload"], fresh["schedule_info"], fresh["locked_by"]) == (
        {"v": 2},
        {"rule": "x"},
        None,
    )
    assert q.scheduled(held["id"]) is None  # the held template was deleted
    assert q.value("SELECT count(*) FROM app_jobs.scheduled_jobs") == 1


# -- created_at / updated_at -------------------------------------------------------------


def test_insert_sets_both_timestamps_to_now(q, tenant):
    with q.conn.transaction():
        now = q.value("SELECT now()")
        row = q.one(
            "INSERT INTO app_jobs.jobs (database_id, task_identifier, created_at, updated_at) "
            "VALUES (%s, 't', '2000-01-01Z', '2000-01-01Z') RETURNING created_at, updated_at",
            [tenant],
        )
    assert row == {"created_at": now, "updated_at": now}


def test_update_keeps_created_at_and_moves_updated_at(q):
    job = q.add_job("t")
    with q.conn.transaction():
        now = q.value("SELECT now()")
        row = q.one(
            "UPDATE app_jobs.jobs SET priority = 1, created_at = '2000-01-01Z', "
            "updated_at = '2000-01-01Z' WHERE id = %s RETURNING created_at, updated_at",
            [job["id"]],
        )
    assert row["created_at"] == job["created_at"]
    assert row["updated_at"] == now > job["updated_at"]


def test_updated_at_moves_by_at_least_a_millisecond(q):
    job = q.add_job("t")
    with q.conn.transaction():  # now() is fixed inside: each update adds 1 ms
        stamps = [
            q.value(
                "UPDATE app_jobs.jobs SET priority = %s WHERE id = %s RETURNING updated_at",
                [n, job["id"]],
            )
            for n in range(3)
        ]
    assert stamps[1] - stamps[0] == stamps[2] - stamps[1] == MILLISECOND

    # an updated_at ahead of the clock still moves forward
    future = datetime(2999, 1, 1, tzinfo=UTC)
    with q.conn.transaction():
        q.execute("SET LOCAL session_replication_role = replica")  # bypass the trigger once
        q.execute("UPDATE app_jobs.jobs SET updated_at = %s WHERE id = %s", [future, job["id"]])
    stamp = q.value(
        "UPDATE app_jobs.jobs SET priority = 9 WHERE id = %s RETURNING updated_at", [job["id"]]
    )
    assert stamp == future + MILLISECOND


def test_get_job_and_fail_job_touch_updated_at(q):
    job = q.add_job("t")
    with q.conn.transaction():
        now = q.value("SELECT now()")
        got = q.get_job("worker-1")
    assert got["updated_at"] == max(now, job["updated_at"] + MILLISECOND)
    assert got["created_at"] == job["created_at"]
