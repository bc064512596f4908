"""R01-R08, R15, R16: processes and servers die, restart or stall."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from typing import Any

import psycopg

from lqjobs.ops.embedded import wait_until
from tests.chaos.cluster import TENANT, WORKER_OPTIONS, Cluster, Run
from tests.chaos.oracle import Tally, job_states, wait_quiescent
from tests.chaos.scenarios.common import (
    Scale,
    count_left,
    finish,
    killed,
    locked_count,
    own_exits,
    sabotage,
    wait_for_calls,
)
from tests.chaos.scoreboard import Bounds, Result, Row
from tests.job_sink import install_sink, sunk, whole_seconds

# -- R01, R02: the bridge dies around the publish --------------------------------------


def _bridge_kill(cluster: Cluster, scale: Scale, protected: bool, point: str, off: str) -> Result:
    n = scale.jobs(1000)
    name = f"{'R01' if 'before' in point else 'R02'}{'' if protected else '-negative'}"
    with cluster.run(name, least_privilege=protected) as run:
        # 0.2 s calls and a second bridge: a job whose lock rolled back is locked again
        # at once, while a message from the dead bridge may still be running it
        ids = run.add_jobs("slow", [{"sleep": 0.2} for _ in range(n)])
        run.spawn("worker", **sabotage(protected, off))
        bridges = [
            run.spawn(
                "bridge",
                name,
                "--batch-size",
                "10",
                CHAOS_FAULT=f"bridge.{point}:0.3",
                **sabotage(protected, off),
            )
            for name in ("bridge-a", "bridge-b")
        ]
        result = finish(run, ids, lambda: killed(*bridges), stall=10)
        result.preconditions["faults injected"] = result.faults >= 2
        return result


def r01(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        return _bridge_kill(cluster, scale, protected, "before_publish", "commit_before_publish")

    return Row(
        "R01",
        "F1 bridge SIGKILL after get_job, before publish",
        once(True),
        Bounds(),
        once(False),
        "lock committed before publish",
        ("stranded",),
    )


def r02(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        return _bridge_kill(cluster, scale, protected, "after_publish", "no_lease_check")

    return Row(
        "R02",
        "F2 bridge SIGKILL after publish, before commit",
        once(True),
        Bounds(),
        once(False),
        "no lease check in the task",
        # a stale message runs the job again; at the same time as the new lease's
        # call only when both reach a free worker slot together
        ("duplicated",),
    )


# -- R03: the broker goes away during publishes and calls --------------------------------

KOMBU_TEARDOWN = "kombu_channel_teardown"
RUNNING = 8  # calls in flight at each outage, half the worker's slots


def r03(cluster: Cluster, scale: Scale) -> Row:
    outages = 3 if scale.factor >= 1 else 1

    def once(protected: bool) -> Result:
        name = f"R03{'' if protected else '-negative'}"
        with cluster.run(name, least_privilege=protected) as run:
            run.spawn("worker", **sabotage(protected, KOMBU_TEARDOWN))
            run.spawn("bridge")
            ids = run.add_jobs("noop", [{"warmup": i} for i in range(20)])
            wait_quiescent(run.db_url, ids, 60)
            untouched, ends = True, []
            for outage in range(outages):
                # calls running as the broker goes, their messages held unacknowledged
                # and the worker idle in its next BRPOP
                ids += run.add_jobs("slow", [{"sleep": 1.5, "outage": outage}] * RUNNING)
                wait_until(
                    lambda: run.functions.calls_in_progress() == RUNNING, 30, "the calls running"
                )
                cluster.stop_redis_saving()  # down, queued messages kept on disk
                during = run.add_jobs(
                    "noop", [{"outage": outage, "i": i} for i in range(scale.jobs(150))]
                )
                ids += during
                until = time.monotonic() + 8
                while time.monotonic() < until:
                    states = job_states(run.db_url, during)
                    untouched &= not any(s.locked or s.attempts for s in states.values())
                    time.sleep(0.2)
                cluster.redis.start()
                ends.append(time.monotonic())
            checks = {"no lock and no attempt while the broker was down": untouched}
            return finish(run, ids, ends, checks=checks)

    return Row(
        "R03",
        f"F3, F22 Redis down during publishes and calls ({outages} x 8 s)",
        once(True),
        Bounds(exits=0),
        once(False),
        "kombu's channel teardown",
        ("exited on its own",),
    )


# -- R04: Redis restarts empty ----------------------------------------------------------

RECONCILER_OFF = {"LQJOBS_RECONCILE_INTERVAL": "0"}


def r04(cluster: Cluster, scale: Scale) -> Row:
    kills = 3 if scale.factor >= 1 else 1
    concurrency = 16

    def once(protected: bool) -> Result:
        n = scale.jobs(600, least=150)
        with cluster.run(
            f"R04{'' if protected else '-negative'}", least_privilege=protected
        ) as run:
            ids = run.add_jobs("slow", [{"sleep": 0.2} for _ in range(n)])
            run.spawn("worker")
            run.spawn("bridge", **({} if protected else RECONCILER_OFF))
            faults = []
            for k in range(kills):
                wait_for_calls(run, n * (k + 1) // (kills + 2))
                # down for a second: clients notice the loss before it is back (F22)
                cluster.restart_redis_empty(down_for=1.0)
                faults.append(time.monotonic())
            return finish(run, ids, faults, stall=10)

    bound = kills * concurrency * 2
    return Row(
        "R04",
        f"F4 Redis SIGKILL, restarted empty (x{kills})",
        once(True),
        Bounds(duplicated=bound, attempts_burned=bound, recovery=20, exits=0),
        once(False),
        "reconciler off",
        ("stranded",),
    )


# -- R05: the worker dies mid-call ------------------------------------------------------


def r05(cluster: Cluster, scale: Scale) -> Row:
    kills = 5 if scale.factor >= 1 else 2
    concurrency = 16
    rng = random.Random(f"{cluster.seed}:R05")
    n = scale.jobs(400, least=100)
    with cluster.run("R05") as run:
        ids = run.add_jobs("slow", [{"sleep": round(rng.uniform(0.3, 1.0), 2)} for _ in range(n)])
        worker = run.spawn("worker")
        run.spawn("bridge")
        faults = []
        for k in range(kills):
            wait_for_calls(run, n * (k + 1) // (kills + 2))
            worker.kill()
            faults.append(time.monotonic())
            worker.wait_restarted(k)
        result = finish(run, ids, faults, stall=25)
    bound = kills * concurrency
    return Row(
        "R05",
        f"F5 Celery worker SIGKILL mid-call (x{kills})",
        result,
        Bounds(duplicated=bound, attempts_burned=bound),
    )


# -- R06: a redelivery while the first delivery still runs -----------------------------

SHORT_VISIBILITY = {
    "CHAOS_SKIP_LADDER": "1",
    "LQJOBS_VISIBILITY_TIMEOUT": "2",
    "LQJOBS_HTTP_TIMEOUT": "6",
    "LQJOBS_TASK_SOFT_TIME_LIMIT": "8",
    "LQJOBS_TASK_TIME_LIMIT": "9",
}


def r06(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        n = scale.jobs(48, least=12)
        with cluster.run(
            f"R06{'' if protected else '-negative'}",
            settings=SHORT_VISIBILITY,
            least_privilege=protected,
        ) as run:
            ids = run.add_jobs("slow", [{"sleep": 3.5} for _ in range(n)])
            # room for every job and its redelivery at once: the overlap needs both running
            options = (*WORKER_OPTIONS, "--concurrency", str(2 * n + 4))
            run.spawn(
                "worker",
                "worker",
                *options,
                LQJOBS_DB_POOL_SIZE=str(2 * n + 4),
                **sabotage(protected, "no_advisory_lock"),
            )
            run.spawn("bridge")
            result = finish(run, ids, [], stall=20)
            result.faults = n  # every message outlives its visibility timeout
            return result

    return Row(
        "R06",
        "F6 duplicate delivery, V 2 s < call 3.5 s",
        once(True),
        Bounds(),
        once(False),
        "no advisory lock",
        ("duplicated",),
    )


# -- R07: bridge restarts while its messages wait behind a paused worker ---------------


def r07(cluster: Cluster, scale: Scale) -> Row:
    restarts = 5
    cap = 20
    settings = {
        "LQJOBS_MAX_QUEUE_WAIT": "40",
        "LQJOBS_JOB_EXPIRY": "90",
        "LQJOBS_MAX_IN_FLIGHT": str(cap),
    }
    # enough worker slots to start every queued message at once on resume, so that two
    # messages of one job (the upstream bug) run side by side instead of one after another
    slots = str(4 * cap)
    worker_options = (*WORKER_OPTIONS, "--concurrency", slots, "--hostname", "worker@%h")

    def once(protected: bool) -> Result:
        with cluster.run(
            f"R07{'' if protected else '-negative'}", settings=settings, least_privilege=protected
        ) as run:
            ids = run.add_jobs("slow", [{"sleep": 1.0} for _ in range(cap * (restarts + 2))])
            worker = run.spawn(
                "worker",
                "worker",
                *worker_options,
                LQJOBS_DB_POOL_SIZE=slots,
                **sabotage(protected, "no_lease_check"),
            )
            worker.send(signal.SIGSTOP)
            bridge = run.spawn("bridge", **sabotage(protected, "shared_worker_id"))
            faults = []
            for k in range(restarts):
                # each incarnation locks (and publishes) a full cap; upstream's releases
                # and re-locks the same jobs instead
                held = cap * (k + 1) if protected else cap
                wait_until(lambda held=held: locked_count(run) >= held, 60, "a full cap")
                time.sleep(0.5)
                (bridge.terminate if k % 2 == 0 else bridge.kill)()
                faults.append(time.monotonic())
                bridge.wait_restarted(k)
            worker.send(signal.SIGCONT)
            return finish(run, ids, faults, stall=20, timeout=180)

    return Row(
        "R07",
        f"F7 bridge restarts x{restarts} behind a paused worker",
        once(True),
        Bounds(recovery=100),
        once(False),
        "one worker id, release_jobs on start, no lease check",
        ("overlapping",),
    )


# -- R08: Postgres restarts and the listener's session is killed -----------------------


def r08(cluster: Cluster, scale: Scale) -> Row:
    restarts = 3 if scale.factor >= 1 else 1
    n = scale.jobs(1000, least=200)
    with cluster.run("R08") as run:
        run.spawn("worker")
        run.spawn("bridge")
        stop = threading.Event()
        listener_kills: list[float] = []
        killer = threading.Thread(
            target=_kill_listeners, args=(run, stop, listener_kills), daemon=True
        )
        killer.start()
        ids: list[int] = []
        faults: list[float] = []
        for _ in range(restarts):
            ids += run.add_jobs("slow", [{"sleep": 0.05} for _ in range(n // (restarts + 1))])
            time.sleep(1.0)  # the fault schedule: restart while jobs are in flight
            cluster.restart_postgres()
            faults.append(time.monotonic())
        ids += run.add_jobs("slow", [{"sleep": 0.05} for _ in range(n // (restarts + 1))])
        time.sleep(3)
        stop.set()
        killer.join(10)
        result = finish(run, ids, faults + listener_kills, stall=20)
    return Row("R08", f"F8 Postgres restart x{restarts} + listener kills", result, Bounds())


def _kill_listeners(run: Run, stop: threading.Event, kills: list[float]) -> None:
    """Every 2 s, terminate every session of the bridge: its LISTEN connection and
    its work connection (maybe mid-transaction)."""
    user = run.user("bridge")
    assert user is not None, "R08 runs the bridge as its own login"
    while not stop.wait(2.0):
        try:
            rows = run.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                [user],
            )
        except psycopg.Error:
            continue  # postgres is restarting
        kills.extend(time.monotonic() for (ok,) in rows if ok)


# -- R15: rolling SIGTERM ------------------------------------------------------------------


def r15(cluster: Cluster, scale: Scale) -> Row:
    n = scale.jobs(800, least=200)
    with cluster.run("R15") as run:
        ids = run.add_jobs("slow", [{"sleep": 0.25} for _ in range(n)])
        order = [
            run.spawn("bridge"),
            run.spawn("worker"),
            run.spawn("callback"),
            run.spawn("scheduler", LQJOBS_SCHEDULER_ID="chaos-scheduler"),
        ]
        terms = []
        i = 0
        while len(terms) < 8 or (count_left(run, ids) > 0 and len(terms) < 200):
            time.sleep(1.5)  # the rolling schedule: one component every 1.5 s
            component = order[i % len(order)]
            component.wait_ready()  # a graceful stop is for a process that has started
            time.sleep(0.5)
            component.terminate()
            terms.append(time.monotonic())
            component.wait_restarted(component.incarnation)
            i += 1
        # the exits of the rolling SIGTERMs (each recorded before its restart), not
        # the teardown's, which may catch a process still booting
        rolled = {c.name: list(c.exit_codes) for c in order}
        result = finish(run, ids, terms, stall=15)
        bad = {name: [code for code in codes if code] for name, codes in rolled.items()}
        bad = {name: codes for name, codes in bad.items() if codes}
        result.checks["every SIGTERM ended in exit 0"] = not bad
        result.notes = f"non-zero exits {bad}" if bad else ""
    return Row("R15", "F17 rolling SIGTERM of every component", result, Bounds())


# -- R16: the scheduler dies ----------------------------------------------------------------


def r16(cluster: Cluster, scale: Scale) -> Row:
    kills = 10 if scale.factor >= 1 else 4
    with cluster.run("R16") as run:
        install_sink(run.db_url)
        with psycopg.connect(run.db_url, autocommit=True) as conn:
            run.jobs_db.scheduled.add_scheduled_job(
                conn, TENANT, "sink-tick", {}, {"rule": "*/1 * * * * *"}
            )
        scheduler = run.spawn("scheduler", LQJOBS_SCHEDULER_ID="chaos-scheduler")
        wait_until(lambda: _ticks(run), 30, "the first tick")
        faults = []
        for k in range(kills):
            time.sleep(3)  # the kill schedule: every 3 s
            scheduler.kill()
            faults.append(time.monotonic())
            scheduler.wait_restarted(k)
        time.sleep(3)
        scheduler.stop()
        ticks = whole_seconds(_ticks(run))
        locked = run.sql("SELECT count(*) FROM app_jobs.scheduled_jobs WHERE locked_by IS NOT NULL")
    per_second = Counter(ticks)
    span = range(min(ticks), max(ticks) + 1)
    missed = sum(1 for second in span if second not in per_second)
    tally = Tally(
        jobs=len(ticks),
        completed=len(ticks),
        duplicated=sum(c - 1 for c in per_second.values()),
        stranded=int(locked[0][0]),
    )
    result = Result(
        tally, kills, 0.0, notes=f"{missed} ticks missed while down", exits=own_exits(run)
    )
    # node-schedule's policy: no catch-up for ticks missed while no scheduler ran
    result.checks[f"missed ticks only while down ({missed} <= {kills * 3})"] = missed <= kills * 3
    return Row("R16", f"F18 scheduler SIGKILL x{kills}, a tick every second", result, Bounds())


def _ticks(run: Run) -> list[Any]:
    with psycopg.connect(run.db_url, autocommit=True) as conn:
        return sunk(conn, "sink-tick")
