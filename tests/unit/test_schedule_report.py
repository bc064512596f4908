"""The flags of `lqjobs schedules`, judged from one overview row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from lqjobs.models import ScheduledJobStatus
from lqjobs.scheduler.report import report

NOW = datetime(2030, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)


def status(**overrides: Any) -> ScheduledJobStatus:
    values: dict[str, Any] = {
        "id": 7,
        "task_identifier": "report",
        "schedule_info": '{"rule": "*/5 * * * *"}',
        "locked_by": None,
        "locked_at": None,
        "last_scheduled": None,
        "last_scheduled_id": None,
        "last_job_failed_permanently": False,
        "holder_connected": None,
        "held_seconds": None,
    }
    return ScheduledJobStatus(**(values | overrides))


def test_a_healthy_row_has_its_next_fire_time_and_no_flags() -> None:
    item = report(status(), NOW, grace=60)
    assert item.flags == [] and item.problem is None
    assert item.next_fire == datetime(2030, 5, 1, 12, 5, tzinfo=UTC)
    assert item.rule is not None and "*/5 * * * *" in item.rule


def test_next_fire_is_after_the_last_tick_when_that_is_later() -> None:
    item = report(status(last_scheduled=NOW + timedelta(minutes=7)), NOW, grace=60)
    assert item.next_fire == datetime(2030, 5, 1, 12, 10, tzinfo=UTC)


def test_holder_gone_needs_no_connected_holder_and_the_grace_to_pass() -> None:
    held = {"locked_by": "scheduler-x", "locked_at": NOW}
    gone = status(**held, holder_connected=False, held_seconds=61)
    assert report(gone, NOW, grace=60).flags == ["holder-gone"]
    starting = status(**held, holder_connected=False, held_seconds=59)
    assert report(starting, NOW, grace=60).flags == []
    alive = status(**held, holder_connected=True, held_seconds=86_400)
    assert report(alive, NOW, grace=60).flags == []


def test_invalid_finished_and_blocked() -> None:
    invalid = report(status(schedule_info='{"rule": "* * *"}'), NOW, grace=60)
    assert invalid.flags == ["invalid"] and invalid.next_fire is None
    assert invalid.problem is not None and "5 or 6 cron fields" in invalid.problem
    ended = '{"rule": "* * * * *", "end": "2030-05-01T11:00:00Z"}'
    assert report(status(schedule_info=ended), NOW, grace=60).flags == ["finished"]
    blocked = report(status(last_job_failed_permanently=True), NOW, grace=60)
    assert blocked.flags == ["blocked"] and blocked.next_fire is not None
