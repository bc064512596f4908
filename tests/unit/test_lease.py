from __future__ import annotations

from datetime import UTC, datetime, timedelta

from lqjobs.lease import Lease

AT = datetime(2026, 5, 6, 7, 8, 9, 123456, UTC)


def test_task_id_differs_for_every_lease_of_a_job() -> None:
    first = Lease(7, "bridge-a-1", 1, AT)
    assert first.task_id() == Lease(7, "bridge-b-2", 1, AT).task_id()  # same job, attempt, time
    assert first.task_id() != Lease(7, "bridge-a-1", 2, AT).task_id()
    # release_jobs makes attempts repeat; the lock time still tells the leases apart
    assert first.task_id() != Lease(7, "bridge-a-1", 1, AT + timedelta(microseconds=1)).task_id()
    assert first.task_id().startswith("job-7-1-")


def test_locked_at_us_is_exact() -> None:
    assert Lease(1, "w-1234", 1, AT).locked_at_us == int(AT.timestamp()) * 1_000_000 + 123456


def test_message_args_round_trip() -> None:
    lease = Lease(7, "bridge-a-1", 1, AT)
    job_id, worker, attempts, locked_at, task, tenant = lease.message_args("send-email", "t-1")
    assert Lease(job_id, worker, attempts, datetime.fromisoformat(locked_at)) == lease  # type: ignore[arg-type]
    assert (task, tenant) == ("send-email", "t-1")
    assert lease.describe("t-1") == "job_id=7 attempt=1 database_id=t-1"


def test_the_compact_form_round_trips_the_lease_exactly() -> None:
    lease = Lease(7, "bridge-a-1", 3, AT)
    assert lease.encode() == f"7|bridge-a-1|3|{lease.locked_at_us}"
    assert Lease.decode(lease.encode()) == lease
    assert Lease.decode(lease.encode().encode()) == lease
    assert Lease.decode("not|a|lease") is None
    assert Lease.decode("1|w|x|2") is None


def test_message_args_decode_with_from_message() -> None:
    lease = Lease(7, "bridge-a-1", 1, AT)
    job_id, worker, attempts, locked_at, _, _ = lease.message_args("send-email", "t-1")
    assert Lease.from_message(job_id, worker, attempts, locked_at) == lease  # type: ignore[arg-type]
