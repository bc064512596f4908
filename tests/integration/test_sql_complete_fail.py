"""complete_job(s), fail_job, release_jobs, reschedule_jobs, permanently_fail_jobs."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

pytestmark = pytest.mark.integration

MICROSECOND = timedelta(microseconds=1)


def _locked(q, worker: str = "worker-1", **kwargs) -> dict:
    job = q.add_job("t", **kwargs)
    got = q.get_job(worker)
    assert got is not None and got["id"] == job["id"]
    return got


def _fail(q, worker: str, job_id: int, message: str | None) -> tuple[dict, object]:
    """fail_job in its own transaction; also returns that transaction's now()."""
    with q.conn.transaction():
        now = q.value("SELECT now()")
        row = q.one("SELECT * FROM app_jobs.fail_job(%s, %s, %s::text)", [worker, job_id, message])
    return row, now


# -- fail_job -----------------------------------------------------------------------


def test_fail_job_backs_off_exponentially_from_now(q):
    for attempts in (1, 2, 5, 10, 11, 24):
        job = _locked(q)
        q.execute("UPDATE app_jobs.jobs SET attempts = %s WHERE id = %s", [attempts, job["id"]])
        row, now = _fail(q, "worker-1", job["id"], "boom")
        expected = now + timedelta(seconds=math.exp(min(attempts, 10)))
        assert abs(row["run_at"] - expected) <= MICROSECOND, attempts
        assert (row["last_error"], row["locked_by"], row["locked_at"]) == ("boom", None, None)
        assert row["attempts"] == attempts  # fail_job does not count; get_job did
        assert q.job(job["id"])["run_at"] == row["run_at"]


def test_fail_job_backs_off_from_a_run_at_still_in_the_future(q):
    job = _locked(q)
    q.execute(
        "UPDATE app_jobs.jobs SET run_at = now() + interval '1 day' WHERE id = %s", [job["id"]]
    )
    future = q.job(job["id"])["run_at"]
    row, _ = _fail(q, "worker-1", job["id"], "boom")
    assert abs(row["run_at"] - (future + timedelta(seconds=math.e))) <= MICROSECOND


def test_fail_job_only_acts_for_the_lock_holder(q):
    job = _locked(q, queue_name="serial")
    before = q.job(job["id"])
    row, _ = _fail(q, "worker-2", job["id"], "not mine")
    assert all(value is None for value in row.values())
    assert q.job(job["id"]) == before
    assert q.queue("serial")["locked_by"] == "worker-1"


def test_fail_job_is_strict_a_null_message_does_nothing(q):
    job = _locked(q)
    before = q.job(job["id"])
    row, _ = _fail(q, "worker-1", job["id"], None)
    assert all(value is None for value in row.values())
    assert q.job(job["id"]) == before  # still locked: only job_expiry frees it now
    for args in (["worker-1", None, "m"], [None, job["id"], "m"]):
        row = q.one("SELECT * FROM app_jobs.fail_job(%s, %s::bigint, %s)", args)
        assert row["id"] is None
    assert q.job(job["id"]) == before


def test_fail_job_keeps_a_job_that_has_no_attempts_left(q):
    job = _locked(q, max_attempts=1)
    row, _ = _fail(q, "worker-1", job["id"], "final")
    assert (row["attempts"], row["max_attempts"], row["last_error"]) == (1, 1, "final")
    stored = q.job(job["id"])
    assert stored is not None and stored["locked_by"] is None
    q.execute("UPDATE app_jobs.jobs SET run_at = now() - interval '1 day'")
    assert q.get_job("worker-1") is None  # parked for good


def test_fail_job_of_a_missing_job_returns_the_null_row(q):
    row, _ = _fail(q, "worker-1", 424242, "gone")
    assert row["id"] is None


# -- complete_job ---------------------------------------------------------------------


def test_complete_job_deletes_and_returns_the_row(q, tenant):
    job = _locked(q, payload={"a": 1})
    row = q.one("SELECT * FROM app_jobs.complete_job('worker-1', %s)", [job["id"]])
    assert (row["id"], row["payload"], row["database_id"], row["locked_by"]) == (
        job["id"],
        {"a": 1},
        tenant,
        "worker-1",
    )
    assert q.job(job["id"]) is None


def test_complete_job_does_not_check_the_lock_holder(q):
    locked = _locked(q)
    unlocked = q.add_job("t")
    for job in (locked, unlocked):
        row = q.one("SELECT * FROM app_jobs.complete_job('someone-else', %s)", [job["id"]])
        assert row["id"] == job["id"]
        assert q.job(job["id"]) is None


def test_complete_job_of_a_missing_job_returns_the_null_row(q):
    row = q.one("SELECT * FROM app_jobs.complete_job('worker-1', 424242)")
    assert all(value is None for value in row.values())


# -- bulk administration: complete_jobs / reschedule_jobs / permanently_fail_jobs -------


def _admin_set(q) -> dict[str, int]:
    """Four jobs: unlocked, locked just now, locked 3h59 ago, locked 4h01 ago."""
    ids = {
        "unlocked": q.add_job("t")["id"],
        "fresh": q.add_job("t")["id"],
        "young": q.add_job("t")["id"],
        "stale": q.add_job("t")["id"],
    }
    for name in ("fresh", "young", "stale"):
        q.execute(
            "UPDATE app_jobs.jobs SET locked_by = 'worker-1', locked_at = now() WHERE id = %s",
            [ids[name]],
        )
    q.age_lock(ids["young"], "3 hours 59 minutes")
    q.age_lock(ids["stale"], "4 hours 1 minute")
    ids["untouched"] = q.add_job("t")["id"]  # not in the list
    return ids


def test_complete_jobs_deletes_only_unlocked_or_stale_jobs(q):
    ids = _admin_set(q)
    listed = [ids[n] for n in ("unlocked", "fresh", "young", "stale")] + [999999]
    rows = q.rows("SELECT * FROM app_jobs.complete_jobs(%s)", [listed])
    assert sorted(row["id"] for row in rows) == sorted([ids["unlocked"], ids["stale"]])
    left = {row["id"] for row in q.rows("SELECT id FROM app_jobs.jobs")}
    assert left == {ids["fresh"], ids["young"], ids["untouched"]}


def test_reschedule_jobs_coalesces_and_skips_held_jobs(q):
    ids = _admin_set(q)
    listed = [ids[n] for n in ("unlocked", "fresh", "young", "stale")]
    before = {row["id"]: row for row in q.rows("SELECT * FROM app_jobs.jobs")}
    rows = q.rows(
        "SELECT * FROM app_jobs.reschedule_jobs(%s, run_at => '2999-01-01Z', priority => 7, "
        "attempts => 3, max_attempts => 9)",
        [listed],
    )
    assert sorted(row["id"] for row in rows) == sorted([ids["unlocked"], ids["stale"]])
    for row in rows:
        assert (row["run_at"].year, row["priority"], row["attempts"], row["max_attempts"]) == (
            2999,
            7,
            3,
            9,
        )
    for name in ("fresh", "young", "untouched"):
        assert q.job(ids[name]) == before[ids[name]]

    # NULL arguments keep the current values
    rows = q.rows("SELECT * FROM app_jobs.reschedule_jobs(%s, priority => 1)", [[ids["unlocked"]]])
    assert len(rows) == 1
    assert (
        rows[0]["run_at"].year,
        rows[0]["priority"],
        rows[0]["attempts"],
        rows[0]["max_attempts"],
    ) == (
        2999,
        1,
        3,
        9,
    )


def test_permanently_fail_jobs(q):
    ids = _admin_set(q)
    listed = [ids[n] for n in ("unlocked", "fresh", "young", "stale")]
    before = {row["id"]: row for row in q.rows("SELECT * FROM app_jobs.jobs")}
    rows = q.rows("SELECT * FROM app_jobs.permanently_fail_jobs(%s)", [listed])
    assert sorted(row["id"] for row in rows) == sorted([ids["unlocked"], ids["stale"]])
    for row in rows:
        assert row["last_error"] == "Manually marked as failed"
        assert row["attempts"] == row["max_attempts"] == 25
    for name in ("fresh", "young", "untouched"):
        assert q.job(ids[name]) == before[ids[name]]
    # parked: not handed out any more (the stale one would otherwise be taken over)
    assert q.get_job("worker-2", expiry="4 hours")["id"] == ids["untouched"]
    assert q.get_job("worker-2", expiry="4 hours") is None

    other = q.add_job("t", max_attempts=4)
    rows = q.rows(
        "SELECT * FROM app_jobs.permanently_fail_jobs(%s, 'no longer wanted')", [[other["id"]]]
    )
    assert (rows[0]["last_error"], rows[0]["attempts"]) == ("no longer wanted", 4)


# -- release_jobs ------------------------------------------------------------------------


def test_release_jobs_unlocks_and_gives_the_attempt_back(q):
    first = _locked(q)
    second = _locked(q)
    theirs = _locked(q, worker="worker-2")
    q.execute("UPDATE app_jobs.jobs SET attempts = 0 WHERE id = %s", [second["id"]])
    q.execute("UPDATE app_jobs.jobs SET attempts = 6 WHERE id = %s", [first["id"]])
    assert q.value("SELECT pg_typeof(app_jobs.release_jobs('worker-1'))::text") == "void"

    one, two, other = (q.job(job["id"]) for job in (first, second, theirs))
    assert (one["attempts"], one["locked_by"], one["locked_at"]) == (5, None, None)
    assert (two["attempts"], two["locked_by"], two["locked_at"]) == (0, None, None)  # not below 0
    assert (other["attempts"], other["locked_by"]) == (1, "worker-2")
    assert q.get_job("worker-3")["id"] == first["id"]
