"""Runs one lqjobs component as a real process, with the chaos suite's hooks.

    python -m tests.chaos.agent bridge|worker|callback|scheduler [options...]

Without ``CHAOS_*`` variables it is exactly ``lqjobs <role>`` (or ``celery -A tasks
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

import inspect
import os
import random
import signal
import sys
from collections.abc import Callable
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
    from bridge.publisher import CeleryPublisher

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
    from bridge.loop import Bridge

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
    from lqjobs.db.fence import Fence
    from lqjobs.db.queue import Queue
    from lqjobs.models import JobRow

    def preflight(self: Fence, conn: Any, lease: Any) -> tuple[JobRow | None, bool]:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                f"SELECT {JOB_COLUMNS} FROM {self.schema}.jobs WHERE id = %s", [lease.job_id]
            )
            row = cur.fetchone()
        return (None, False) if row is None else (JobRow.model_validate(row), True)

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
    """Two deliveries of one lease may both call the function at once."""
    from lqjobs.db.fence import Fence

    preflight = Fence.preflight

    def unguarded(self: Fence, conn: Any, lease: Any) -> tuple[Any, bool]:
        job, _locked = preflight(self, conn, lease)
        return job, job is not None

    replace(Fence, "preflight", unguarded)


def shared_worker_id() -> None:
    """Upstream's bridge: one fixed worker id, ``release_jobs`` at every start."""
    import bridge.loop
    from lqjobs import db

    replace(bridge.loop, "new_worker_id", lambda hostname: "worker-0")
    run_forever = bridge.loop.Bridge.run_forever

    def released_first(self: bridge.loop.Bridge) -> None:
        with db.connect(self.settings.conninfo(), autocommit=True) as conn:
            self.queue.release_jobs(conn, self.worker_id)
        run_forever(self)

    replace(bridge.loop.Bridge, "run_forever", released_first)


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


def task_name_in_url() -> None:
    """Upstream's Knative URL: ``http://{task}.{KNATIVE_SERVICE_URL}``, unvalidated."""
    from lqjobs.executors import KnativeExecutor, build_headers
    from lqjobs.executors.http import _body, _Request

    suffix = os.environ.get("KNATIVE_SERVICE_URL", "")

    def request(self: KnativeExecutor, invocation: Any) -> _Request:
        url = f"http://{invocation.task_identifier}.{suffix}"
        return _Request(url, build_headers(invocation), _body(invocation))

    replace(KnativeExecutor, "_request", request)


def kombu_channel_teardown() -> None:
    """kombu's own teardown of a broken channel: a Redis restart while calls run makes
    the worker exit 1 (docs/design.md, F20)."""
    from kombu.transport import redis as kombu_redis

    from lqjobs.transport import Channel

    replace(Channel, "close", kombu_redis.Channel.close)
    replace(Channel, "_get_pool", kombu_redis.Channel._get_pool)


SABOTAGE: dict[str, Patch] = {
    "commit_before_publish": commit_before_publish,
    "no_lease_check": no_lease_check,
    "no_advisory_lock": no_advisory_lock,
    "shared_worker_id": shared_worker_id,
    "unauthenticated_callbacks": unauthenticated_callbacks,
    "no_callback_deadline": no_callback_deadline,
    "task_name_in_url": task_name_in_url,
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

        sys.argv = ["celery", "-A", "tasks", "worker", *options]
        celery_main()
    else:
        from lqjobs.ops.cli import main as lqjobs_main

        sys.argv = ["lqjobs", role, *options]
        lqjobs_main()


if __name__ == "__main__":
    main()
