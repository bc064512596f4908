"""R24, R25: rows that real databases hold and a fresh install never has: a serial
queue held past a job's own lock expiry, and rows from an upgraded schema."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import psycopg

from lqjobs.ops.embedded import wait_until
from tests.chaos.cluster import LADDER, TENANT, Cluster, Run
from tests.chaos.scenarios.common import Scale, count_left, finish, sabotage
from tests.chaos.scoreboard import Bounds, Result, Row

# -- R24: a held serial queue with an expired lock ---------------------------------------

HOLD = 20.0  # seconds until the holder's lock expires and the queue moves on
WINDOW = 5.0  # seconds of an idle bridge whose transactions are counted
# With LQJOBS_POLL_INTERVAL=1 an idle bridge makes about one pass a second, a few
# transactions each; the old timer made about a thousand a second (F20).
MAX_COMMITS = 20 * WINDOW


def hold_queue_past_an_expired_lock(run: Run) -> tuple[int, int]:
    """Job ``holder`` holds serial queue q (lock taken by another bridge, expiring in
    HOLD s); job ``stuck`` of q holds a lock that expired an hour ago. get_job can
    take neither until the holder's lock expires."""
    expiry = timedelta(seconds=float(LADDER["LQJOBS_JOB_EXPIRY"]))
    queue = run.jobs_db.queue
    with psycopg.connect(run.db_url, autocommit=True) as conn:
        holder = queue.add_job(conn, TENANT, "noop", {"held": True}, queue_name="q").id
        stuck = queue.add_job(conn, TENANT, "noop", {"stuck": True}, queue_name="q").id
        taken = queue.get_job(conn, "bridge-elsewhere-1", None, expiry)
        assert taken is not None and taken.id == holder
        aged = expiry - timedelta(seconds=HOLD)
        conn.execute(
            "UPDATE app_jobs.jobs SET locked_at = now() - %s WHERE id = %s", [aged, holder]
        )
        conn.execute(
            "UPDATE app_jobs.job_queues SET locked_at = now() - %s WHERE queue_name = 'q'", [aged]
        )
        conn.execute(
            "UPDATE app_jobs.jobs SET locked_by = 'bridge-gone-1', attempts = 1, "
            "locked_at = now() - interval '1 hour' WHERE id = %s",
            [stuck],
        )
    return holder, stuck


def commits(run: Run) -> int:
    """The run's database's committed transactions (this probe's own included)."""
    with psycopg.connect(run.db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def still_held(run: Run, holder: int, stuck: int) -> bool:
    rows = run.sql("SELECT id, locked_by FROM app_jobs.jobs WHERE id = ANY(%s)", [[holder, stuck]])
    return dict(rows) == {holder: "bridge-elsewhere-1", stuck: "bridge-gone-1"}


def r24(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        name = f"R24{'' if protected else '-negative'}"
        with cluster.run(name, least_privilege=protected) as run:
            holder, stuck = hold_queue_past_an_expired_lock(run)
            healthy = run.add_jobs("noop", [{"i": i} for i in range(scale.jobs(200, least=50))])
            run.spawn("worker")
            run.spawn("bridge", **sabotage(protected, "wake_on_expired_locks"))
            wait_until(lambda: count_left(run, healthy) == 0, 15, "the healthy jobs")
            before = commits(run)
            time.sleep(WINDOW)  # the measurement itself: what an idle bridge does
            transactions = commits(run) - before
            held = still_held(run, holder, stuck)
            result = finish(
                run,
                [*healthy, holder, stuck],
                [],
                stall=HOLD + 15,
                genuine_failures={holder: 1, stuck: 1},  # the two lost leases
            )
        result.faults = 1
        result.preconditions["the queue stayed held through the window"] = held
        result.checks[f"the bridge does not busy-poll (<= {MAX_COMMITS:g} in {WINDOW:g} s)"] = (
            transactions <= MAX_COMMITS
        )
        result.notes = f"{transactions} transactions in {WINDOW:g} s idle"
        return result

    protected, negative = once(True), once(False)
    protected.notes += f"; without the fix {negative.notes}"
    return Row(
        "R24",
        "F20 a held serial queue with an expired lock",
        protected,
        Bounds(),
        negative,
        "wake timer counts expired locks as due",
        ("check failed: the bridge does not busy-poll",),
    )


# -- R25: rows from an upgraded schema ----------------------------------------------------

UNREADABLE = "unreadable job row: database_id: "


def upgraded_rows(run: Run, n: int) -> tuple[list[int], int]:
    """``n`` jobs queued before the upstream extension added created_at / updated_at
    (NULL there, as ALTER TABLE ADD COLUMN leaves them), and one row no JobRow fits:
    a schema without the NOT NULL on database_id that lqjobs' own install has."""
    ids = run.add_jobs("noop", [{"old": i} for i in range(n)])
    with psycopg.connect(run.db_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no trigger sets them again
        conn.execute(
            "UPDATE app_jobs.jobs SET created_at = NULL, updated_at = NULL WHERE id = ANY(%s)",
            [ids],
        )
        conn.execute("RESET session_replication_role")
        conn.execute("ALTER TABLE app_jobs.jobs ALTER COLUMN database_id DROP NOT NULL")
        row = conn.execute(
            "INSERT INTO app_jobs.jobs (database_id, task_identifier, payload) "
            "VALUES (NULL, 'noop', '{}') RETURNING id"
        ).fetchone()
    assert row is not None
    return ids, int(row[0])


def r25(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        name = f"R25{'' if protected else '-negative'}"
        with cluster.run(name, least_privilege=protected) as run:
            upgraded, broken = upgraded_rows(run, scale.jobs(40, least=10))
            healthy = run.add_jobs("noop", [{"i": i} for i in range(scale.jobs(200, least=50))])
            run.spawn("worker")
            bridge = run.spawn("bridge", **sabotage(protected, "strict_rows"))
            ids = [*upgraded, broken, *healthy]
            result = finish(run, ids, [], stall=10, expect_parked=[broken])
            error = run.sql("SELECT last_error FROM app_jobs.jobs WHERE id = %s", [broken])
            reported = re.search(
                rf"action=job_row_unreadable job_id={broken} reason=\"database_id: ",
                bridge.output(),
            )
        result.faults = len(upgraded) + 1
        result.checks["the bridge never exited"] = not bridge.unplanned_exits
        result.checks["the unreadable row parked for its reason"] = bool(
            error and (error[0][0] or "").startswith(UNREADABLE)
        )
        result.checks["the unreadable row reported (job id, reason)"] = reported is not None
        result.notes = f"{len(upgraded)} NULL-timestamp rows, 1 unreadable"
        if bridge.unplanned_exits:
            result.notes += f"; bridge exits {len(bridge.unplanned_exits)}"
        return result

    protected, negative = once(True), once(False)
    protected.notes += f"; without the fix {negative.tally.lost} jobs never ran, " + (
        negative.notes.rpartition("; ")[2] or "no bridge exit"
    )
    return Row(
        "R25",
        "F21 rows from an upgraded schema",
        protected,
        Bounds(),
        negative,
        "rows parsed strictly",
        ("check failed: the bridge never exited", "lost"),
    )
