"""Runs one lqjobs component as a real process, with the chaos suite's hooks.

    python -m tests.chaos.agent bridge|worker|callback|scheduler [options...]

Without ``CHAOS_*`` variables it is exactly ``lqjobs <role>`` (or ``celery -A lqjobs.app
worker``). With them it first installs, in this process only:

``CHAOS_FAULT=<point>:<probability>``
    the process SIGKILLs itself at a fault point, drawn from a RNG seeded with
    ``CHAOS_SEED``, ``CHAOS_COMPONENT`` and ``CHAOS_INCARNATION`` (so a run can be
    replayed). Points:
    ``bridge.before_publish`` (jobs locked, nothing published, no commit) and
    ``bridge.after_publish`` (published, not committed).
``CHAOS_SABOTAGE=<protection>[,<protection>...]``
    switches protections off, for negative controls only; see ``SABOTAGE``.
``CHAOS_SKIP_LADDER=1``
    accepts a timeout ladder that lqjobs would refuse (a deliberate misconfiguration).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import random
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from psycopg.rows import dict_row

Patch = Callable[[], None]


def replace(owner: Any, name: str, replacement: Callable[..., Any]) -> None:
    """Set ``owner.name`` to ``replacement``, refusing one whose parameters differ from
    the original's: a patch that no longer fits the code it replaces would crash the
    process instead of switching the protection off, and a negative control could then
    "fail" for the wrong reason."""
    original = getattr(owner, name)
    want, got = _parameters(original), _parameters(replacement)
    if want != got:
        raise TypeError(f"chaos patch for {name} takes {got}, the original takes {want}")
    setattr(owner, name, replacement)


def _parameters(function: Callable[..., Any]) -> str:
    """``(self, conn, lease, *, release_advisory)``: names and kinds, no annotations."""
    signature = inspect.signature(function)
    return str(
        signature.replace(
            parameters=[
                p.replace(annotation=p.empty, default=p.empty)
                for p in signature.parameters.values()
            ],
            return_annotation=signature.empty,
        )
    )


def _die_maybe(rng: random.Random, probability: float) -> None:
    if rng.random() < probability:
        os.kill(os.getpid(), signal.SIGKILL)


def install_fault(spec: str, seed: str) -> None:
    from lqjobs.bridge.publisher import CeleryPublisher

    point, _, probability = spec.partition(":")
    # each component draws its own sequence: two bridges must not die in lockstep
    component = os.environ.get("CHAOS_COMPONENT", "")
    rng = random.Random(f"{seed}:{component}:{point}:{os.environ.get('CHAOS_INCARNATION', '0')}")
    chance = float(probability)
    publish = CeleryPublisher.publish

    def faulty_publish(self: CeleryPublisher, jobs: Any) -> None:
        if point == "bridge.before_publish":
            _die_maybe(rng, chance)
        publish(self, jobs)
        if point == "bridge.after_publish":
            _die_maybe(rng, chance)

    if point not in ("bridge.before_publish", "bridge.after_publish"):
        raise SystemExit(f"unknown fault point {point!r}")
    replace(CeleryPublisher, "publish", faulty_publish)


# -- sabotage: each switches one protection off --------------------------------------


def commit_before_publish() -> None:
    """The lock commits on its own before the publish (lock -> commit -> publish)."""
    from lqjobs.bridge.loop import Bridge

    def dispatch(self: Bridge, conn: Any) -> tuple[int, bool]:
        room = self.settings.max_in_flight - self.reads.count_locked_by(conn, self.worker_id)
        allowed = min(self.batch_size, room)
        jobs = []
        for _ in range(allowed):  # in autocommit: each lock commits
            job = self.queue.get_job(conn, self.worker_id, self.task_filter, self.job_expiry)
            if job is None:
                break
            jobs.append(job)
        if jobs:
            self.publisher.publish(jobs)
        self._count(locked=len(jobs))
        return len(jobs), 0 < len(jobs) == allowed < room

    replace(Bridge, "_dispatch_batch", dispatch)


def no_lease_check() -> None:
    """Upstream's worker: run whatever message arrives, settle by job id alone."""
    from lqjobs.db.base import JOB_COLUMNS
    from lqjobs.db.fence import Fence, Held
    from lqjobs.db.queue import Queue
    from lqjobs.models import JobRow

    def preflight(self: Fence, conn: Any, lease: Any) -> Held | None:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                f"SELECT {JOB_COLUMNS}, now() AS db_now FROM {self.schema}.jobs WHERE id = %s",
                [lease.job_id],
            )
            row = cur.fetchone()
        if row is None:
            return None
        db_now = row.pop("db_now")
        job = JobRow.model_validate(row)
        # Upstream never judges a lease's age: the job looks freshly locked.
        return Held(job.model_copy(update={"locked_at": db_now}), True, db_now)

    # no advisory lock was taken above, so there is none to release
    def complete(self: Fence, conn: Any, lease: Any, *, release_advisory: bool = False) -> bool:
        Queue(self.schema).complete_job(conn, lease.worker_id, lease.job_id)
        return True

    def fail(
        self: Fence, conn: Any, lease: Any, error_message: str, *, release_advisory: bool = False
    ) -> bool:
        Queue(self.schema).fail_job(
            conn, lease.worker_id, lease.job_id, error_message or "unknown error"
        )
        return True

    replace(Fence, "preflight", preflight)
    replace(Fence, "fenced_complete", complete)
    replace(Fence, "fenced_fail", fail)


def no_advisory_lock() -> None:
    """Two deliveries of one lease may both call the function at once: no advisory
    lock, and a second delivery does not wait for a call that may still run."""
    from lqjobs.db.fence import Fence

    no_start_guard()
    preflight = Fence.preflight

    def unguarded(self: Fence, conn: Any, lease: Any) -> Any:
        held = preflight(self, conn, lease)
        return None if held is None else dataclasses.replace(held, advisory=True)

    replace(Fence, "preflight", unguarded)


def no_start_guard() -> None:
    """A second delivery of a started lease takes its worker for lost at once, even
    while the first call may still run (only the advisory lock keeps them apart)."""
    from lqjobs.settings import Settings

    replace(Settings, "call_bound_seconds", lambda self: 0.0)


def celery_expires() -> None:
    """The old message expiry: Celery's ``expires`` set W + V after the publish on the
    bridge's clock, judged on the worker's; a late message is discarded unrun."""
    from datetime import UTC, datetime, timedelta

    from lqjobs.bridge.publisher import CeleryPublisher

    headers = CeleryPublisher._headers
    seconds = float(os.environ.get("LQJOBS_MAX_QUEUE_WAIT", "180")) + float(
        os.environ.get("LQJOBS_VISIBILITY_TIMEOUT", "120")
    )

    def expiring(self: CeleryPublisher, job: Any, task_id: str, argsrepr: str) -> dict[str, Any]:
        sent = headers(self, job, task_id, argsrepr)
        sent["expires"] = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
        return sent

    replace(CeleryPublisher, "_headers", expiring)


def narrow_db_retries() -> None:
    """Only a lost connection is worth retrying: any other database error raises out
    of the task (Celery acknowledges it) or drops the call's outcome."""
    import lqjobs.worker
    from lqjobs.errors import DatabaseUnavailable

    replace(lqjobs.worker, "DatabaseError", DatabaseUnavailable)


def shared_worker_id() -> None:
    """Upstream's bridge: one fixed worker id, ``release_jobs`` at every start."""
    import lqjobs.bridge.loop
    from lqjobs import db

    replace(lqjobs.bridge.loop, "new_worker_id", lambda hostname: "worker-0")
    run_forever = lqjobs.bridge.loop.Bridge.run_forever

    def released_first(self: lqjobs.bridge.loop.Bridge) -> None:
        with db.connect(self.settings.conninfo(), autocommit=True) as conn:
            self.queue.release_jobs(conn, self.worker_id)
        run_forever(self)

    replace(lqjobs.bridge.loop.Bridge, "run_forever", released_first)


def unauthenticated_callbacks() -> None:
    """Upstream's callback server: any POST naming a job settles it, no token, no
    lease check; a POST without ``X-Job-Id`` is a health check."""
    from lqjobs.callback.parsing import CallbackRequest, Rejected, parse_report
    from lqjobs.callback.service import CallbackService, Reply
    from lqjobs.db.queue import Queue

    def handle(self: CallbackService, request: CallbackRequest) -> Reply:
        job_id = request.headers.get("x-job-id", "").strip()
        if not job_id.isdigit():
            return Reply(200, "health")
        try:
            report = parse_report(request.headers, request.body)
        except Rejected as exc:
            return Reply(exc.status, exc.result)
        worker = request.headers.get("x-worker-id", "").strip()
        queue = Queue(self.fence.schema)
        with self.pool.connection() as conn:
            if report.success:
                queue.complete_job(conn, worker, int(job_id))
            elif worker:
                queue.fail_job(conn, worker, int(job_id), report.message)
        return Reply(200, "completed" if report.success else "failed")

    replace(CallbackService, "handle", handle)


def no_callback_deadline() -> None:
    """A deferred job waits for its callback until the lease expires."""
    from lqjobs.broker_state import DeferredDeadlines

    replace(DeferredDeadlines, "record", lambda self, lease, seconds: None)


def no_callback_limits() -> None:
    """The callback service without its request deadline and connection cap (its drain
    bound stays): a slow client holds every connection it opens, as long as it likes."""
    import lqjobs.callback.server as server
    from lqjobs.callback.connections import Limits

    def unlimited(settings: Any) -> Limits:
        return Limits(
            request_seconds=86_400.0,
            connections=1_000_000,
            drain_seconds=settings.callback_drain_timeout,
            workers=settings.db_pool_size,
        )

    replace(server, "limits_for", unlimited)


def task_name_in_url() -> None:
    """Upstream's Knative URL: ``http://{task}.{KNATIVE_SERVICE_URL}``, unvalidated."""
    from lqjobs.executors import KnativeExecutor, build_headers
    from lqjobs.executors.http import _body, _Request

    suffix = os.environ.get("KNATIVE_SERVICE_URL", "")

    def request(self: KnativeExecutor, invocation: Any) -> _Request:
        url = f"http://{invocation.task_identifier}.{suffix}"
        return _Request(url, build_headers(invocation), _body(invocation))

    replace(KnativeExecutor, "_request", request)


def no_exchange_deadline() -> None:
    """httpx's timeouts alone: each read is bounded, the whole call is not."""
    from lqjobs.executors import http

    @contextlib.contextmanager
    def unbounded(seconds: float | None) -> Iterator[None]:
        yield

    replace(http, "exchange_deadline", unbounded)


def wake_on_expired_locks() -> None:
    """The wake timer before issue #14's fix: a job whose lock expired is due now,
    even when another job holds its serial queue and get_job cannot take it."""
    from psycopg import sql

    from lqjobs.db.base import tasks_param
    from lqjobs.db.reads import Reads

    def seconds_until_next_job(
        self: Reads, conn: Any, task_identifiers: Any, job_expiry: Any
    ) -> float | None:
        query = sql.SQL(
            """
            SELECT extract(epoch FROM least(
                (SELECT min(run_at) FROM {schema}.jobs
                  WHERE locked_at IS NULL AND attempts < max_attempts AND run_at > now()
                    AND (%(tasks)s::text[] IS NULL OR task_identifier = ANY(%(tasks)s))),
                (SELECT min(locked_at) + %(expiry)s::interval FROM {schema}.jobs
                  WHERE locked_at IS NOT NULL AND attempts < max_attempts
                    AND (%(tasks)s::text[] IS NULL OR task_identifier = ANY(%(tasks)s)))
            ) - now())::float8
            """
        ).format(schema=self._schema)
        params = {"tasks": tasks_param(task_identifiers), "expiry": job_expiry}
        row = conn.execute(query, params).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    replace(Reads, "seconds_until_next_job", seconds_until_next_job)


def strict_rows() -> None:
    """Rows parsed as before issue #14's fix: ``created_at`` / ``updated_at`` required
    and a row that fits no JobRow raised out of the bridge's pass."""
    from datetime import datetime

    from lqjobs.db import queue
    from lqjobs.models import JobRow

    class StrictJobRow(JobRow):
        created_at: datetime
        updated_at: datetime

    replace(queue, "read_job", lambda row: StrictJobRow.model_validate(row))


def kombu_channel_teardown() -> None:
    """kombu's own teardown of a broken channel: a Redis restart while calls run makes
    the worker exit 1 (docs/design.md, F22)."""
    from kombu.transport import redis as kombu_redis

    from lqjobs.transport import Channel

    replace(Channel, "close", kombu_redis.Channel.close)
    replace(Channel, "_get_pool", kombu_redis.Channel._get_pool)


SABOTAGE: dict[str, Patch] = {
    "commit_before_publish": commit_before_publish,
    "no_lease_check": no_lease_check,
    "no_advisory_lock": no_advisory_lock,
    "no_start_guard": no_start_guard,
    "celery_expires": celery_expires,
    "narrow_db_retries": narrow_db_retries,
    "shared_worker_id": shared_worker_id,
    "unauthenticated_callbacks": unauthenticated_callbacks,
    "no_callback_deadline": no_callback_deadline,
    "no_callback_limits": no_callback_limits,
    "task_name_in_url": task_name_in_url,
    "no_exchange_deadline": no_exchange_deadline,
    "wake_on_expired_locks": wake_on_expired_locks,
    "strict_rows": strict_rows,
    "kombu_channel_teardown": kombu_channel_teardown,
}


def skip_timeout_ladder() -> None:
    """Let a scenario misconfigure the ladder on purpose (F6: V below the call time)."""
    from lqjobs.settings import Settings

    replace(Settings, "timeout_ladder_problems", lambda self: [])


def main() -> None:
    role, *options = sys.argv[1:]
    seed = os.environ.get("CHAOS_SEED", "0")
    if os.environ.get("CHAOS_SKIP_LADDER"):
        skip_timeout_ladder()
    if fault := os.environ.get("CHAOS_FAULT"):
        install_fault(fault, seed)
    for name in filter(None, os.environ.get("CHAOS_SABOTAGE", "").split(",")):
        SABOTAGE[name]()
    if role == "worker":
        from celery.bin.celery import main as celery_main

        sys.argv = ["celery", "-A", "lqjobs.app", "worker", *options]
        celery_main()
    else:
        from lqjobs.ops.cli import main as lqjobs_main

        sys.argv = ["lqjobs", role, *options]
        lqjobs_main()


if __name__ == "__main__":
    main()
