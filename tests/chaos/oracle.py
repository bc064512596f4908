"""The oracle: what happened to every job of a scenario, from the database and the
function server's call log (defined in docs/chaos.md and docs/design.md, section 4).

- completed: the row is gone and the function answered 2xx at least once;
- lost: gone without any 2xx call (a premature delete), or still runnable, or
  parked although the scenario expected it to complete;
- duplicated: 2xx calls beyond the first, summed over jobs;
- overlapping: jobs with two calls running at the same time;
- stranded: rows of ``jobs`` and ``job_queues`` still locked at quiescence;
- attempts burned: attempts beyond the genuine failures the scenario injected.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import psycopg

from lqjobs.ops.function_calls import CallRecord


@dataclass
class Tally:
    jobs: int = 0
    completed: int = 0
    parked: int = 0  # failed permanently, as the scenario meant them to be
    lost: int = 0
    duplicated: int = 0
    overlapping: int = 0
    stranded: int = 0
    attempts_burned: int = 0
    lost_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class JobState:
    attempts: int
    max_attempts: int
    locked: bool
    runnable: bool  # unlocked, attempts left and run_at in the past
    last_error: str | None


def job_states(db_url: str, job_ids: Iterable[int]) -> dict[int, JobState]:
    return snapshot(db_url, job_ids)[0]


def snapshot(db_url: str, job_ids: Iterable[int]) -> tuple[dict[int, JobState], int]:
    """The jobs' states and the number of locked queues, over one connection."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, attempts, max_attempts, locked_by IS NOT NULL, "
            "locked_by IS NULL AND attempts < max_attempts AND run_at <= now(), last_error "
            "FROM app_jobs.jobs WHERE id = ANY(%s)",
            [list(job_ids)],
        ).fetchall()
        queues = conn.execute(
            "SELECT count(*) FROM app_jobs.job_queues WHERE locked_by IS NOT NULL"
        ).fetchone()
    return {row[0]: JobState(*row[1:]) for row in rows}, int(queues[0]) if queues else 0


def wait_quiescent(
    db_url: str, job_ids: list[int], timeout: float, stall: float = 15.0
) -> float | None:
    """The ``time.monotonic()`` at which quiescence came, or None: not within
    ``timeout``, or no job settled for ``stall`` seconds (a stranded job waiting for
    its lease to expire must be seen stranded, not rescued by the expiry)."""
    started = progress_at = time.monotonic()
    remaining = len(job_ids) + 1
    while (now := time.monotonic()) - started < timeout and now - progress_at < stall:
        states, queues = snapshot(db_url, job_ids)
        busy = sum(s.locked or s.attempts < s.max_attempts for s in states.values())
        if busy == 0 and queues == 0:
            return now
        if busy < remaining:
            remaining, progress_at = busy, now
        time.sleep(0.2)
    return None


def judge(
    db_url: str,
    job_ids: list[int],
    calls: list[CallRecord],
    *,
    genuine_failures: Mapping[int, int] | None = None,
    expect_parked: Iterable[int] = (),
) -> Tally:
    genuine = genuine_failures or {}
    parked_ok = set(expect_parked)
    states, queues = snapshot(db_url, job_ids)
    by_job: dict[int, list[CallRecord]] = defaultdict(list)
    for call in calls:
        if call.job_id is not None:
            by_job[call.job_id].append(call)
    tally = Tally(jobs=len(job_ids), stranded=queues)
    for job_id in job_ids:
        job_calls = by_job.get(job_id, [])
        ok_calls = [c for c in job_calls if 200 <= c.status < 300]
        tally.duplicated += max(0, len(ok_calls) - 1)
        tally.overlapping += _overlaps(job_calls)
        state = states.get(job_id)
        if state is None:
            if ok_calls:
                tally.completed += 1
            else:
                _lose(tally, job_id)
            attempts = max((c.attempt or 0 for c in job_calls), default=0)
            tally.attempts_burned += max(0, attempts - 1 - genuine.get(job_id, 0))
            continue
        tally.stranded += state.locked
        if state.attempts >= state.max_attempts and job_id in parked_ok:
            tally.parked += 1
        elif not state.locked:
            _lose(tally, job_id)
        if job_id not in parked_ok:
            tally.attempts_burned += max(0, state.attempts - 1 - genuine.get(job_id, 0))
    return tally


def _lose(tally: Tally, job_id: int) -> None:
    tally.lost += 1
    if len(tally.lost_ids) < 20:
        tally.lost_ids.append(job_id)


def _overlaps(calls: list[CallRecord]) -> int:
    """1 if two calls of one job ran at the same time, else 0. A hang (status 0) is
    left out: its caller gave up at the HTTP timeout and the job moved on."""
    latest_end = float("-inf")
    for started, ended in sorted((c.started, c.ended) for c in calls if c.status):
        if started < latest_end:
            return 1
        latest_end = max(latest_end, ended)
    return 0
