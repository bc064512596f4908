"""R20-R23: what production clocks and Postgres do to the worker: a worker whose clock
runs ahead of the bridge's, deliveries later than the start window on a last attempt,
sessions reaped while their call runs, a read-only window as after a failover."""

from __future__ import annotations

import time

from psycopg import sql

from lqjobs.ops.embedded import wait_until
from tests.chaos.cluster import WORKER_OPTIONS, Cluster, Run
from tests.chaos.scenarios.clock import faketime, skewed
from tests.chaos.scenarios.common import Scale, finish, sabotage, wait_for_calls
from tests.chaos.scoreboard import Bounds, Result, Row

AHEAD = "+30s"  # more than the start window W + V = 16 s of the chaos ladder
START_WINDOW = 16.0


def _suffix(protected: bool) -> str:
    return "" if protected else "-negative"


# -- R20: a worker whose clock runs ahead of the bridge's -------------------------------


def r20(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        n = scale.jobs(200, least=40)
        with cluster.run(f"R20{_suffix(protected)}") as run:
            ids = run.add_jobs("noop", [{"i": i} for i in range(n)], max_attempts=1)
            run.spawn("worker", **faketime(AHEAD))
            run.spawn("bridge", **sabotage(protected, "celery_expires"))
            result = finish(run, ids, [], stall=15, faults=1)
            ahead = run.env("worker", **faketime(AHEAD))
            result.preconditions["the worker's clock really ran ahead"] = skewed(ahead, AHEAD)
            return result

    return Row(
        "R20",
        "F16 worker clock 30 s ahead of the bridge's, last attempts",
        once(True),
        Bounds(),
        once(False),
        "Celery expires on the bridge's clock",
        ("stranded",),
    )


# -- R21: every delivery later than the start window -----------------------------------


def _lease_ages(run: Run) -> tuple[int, float]:
    rows = run.sql(
        "SELECT count(*), coalesce(min(extract(epoch FROM now() - locked_at)), 0)::float8 "
        "FROM app_jobs.jobs WHERE locked_by IS NOT NULL"
    )
    return int(rows[0][0]), float(rows[0][1])


def _all_older_than(run: Run, jobs: int, seconds: float) -> bool:
    locked, youngest = _lease_ages(run)
    return locked == jobs and youngest > seconds


def r21(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        n = scale.jobs(30, least=15)  # 2n under the in-flight cap: every job locked at once
        with cluster.run(f"R21{_suffix(protected)}") as run:
            last_try = run.add_jobs("noop", [{"i": i} for i in range(n)], max_attempts=1)
            retries = run.add_jobs("noop", [{"i": i} for i in range(n)], max_attempts=5)
            run.spawn("bridge", **sabotage(protected, "celery_expires"))
            wait_until(
                lambda: _all_older_than(run, 2 * n, START_WINDOW + 1),
                60,
                "every lease to outlive the start window with no worker up",
            )
            outage_over = time.monotonic()
            run.spawn("worker")
            # stall > E: unprotected, the leases expire and a bridge parks the last tries
            return finish(run, last_try + retries, [outage_over], stall=35)

    return Row(
        "R21",
        "F5 workers down past the start window, last attempts",
        once(True),
        Bounds(),
        once(False),
        "Celery expires on the bridge's clock",
        ("lost",),
    )


# -- R22: the session guarding a running call is reaped --------------------------------

# V 2 s below a 6 s call: every message is redelivered while its call runs; the task
# limits and HTTP timeout leave room for the call (ladder check skipped on purpose).
REDELIVERED_MID_CALL = {
    "CHAOS_SKIP_LADDER": "1",
    "LQJOBS_VISIBILITY_TIMEOUT": "2",
    "LQJOBS_HTTP_TIMEOUT": "9",
    "LQJOBS_TASK_SOFT_TIME_LIMIT": "11",
    "LQJOBS_TASK_TIME_LIMIT": "12",
}


def _set_worker_role(run: Run, setting: str, value: str) -> None:
    login = run.user("worker")
    assert login is not None, "the run must use least-privilege logins"
    query = sql.SQL("ALTER ROLE {} SET {} = {}").format(
        sql.Identifier(login), sql.Identifier(setting), sql.Literal(value)
    )
    run.sql(query.as_string())


def _terminate_worker_sessions(run: Run) -> None:
    run.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
        [run.user("worker")],
    )


def r22(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        n = scale.jobs(24, least=8)
        with cluster.run(f"R22{_suffix(protected)}", settings=REDELIVERED_MID_CALL) as run:
            # A 6 s call leaves its session idle: the server ends it after 1 s, and the
            # job's advisory lock with it.
            _set_worker_role(run, "idle_session_timeout", "1s")
            ids = run.add_jobs("slow", [{"sleep": 6.0} for _ in range(n)])
            options = (*WORKER_OPTIONS, "--concurrency", str(2 * n + 4))
            run.spawn(
                "worker",
                "worker",
                *options,
                LQJOBS_DB_POOL_SIZE=str(2 * n + 4),
                **sabotage(protected, "no_start_guard"),
            )
            run.spawn("bridge")
            result = finish(run, ids, [], stall=25, faults=n)
            log = run.components["worker"].output()
            result.preconditions["sessions were reaped during calls"] = "outcome not written" in log
            return result

    return Row(
        "R22",
        "F6 sessions reaped mid-call (idle_session_timeout 1 s), redelivered",
        once(True),
        Bounds(),
        once(False),
        "advisory lock only",
        ("overlapping",),
    )


# -- R23: a read-only window, as after a failover ---------------------------------------


def r23(cluster: Cluster, scale: Scale) -> Row:
    windows = 3

    def once(protected: bool) -> Result:
        n = scale.jobs(300, least=90)
        with cluster.run(f"R23{_suffix(protected)}") as run:
            ids = run.add_jobs("slow", [{"sleep": 0.3} for _ in range(n)])
            run.spawn("worker", **sabotage(protected, "narrow_db_retries"))
            run.spawn("bridge")
            fault_times = []
            for window in range(windows):
                wait_for_calls(run, (window + 1) * n // (windows + 2))
                _set_worker_role(run, "default_transaction_read_only", "on")
                _terminate_worker_sessions(run)  # new sessions come up read-only
                time.sleep(3)  # the window's length: the fault, not a wait for a condition
                _set_worker_role(run, "default_transaction_read_only", "off")
                _terminate_worker_sessions(run)
                fault_times.append(time.monotonic())
            result = finish(run, ids, fault_times, stall=15)
            log = run.components["worker"].output()
            # calls running at a window's start write their outcome through it
            result.preconditions["outcomes were written through the window"] = (
                "outcome not written" in log
            )
            return result

    return Row(
        "R23",
        "F8 read-only sessions for 3 s, three times (failover)",
        once(True),
        Bounds(),
        once(False),
        "only connection loss retried",
        ("duplicated",),
    )
