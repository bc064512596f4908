"""What ``lqjobs schedules`` shows: every scheduled job, when it fires next, who
holds it, and the reasons it may never fire again.

Flags:

* ``invalid``: its schedule_info cannot be scheduled (``problem`` says why);
  schedulers release it and report it.
* ``finished``: no fire time after now (past ``end``, or nothing matches).
* ``blocked``: its last job used up its attempts and still exists, so every tick
  ends in ALREADY_SCHEDULED until someone deletes (or reschedules) that job.
* ``holder-gone``: locked by a scheduler id that no connected session announces
  and held for more than the grace period. An lqjobs scheduler's sessions carry
  ``application_name = lqjobs-scheduler:<id>``; a lock without one is stranded
  (locks of scheduled jobs never expire) until a scheduler with that id starts
  again, or until ``SELECT app_jobs.release_scheduled_jobs('<id>')``. A Node
  scheduler does not announce itself, so its rows carry this flag too.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from lqjobs.logs import escaped
from lqjobs.models import ScheduledJobStatus
from lqjobs.scheduler.rules import InvalidSchedule, parse_schedule

INVALID = "invalid"
FINISHED = "finished"
BLOCKED = "blocked"
HOLDER_GONE = "holder-gone"
DEFAULT_GRACE = 60.0  # seconds a lock may lack a connected holder (a reconnect, a restart)


class ScheduleReport(BaseModel):
    id: int
    task: str
    rule: str | None
    next_fire: datetime | None
    held_by: str | None
    locked_at: datetime | None
    last_scheduled: datetime | None
    last_scheduled_id: int | None
    flags: list[str]
    problem: str | None

    def row(self) -> tuple[str, ...]:
        """The table row: id, task, rule, next fire, held by, flags."""
        return (
            str(self.id),
            escaped(self.task),  # names and rules come from add_scheduled_job callers
            escaped(self.rule or f"({self.problem})"),
            self.next_fire.isoformat(timespec="seconds") if self.next_fire else "-",
            self.held_by or "-",
            ",".join(self.flags) or "ok",
        )


HEADER = ("id", "task", "rule", "next fire", "held by", "flags")


def report(status: ScheduledJobStatus, now: datetime, grace: float) -> ScheduleReport:
    flags: list[str] = []
    rule = next_fire = problem = None
    try:
        schedule = parse_schedule(status.schedule_info)
        rule = schedule.describe()
        next_fire = schedule.next_after(max(now, status.last_scheduled or now))
        if next_fire is None:
            flags.append(FINISHED)
    except InvalidSchedule as exc:
        flags.append(INVALID)
        problem = str(exc)
    if status.last_job_failed_permanently:
        flags.append(BLOCKED)
    if status.holder_connected is False and (status.held_seconds or 0.0) > grace:
        flags.append(HOLDER_GONE)
    return ScheduleReport(
        id=status.id,
        task=status.task_identifier,
        rule=rule,
        next_fire=next_fire,
        held_by=status.locked_by,
        locked_at=status.locked_at,
        last_scheduled=status.last_scheduled,
        last_scheduled_id=status.last_scheduled_id,
        flags=flags,
        problem=problem,
    )


def reports(
    statuses: Sequence[ScheduledJobStatus], now: datetime, grace: float = DEFAULT_GRACE
) -> list[ScheduleReport]:
    return [report(status, now, grace) for status in statuses]


def as_json(items: Sequence[ScheduleReport]) -> list[dict[str, Any]]:
    return [item.model_dump(mode="json") for item in items]
