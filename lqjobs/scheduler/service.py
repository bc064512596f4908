"""The scheduler: turns ``app_jobs.scheduled_jobs`` into jobs on their schedules.

It claims scheduled jobs with ``get_scheduled_job`` (a lock that never expires),
keeps one timer per claimed row in a heap, and on each due tick calls
``run_scheduled_job``, which inserts the job unless the previous one is still
pending (``ALREADY_SCHEDULED``: a normal outcome). One loop thread does it all.
``NOTIFY "scheduled_jobs:insert"`` wakes it for new rows; every poll it re-reads
the rows it holds (a deleted row stops its timer, a changed ``schedule_info``
re-arms it, a key upsert of a held row shows up as a deleted row plus a new free
one) and claims the rows nobody holds.

The scheduler id is stable (``LQJOBS_SCHEDULER_ID``, default
``scheduler-<HOSTNAME>``): a scheduler that died still holds its rows, and the
next one with the same id releases them when it starts. Two schedulers that run
at the same time must never share an id.

Ticks are not replayed, as node-schedule does not replay them: a timer is armed
at the first fire time after it is claimed (and after the row's
``last_scheduled``, so a takeover never repeats the tick its predecessor ran).
Ticks that fall due while the loop is busy or the database is away collapse into
one late tick; a tick whose ``run_scheduled_job`` is cut off by a lost connection
is not retried.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from lqjobs import db
from lqjobs.db import Connection
from lqjobs.db.scheduled import Scheduled
from lqjobs.errors import ConfigurationError, DatabaseError, DatabaseUnavailable
from lqjobs.listening import ServiceLoop, wake_source
from lqjobs.logs import clean_text, escaped
from lqjobs.models import AlreadyScheduled, ScheduledJobRow
from lqjobs.scheduler.rules import InvalidSchedule
from lqjobs.scheduler.timers import Timer, Timers
from lqjobs.settings import Settings

log = logging.getLogger(__name__)
SCHEDULER_ID = re.compile(r"[A-Za-z0-9._:-]{4,128}")
# A scheduler's sessions carry this application_name, so `lqjobs schedules` can
# tell a holder that is connected from one that is gone.
APPLICATION_NAME_PREFIX = "lqjobs-scheduler:"
REPORT_EVERY = 600.0  # seconds before an unchanged problem of one row is reported again


def scheduler_id(settings: Settings) -> str:
    """This scheduler's stable id: LQJOBS_SCHEDULER_ID, else scheduler-<HOSTNAME>."""
    if settings.scheduler_id is not None:
        value, variable = settings.scheduler_id, "LQJOBS_SCHEDULER_ID"
    else:
        value, variable = f"scheduler-{settings.hostname}", "HOSTNAME"
    if not SCHEDULER_ID.fullmatch(value):
        raise ConfigurationError(
            f"invalid {variable}: a scheduler id is 4 to 128 letters, digits, '.', '_', ':' or '-'"
        )
    return value


def application_name(worker_id: str) -> str:
    return (APPLICATION_NAME_PREFIX + worker_id)[:63]  # Postgres keeps 63 bytes


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _RowLog:
    """Log lines about one scheduled job; an unchanged problem of one row is reported
    once per ``every`` seconds, not on every pass (:meth:`due`)."""

    def __init__(self, worker_id: str, every: float) -> None:
        self.worker_id = worker_id
        self.every = every
        self._last: dict[tuple[str, int], tuple[str, float]] = {}

    def due(self, kind: str, scheduled_job_id: int, problem: str) -> bool:
        now = time.monotonic()
        last = self._last.get((kind, scheduled_job_id))
        if last is not None and last[0] == problem and now - last[1] < self.every:
            return False
        self._last[(kind, scheduled_job_id)] = (problem, now)
        return True

    def log(self, level: int, message: str, sid: int, task: str, action: str, **more: Any) -> None:
        extra = {
            "action": action,
            "scheduled_job_id": sid,
            "task": escaped(task),
            "worker_id": self.worker_id,
        }
        log.log(level, clean_text(message, 500), extra=extra | more)


class Scheduler:
    """Only ``stop()`` may be called from another thread; the rest belongs to the
    thread that runs ``run_forever()`` (or to a test driving ``poll()`` and
    ``run_due()`` itself)."""

    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or scheduler_id(settings)
        self.scheduled = Scheduled(settings.jobs_schema)
        self.task_filter = settings.task_filter()
        # The bridge's E: the SQL's own default (1 h) differs from get_job's (4 h).
        self.job_expiry = timedelta(seconds=settings.job_expiry)
        self.counters: Counter[str] = Counter()
        self.loop = ServiceLoop(
            log,
            [(DatabaseError, "database call failed; retrying")],
            action="scheduler_backoff",
            worker_id=self.worker_id,
        )
        self._timers = Timers()
        self._rows = _RowLog(self.worker_id, REPORT_EVERY)
        self._released_own = False
        self._next_poll = 0.0  # time.monotonic(); 0: poll at once
        self._conn: Connection | None = None
        # A new listener (first start, reconnect) polls at once: it missed what came before.
        self.listener = wake_source(
            None if settings.listens_through_pooler() else self._connect_listener,
            (db.SCHEDULED_INSERT_CHANNEL,),
            self.loop.stopping,
            on_listen=self._poll_now,
        )

    def next_fire_times(self) -> dict[int, datetime | None]:
        """Held scheduled job id -> its next fire time (None: it will not fire again)."""
        return self._timers.next_fire_times()

    # -- one pass -------------------------------------------------------------------

    def poll(self) -> None:
        """Release what an earlier run with this id held (once), claim the free rows,
        then re-read the rows held."""
        if not self._released_own:
            self.release_all()
            self._released_own = True
        self.claim_all()
        self.refresh()  # after the claims: a row it releases is not claimed again at once
        self._next_poll = time.monotonic() + self.settings.poll_seconds()

    def claim_all(self) -> int:
        """Claim free scheduled jobs until none is left; returns how many were claimed.
        Those with an invalid schedule_info are released at the end of the pass, so
        the pass does not claim them again."""
        conn = self._work_connection()
        now = _utcnow()
        claimed, rejected = 0, []
        while not self.loop.stopping.is_set():
            row = self.scheduled.get_scheduled_job(conn, self.worker_id, self.task_filter)
            if row is None:
                break
            claimed += 1
            if not self._adopt(row, now):
                rejected.append(row.id)
        self._release(conn, rejected)
        return claimed

    def refresh(self) -> None:
        """Stop the timers of rows no longer held (deleted, replaced or released by
        someone else) and re-arm the rows whose schedule_info changed."""
        conn = self._work_connection()
        held = self.scheduled.scheduled_jobs_locked_by(conn, self.worker_id)
        rows = {row.id: row for row in held}
        for vanished in [sid for sid in self._timers.ids() if sid not in rows]:
            self._drop(vanished, "no longer held: deleted, replaced or released")
        now = _utcnow()
        self._release(conn, [row.id for row in rows.values() if not self._adopt(row, now)])

    def run_due(self, now: datetime | None = None) -> int:
        """Run every timer due at ``now`` (default: the current time) once; returns
        the number of ticks."""
        now = now or _utcnow()
        ticks = 0
        while not self.loop.stopping.is_set() and (timer := self._timers.pop_due(now)):
            # Re-armed before the tick: a tick lost to a database outage is not retried.
            self._timers.arm(timer, timer.schedule.next_after(now))
            self._tick(timer)
            ticks += 1
        return ticks

    def release_all(self) -> None:
        self.scheduled.release_scheduled_jobs(self._work_connection(), self.worker_id)
        log.info(
            "scheduled jobs released",
            extra={"action": "scheduled_jobs_released", "worker_id": self.worker_id},
        )

    # -- timers -----------------------------------------------------------------------

    def _adopt(self, row: ScheduledJobRow, now: datetime) -> bool:
        """Arm (or keep) the timer of a held row; False when its schedule_info cannot
        be scheduled (the caller releases the row)."""
        current = self._timers.get(row.id)
        if current is not None and current.schedule_info == row.schedule_info:
            return True
        try:
            timer, first = Timer.of(row, now)
        except InvalidSchedule as exc:
            return self._reject(row, str(exc))
        except Exception as exc:  # never let one row stop the others' timers
            return self._reject(row, f"cannot be scheduled ({type(exc).__name__})")
        self._timers.add(timer, first)
        self._log_armed(timer, "schedule_rearmed" if current else "schedule_armed")
        return True

    def _drop(self, scheduled_job_id: int, reason: str | None) -> None:
        timer = self._timers.pop(scheduled_job_id)
        if timer is not None and reason is not None:
            self.counters["dropped"] += 1
            message = f"scheduled job {scheduled_job_id}: timer stopped ({reason})"
            self._rows.log(
                logging.INFO, message, timer.scheduled_job_id, timer.task, "schedule_dropped"
            )

    def _reject(self, row: ScheduledJobRow, problem: str) -> bool:
        self._drop(row.id, None)
        self.counters["invalid"] += 1
        level = logging.WARNING if self._rows.due("invalid", row.id, problem) else logging.DEBUG
        message = f"scheduled job {row.id} has an invalid schedule_info, released: {problem}"
        self._rows.log(level, message, row.id, row.task_identifier, "invalid_schedule")
        return False

    def _release(self, conn: Connection, ids: Sequence[int]) -> None:
        if ids:
            self.scheduled.release_scheduled_jobs(conn, self.worker_id, ids)

    def _log_armed(self, timer: Timer, action: str) -> None:
        sid, at = timer.scheduled_job_id, timer.next_at
        if at is None:
            message = f"scheduled job {sid} will not fire again: held, no timer"
            action = "schedule_finished"
        else:
            message = f"scheduled job {sid} armed: {timer.schedule.describe()}"
        next_fire = at.isoformat() if at else None
        self._rows.log(logging.INFO, message, sid, timer.task, action, next_fire=next_fire)

    # -- ticks ------------------------------------------------------------------------

    def _tick(self, timer: Timer) -> None:
        sid, task = timer.scheduled_job_id, timer.task
        try:
            result = self.scheduled.run_scheduled_job(self._work_connection(), sid, self.job_expiry)
        except DatabaseUnavailable:
            raise
        except DatabaseError as exc:  # e.g. its key is taken by a job whose lock expired
            self.counters["run_failed"] += 1
            level = logging.ERROR if self._rows.due("run", sid, str(exc)) else logging.DEBUG
            message = f"scheduled job {sid} could not queue its job: {exc}"
            self._rows.log(level, message, sid, task, "scheduled_run_failed", sqlstate=exc.sqlstate)
            return
        if isinstance(result, AlreadyScheduled):
            self.counters["already_scheduled"] += 1
            message = f"scheduled job {sid}: previous job still pending, tick skipped"
            self._rows.log(logging.INFO, message, sid, task, "already_scheduled")
        elif result is None:
            self._drop(sid, "the scheduled job is gone")
        else:
            self.counters["jobs"] += 1
            message = f"scheduled job {sid}: job {result.id} queued"
            self._rows.log(logging.INFO, message, sid, task, "scheduled_job_run", job_id=result.id)

    # -- the loop ---------------------------------------------------------------------

    def run_forever(self) -> None:
        log.info(
            "scheduler started", extra={"action": "scheduler_started", "worker_id": self.worker_id}
        )
        self.loop.run(self._cycle, on_failure=self._on_failure)
        self.close()

    def stop(self) -> None:
        """Stop after the tick in progress. Safe from any thread or a signal handler,
        any number of times."""
        self.loop.stop()

    @property
    def failures(self) -> int:
        """Consecutive failed cycles; 0 when healthy."""
        return self.loop.failures

    def _cycle(self) -> None:
        self.listener.open()  # a new listener (first start, reconnect) sets a poll at once
        if time.monotonic() >= self._next_poll:
            self.listener.ping()
            self.poll()
        self.run_due()
        if self.listener.wait(self._seconds_to_next_event()):
            self._poll_now()

    def _poll_now(self) -> None:
        self._next_poll = 0.0

    def _seconds_to_next_event(self) -> float:
        wait = self._next_poll - time.monotonic()
        earliest = self._timers.earliest()
        if earliest is not None:
            wait = min(wait, (earliest - _utcnow()).total_seconds())
        return max(0.0, wait)

    def _on_failure(self, exc: Exception) -> None:
        # Then the back-off. Timers stay armed: the rows stay locked by this id while
        # the database is away.
        self.counters["failures"] += 1
        self._close()

    def close(self) -> None:
        """Release every scheduled job this id holds and close the connections."""
        try:
            self.release_all()
        except DatabaseError as exc:
            failed = {"action": "scheduler_release_failed", "error": type(exc).__name__}
            message = "could not release the scheduled jobs; the next start with this id will"
            log.warning(message, extra=failed | {"worker_id": self.worker_id})
        finally:
            self._close()
            self._timers.clear()
        log.info(
            "scheduler stopped",
            extra={"action": "scheduler_stopped", "worker_id": self.worker_id, **self.counters},
        )

    # -- connections --------------------------------------------------------------------

    def _connect(self) -> Connection:
        return db.connect(
            self.settings.conninfo(),
            autocommit=True,
            application_name=application_name(self.worker_id),
            pool_mode=self.settings.database_pool_mode,
        )

    def _connect_listener(self) -> Connection:
        """On the listen URL: through a transaction pooler, the one session that
        stays this scheduler's, and so the one `lqjobs schedules` can see."""
        return db.connect(
            self.settings.listen_conninfo(),
            autocommit=True,
            application_name=application_name(self.worker_id),
        )

    def _work_connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self.listener.close()
