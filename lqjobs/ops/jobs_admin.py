"""What ``lqjobs jobs`` does: pick jobs, judge each against an action, act on those
that qualify in one transaction, and say what changed.

An action is planned first (read, nothing locked), shown, confirmed, then carried
out: the rows are locked, read again and judged again under the lock, so a job that
moved on since it was shown (a bridge took it, a worker settled it) is left alone
and reported, never acted on from a stale picture. Named ids that do not exist or
do not qualify stop the whole command before anything changes.

Task names, keys, holders and ``last_error`` are anyone's who may call ``add_job``:
they are shown escaped, on one line each (docs/design.md, S3).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from lqjobs.db import Connection, JobsDB
from lqjobs.db.admin import JobFilter, Judgement
from lqjobs.errors import LqJobsError
from lqjobs.lease import Lease
from lqjobs.logs import escaped
from lqjobs.models import JobView
from lqjobs.ops.cli_common import format_age, table
from lqjobs.settings import Settings

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
ERROR_CHARS = 60  # of last_error in a table row
SHOWN_IN_PROMPT = 20  # jobs listed before a confirmation


def parse_age(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``6h``, ``7d``, ``2w``; ValueError otherwise."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"not an age: {text!r} (examples: 90s, 15m, 6h, 7d)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def judgement(settings: Settings) -> Judgement:
    """How a lock is judged under ``settings``: stranded past the lock expiry, or past
    the settle window (the longest a live delivery may still start, run and record
    its call, or wait for its callback) when its bridge has no session connected."""
    from lqjobs.bridge.loop import APPLICATION_NAME_PREFIX, WORKER_ID_PATTERN

    settle = max(
        settings.start_window_seconds() + settings.call_bound_seconds(),
        settings.callback_deadline_seconds(),
    )
    return Judgement(
        job_expiry=timedelta(seconds=settings.job_expiry),
        settle_window=timedelta(seconds=min(settle, settings.job_expiry)),
        holder_prefix=APPLICATION_NAME_PREFIX,
        holder_pattern=WORKER_ID_PATTERN,
    )


def id_list(ids: Sequence[int]) -> str:
    """``1-3, 7``: ids as ranges."""
    parts: list[str] = []
    ordered = sorted(set(ids))
    start = prev = ordered[0] if ordered else 0
    for job_id in [*ordered[1:], None]:
        if job_id is not None and job_id == prev + 1:
            prev = job_id
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if job_id is not None:
            start = prev = job_id
    return ", ".join(parts) if ordered else "-"


def jobs_word(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


# -- showing jobs ------------------------------------------------------------------


def _time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.isoformat(timespec="seconds")


def _text(value: str | None, limit: int = 200) -> str:
    return "-" if value is None else escaped(value, limit)


def list_lines(views: Sequence[JobView]) -> list[str]:
    header = ("id", "task", "state", "attempts", "run_at", "locked_by", "last_error")
    rows = [
        (
            str(v.id),
            _text(v.task_identifier, 60),
            v.state,
            f"{v.attempts}/{v.max_attempts}",
            _time(v.run_at),
            _text(v.locked_by, 60),
            _text(v.last_error, ERROR_CHARS),
        )
        for v in views
    ]
    return table([header, *rows])


def state_detail(view: JobView, judged: Judgement) -> str:
    """The state and, for a lock, what it was judged by."""
    if view.state == "stranded":
        if (view.lease_age_seconds or 0) >= judged.job_expiry.total_seconds():
            return "stranded: locked longer than LQJOBS_JOB_EXPIRY"
        return "stranded: its bridge has no session connected and no call is running"
    if view.state == "locked":
        return "locked: a call is running" if view.call_running else "locked"
    if view.state == "failed":
        return "failed: attempts used up; never picked again until retried"
    return view.state


def show_lines(view: JobView, judged: Judgement) -> list[str]:
    fields = [
        ("task", _text(view.task_identifier)),
        ("state", state_detail(view, judged)),
        ("database_id", str(view.database_id)),
        ("queue", _text(view.queue_name)),
        ("key", _text(view.key)),
        ("priority", str(view.priority)),
        ("attempts", f"{view.attempts} of {view.max_attempts}"),
        ("run_at", _time(view.run_at)),
        ("last_error", _text(view.last_error, 4096)),
        ("locked_by", _text(view.locked_by)),
        ("locked_at", _time(view.locked_at)),
    ]
    if view.locked_at is not None:
        fields += [
            ("lease_age", format_age(view.lease_age_seconds)),
            ("holder", "connected" if view.holder_connected else "no session connected"),
            ("call", "running (a worker holds the job)" if view.call_running else "none running"),
        ]
    fields += [("created_at", _time(view.created_at)), ("updated_at", _time(view.updated_at))]
    if view.payload is not None:
        fields.append(("payload", escaped(view.payload, 1_000_000)))
    width = max(len(name) for name, _ in fields)
    return [f"job {view.id}"] + [f"  {name.ljust(width)}  {value}" for name, value in fields]


def view_json(view: JobView) -> dict[str, Any]:
    data = view.model_dump(mode="json", exclude={"payload"})
    if view.payload is not None:
        data["payload"] = json.loads(view.payload)
    return data


# -- actions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One admin action: which jobs it takes and what it does to them."""

    verb: str  # "retry"
    done: str  # "retried"
    refuses: Callable[[JobView], str | None]  # why a job does not qualify; None: it does
    apply: Callable[[Connection, JobsDB, Sequence[JobView]], list[int]]  # the ids changed


def _retry_refuses(view: JobView) -> str | None:
    if view.locked_at is not None:
        return f"{view.state}: a worker holds it (unlock or cancel it instead)"
    if view.state != "failed" and view.last_error is None:
        return f"{view.state}: it has not failed"
    return None


def _retry(conn: Connection, jobs_db: JobsDB, views: Sequence[JobView]) -> list[int]:
    changed = jobs_db.admin.retry(conn, [v.id for v in views])
    if changed:
        jobs_db.admin.wake(conn)  # no NOTIFY announces a rescheduled job
    return changed


def _discard_refuses(view: JobView) -> str | None:
    return None if view.state == "failed" else f"{view.state}, not failed (cancel removes it)"


def _remove(conn: Connection, jobs_db: JobsDB, views: Sequence[JobView]) -> list[int]:
    return jobs_db.admin.remove(conn, [v.id for v in views])


def _lease(view: JobView) -> Lease:
    assert view.locked_by is not None and view.locked_at is not None
    return Lease(view.id, view.locked_by, view.attempts, view.locked_at)


CANCEL_MESSAGE = "cancelled by an operator (lqjobs jobs cancel)"


def _cancel(park: bool) -> Callable[[Connection, JobsDB, Sequence[JobView]], list[int]]:
    def apply(conn: Connection, jobs_db: JobsDB, views: Sequence[JobView]) -> list[int]:
        pending = [v.id for v in views if v.locked_at is None]
        admin = jobs_db.admin
        changed = admin.park(conn, pending, CANCEL_MESSAGE) if park else admin.remove(conn, pending)
        for view in (v for v in views if v.locked_at is not None):
            # Held: no admin function touches it; written under its lease, as its
            # worker would, so that worker's own fenced outcome finds the lease gone.
            lease = _lease(view)
            if park:
                settled = jobs_db.fence.fenced_fail_permanently(conn, lease, CANCEL_MESSAGE)
            else:
                settled = jobs_db.fence.fenced_complete(conn, lease)
            if settled:
                changed.append(view.id)
        return sorted(changed)

    return apply


def _cancel_refuses(park: bool) -> Callable[[JobView], str | None]:
    def refuses(view: JobView) -> str | None:
        return "failed already" if park and view.state == "failed" else None

    return refuses


def _unlock_refuses(view: JobView) -> str | None:
    if view.state != "stranded":
        return f"{view.state}, not stranded"
    if view.call_running:
        return "stranded, but a call is running: cancel it, or wait for the call"
    return None


UNLOCK_MESSAGE = "lock released by an operator (lqjobs jobs unlock): {why}; attempt given back"


def _unlock(judged: Judgement) -> Callable[[Connection, JobsDB, Sequence[JobView]], list[int]]:
    def apply(conn: Connection, jobs_db: JobsDB, views: Sequence[JobView]) -> list[int]:
        changed = []
        for view in views:
            why = state_detail(view, judged).removeprefix("stranded: ")
            message = UNLOCK_MESSAGE.format(why=why)
            if jobs_db.fence.fenced_give_back(conn, _lease(view), message):
                changed.append(view.id)
        return changed

    return apply


def retry() -> Action:
    return Action("retry", "retried", _retry_refuses, _retry)


def discard() -> Action:
    return Action("discard", "discarded", _discard_refuses, _remove)


def cancel(park: bool) -> Action:
    return Action("cancel", "cancelled", _cancel_refuses(park), _cancel(park))


def unlock(judged: Judgement) -> Action:
    return Action("unlock", "unlocked", _unlock_refuses, _unlock(judged))


def purge() -> Action:
    return Action("purge", "purged", _discard_refuses, _remove)


# -- planning and carrying out -----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    action: Action
    jobs: list[JobView]

    @property
    def ids(self) -> list[int]:
        return [v.id for v in self.jobs]


@dataclass(frozen=True)
class Outcome:
    changed: list[int]
    left: list[int] = field(default_factory=list)  # moved on since planned: not touched
    locked: list[int] = field(default_factory=list)  # of the changed, locked when acted on


def plan_named(
    conn: Connection, jobs_db: JobsDB, action: Action, ids: Sequence[int], judged: Judgement
) -> Plan:
    """The jobs ``ids`` name; LqJobsError, before anything changes, when one does not
    exist or does not qualify."""
    views = jobs_db.admin.jobs(conn, JobFilter(ids=ids), judged)
    found = {v.id for v in views}
    problems = [f"job {job_id}: no such job" for job_id in ids if job_id not in found]
    for view in views:
        reason = action.refuses(view)
        if reason is not None:
            problems.append(f"job {view.id}: {reason}")
    if problems:
        raise LqJobsError(f"cannot {action.verb}: " + "; ".join(problems) + "; nothing changed")
    return Plan(action, views)


def plan_matching(
    conn: Connection, jobs_db: JobsDB, action: Action, where: JobFilter, judged: Judgement
) -> Plan:
    """The jobs ``where`` selects that qualify."""
    views = jobs_db.admin.jobs(conn, where, judged)
    return Plan(action, [v for v in views if action.refuses(v) is None])


def carry_out(conn: Connection, jobs_db: JobsDB, plan: Plan, judged: Judgement) -> Outcome:
    """In one transaction: lock the planned rows, judge them again, act on those that
    still qualify. ``conn`` is in autocommit."""
    if not plan.jobs:
        return Outcome([])
    with conn.transaction():
        jobs_db.admin.lock(conn, plan.ids)
        now = jobs_db.admin.jobs(conn, JobFilter(ids=plan.ids), judged)
        still = [v for v in now if plan.action.refuses(v) is None]
        changed = plan.action.apply(conn, jobs_db, still)
    locked = [v.id for v in still if v.locked_at is not None and v.id in changed]
    return Outcome(changed, sorted(set(plan.ids) - set(changed)), locked)


def outcome_lines(plan: Plan, outcome: Outcome) -> list[str]:
    action = plan.action
    if not outcome.changed and not outcome.left:
        return [f"no jobs to {action.verb}"]
    lines = []
    if outcome.changed:
        line = f"{action.done} {jobs_word(len(outcome.changed))}: {id_list(outcome.changed)}"
        if action.verb == "cancel" and outcome.locked:
            line += (
                f" (locked when cancelled: {id_list(outcome.locked)}; a worker's outcome for it "
                "will be dropped, and it will not run again)"
            )
        lines.append(line)
    if outcome.left:
        lines.append(
            f"left alone {jobs_word(len(outcome.left))} that changed since listed: "
            f"{id_list(outcome.left)}"
        )
    return lines
