"""The scheduler's timers: one per held scheduled job, and a heap of fire times.

Re-arming a timer gives it a new token; heap entries that carry an older token
are stale and skipped, so a timer never needs to be found inside the heap.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from datetime import datetime

from lqjobs.models import ScheduledJobRow
from lqjobs.scheduler.rules import Schedule, parse_schedule


@dataclass
class Timer:
    scheduled_job_id: int
    task: str
    schedule_info: str
    schedule: Schedule
    next_at: datetime | None = None
    token: int = 0  # heap entries carrying another token are stale

    @classmethod
    def of(cls, row: ScheduledJobRow, now: datetime) -> tuple[Timer, datetime | None]:
        """A timer for ``row`` and its first fire time: after ``now`` and after the
        row's ``last_scheduled`` (a takeover never repeats its predecessor's tick).
        Raises what parsing or computing the schedule raises."""
        schedule = parse_schedule(row.schedule_info)
        first = schedule.next_after(max(now, row.last_scheduled or now))
        return cls(row.id, row.task_identifier, row.schedule_info, schedule), first


class Timers:
    """The armed timers by scheduled job id."""

    def __init__(self) -> None:
        self._timers: dict[int, Timer] = {}
        self._heap: list[tuple[datetime, int, int]] = []  # (fire time, token, id)
        self._tokens = itertools.count(1)

    def get(self, scheduled_job_id: int) -> Timer | None:
        return self._timers.get(scheduled_job_id)

    def ids(self) -> list[int]:
        return list(self._timers)

    def add(self, timer: Timer, at: datetime | None) -> None:
        """Hold ``timer`` (replacing the row's old one) and arm it for ``at``."""
        self._timers[timer.scheduled_job_id] = timer
        self.arm(timer, at)

    def arm(self, timer: Timer, at: datetime | None) -> None:
        """Fire ``timer`` at ``at`` (None: never again); any earlier arming is void."""
        timer.next_at = at
        timer.token = next(self._tokens)
        if at is not None:
            heapq.heappush(self._heap, (at, timer.token, timer.scheduled_job_id))

    def pop(self, scheduled_job_id: int) -> Timer | None:
        return self._timers.pop(scheduled_job_id, None)

    def pop_due(self, now: datetime) -> Timer | None:
        """The next timer due at ``now``, taken off the heap; None when none is due."""
        while self._heap and self._heap[0][0] <= now:
            _, token, sid = heapq.heappop(self._heap)
            timer = self._timers.get(sid)
            if timer is not None and timer.token == token:
                return timer
        return None

    def earliest(self) -> datetime | None:
        """The earliest fire time on the heap (possibly of a stale entry: then early)."""
        return self._heap[0][0] if self._heap else None

    def next_fire_times(self) -> dict[int, datetime | None]:
        return {sid: timer.next_at for sid, timer in self._timers.items()}

    def clear(self) -> None:
        self._timers.clear()
        self._heap.clear()
