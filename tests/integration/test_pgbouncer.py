"""lqjobs through a real PgBouncer in transaction pooling mode (Debian's package), set
up as an operator would: `pool_mode = transaction`, a few server connections shared
by every client. Each protection is shown with its negative control:

- psycopg's automatic server-side prepare breaks through the pooler; transaction
  pool mode turns it off;
- a session-level advisory lock outlives its client on a pooled server session;
  transaction pool mode takes none;
- bridge, worker, scheduler and callback service run through the pooler, LISTEN on a
  direct URL or, without one, polling every second.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from lqjobs import db
from lqjobs.db import Fence, JobsDB
from lqjobs.errors import DatabaseError
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.settings import POLL_WITHOUT_LISTEN
from tests import processes
from tests.integration.test_async_e2e import add_jobs as add_async_jobs
from tests.integration.test_async_e2e import callback_chain
from tests.job_sink import install_sink, sunk
from tests.pgbouncer import PgBouncer, pgbouncer_bin
from tests.runners import TENANT, lock_job
from tests.stack import add_jobs, count, flush_broker, stack, wait_for_empty_queue

pytestmark = pytest.mark.integration


def started(folder: Path, pg_url: str, pool_size: int) -> PgBouncer:
    if pgbouncer_bin() is None:
        if os.environ.get("CI"):
            raise RuntimeError("no pgbouncer: apt-get install pgbouncer (.ci/run does)")
        pytest.skip("no pgbouncer on this machine (apt-get install pgbouncer)")
    running = PgBouncer(folder, pg_url, pool_size=pool_size)
    running.start()
    return running


@pytest.fixture
def bouncer(pg_url: str, services_dir: Path) -> Iterator[PgBouncer]:
    """Four server connections shared by every client."""
    running = started(Path(tempfile.mkdtemp(dir=services_dir, prefix="pgbouncer-")), pg_url, 4)
    yield running
    running.stop()


@pytest.fixture
def one_server_bouncer(pg_url: str, services_dir: Path) -> Iterator[PgBouncer]:
    """One server connection for all clients: each client's next transaction lands on
    the session the previous client left."""
    running = started(Path(tempfile.mkdtemp(dir=services_dir, prefix="pgbouncer-")), pg_url, 1)
    yield running
    running.stop()


def advisory_locks(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def run_six_times(conn: db.Connection) -> None:
    """Six executions of one lqjobs statement: psycopg prepares it after the fifth."""
    reads = JobsDB().reads
    for _ in range(6):
        reads.count_locked_by(conn, "bridge-pooled-host-0000")


# -- psycopg's automatic prepare ------------------------------------------------------


def test_automatic_prepare_breaks_through_the_pooler_and_transaction_mode_turns_it_off(
    db_url: str, one_server_bouncer: PgBouncer
) -> None:
    pooled = one_server_bouncer.url(db_url)
    with db.connect(pooled, autocommit=True, pool_mode="transaction") as first:
        run_six_times(first)
    with db.connect(pooled, autocommit=True, pool_mode="transaction") as second:
        run_six_times(second)  # the same server session: nothing prepared on it

    # Negative control: psycopg's default prepares "_pg3_0" on the one server session;
    # the next client's own "_pg3_0" collides with it there.
    with db.connect(pooled, autocommit=True) as first:
        run_six_times(first)
    with db.connect(pooled, autocommit=True) as second, pytest.raises(DatabaseError) as caught:
        run_six_times(second)
    assert caught.value.sqlstate == "42P05"  # duplicate_prepared_statement


# -- session-level advisory locks -----------------------------------------------------


def test_no_advisory_lock_outlives_its_client_through_the_pooler(
    db_url: str, conn: psycopg.Connection[Any], bouncer: PgBouncer
) -> None:
    pooled = bouncer.url(db_url)
    lease = lock_job(conn, "noop", {})
    with db.connect(pooled, autocommit=True, pool_mode="transaction") as client:
        held = Fence(session_locks=False).preflight(client, lease)
        assert held is not None and held.advisory  # may go on, no lock taken
    assert advisory_locks(db_url) == 0

    # Negative control: the session lock of the fence used directly stays on the server
    # session PgBouncer keeps after its client is gone (and blocks the job's next delivery).
    with db.connect(pooled, autocommit=True, pool_mode="transaction") as client:
        held = Fence(session_locks=True).preflight(client, lease)
        assert held is not None and held.advisory
    wait_until(lambda: advisory_locks(db_url) == 1, 5, "the stray lock to show")
    assert advisory_locks(db_url) == 1


# -- the components through the pooler ------------------------------------------------


def pooled_environment(
    db_url: str, redis_url: str, bouncer: PgBouncer, functions: FunctionServer, **extra: str
) -> dict[str, str]:
    variables = {
        "LQJOBS_DATABASE_POOL_MODE": "transaction",
        "LQJOBS_EXECUTOR": "knative",
        "LQJOBS_KNATIVE_INGRESS_URL": functions.url,
    }
    env = processes.environment(bouncer.url(db_url), redis_url, **(variables | extra))
    env.pop("LQJOBS_POLL_INTERVAL")  # each test says how it is woken
    return env


def test_bridge_and_worker_run_every_job_once_through_the_pooler(
    db_url: str, redis_url: str, bouncer: PgBouncer, functions: FunctionServer, tmp_path: Path
) -> None:
    """LISTEN on the direct URL, everything else through PgBouncer; the safety poll
    is 30 s, so a job on an idle queue that runs at once was woken by LISTEN."""
    env = pooled_environment(
        db_url,
        redis_url,
        bouncer,
        functions,
        LQJOBS_LISTEN_DATABASE_URL=db_url,
        LQJOBS_POLL_INTERVAL="30",
    )
    late: list[int] = []

    def one_on_the_idle_queue() -> None:
        late.extend(add_jobs(db_url, "noop", 1))
        wait_until(lambda: count(db_url) == 0, 10, "the idle queue's job (woken by LISTEN)")

    job_ids, outputs = run_jobs(db_url, redis_url, env, tmp_path, 300, one_on_the_idle_queue)
    calls = Counter(call.job_id for call in functions.calls.all())
    assert calls == Counter(dict.fromkeys(job_ids + late, 1))
    assert advisory_locks(db_url) == 0
    for output in outputs:
        assert "prepared statement" not in output and "database error" not in output


@pytest.mark.one_postgres
def test_negative_control_session_mode_through_the_pooler_strands_advisory_locks(
    db_url: str, redis_url: str, bouncer: PgBouncer, functions: FunctionServer, tmp_path: Path
) -> None:
    """The same stack told it has every session to itself (the default pool mode):
    the workers' advisory locks stay behind on server sessions PgBouncer hands to
    others, which the test above would catch."""
    env = pooled_environment(
        db_url, redis_url, bouncer, functions, LQJOBS_DATABASE_POOL_MODE="session"
    )
    run_jobs(db_url, redis_url, env, tmp_path, 100)
    assert advisory_locks(db_url) > 0


def run_jobs(
    db_url: str,
    redis_url: str,
    env: dict[str, str],
    tmp_path: Path,
    n: int,
    then: Callable[[], None] | None = None,
) -> tuple[list[int], list[str]]:
    """``n`` no-op jobs through a bridge and a worker (8 threads) until the queue is
    empty, then ``then()`` while they still run; the job ids and their output."""
    flush_broker(redis_url)
    job_ids = add_jobs(db_url, "noop", n)
    with processes.running(
        processes.bridge(env, tmp_path), processes.worker(env, tmp_path)
    ) as running:
        wait_for_empty_queue(db_url, timeout=90)
        if then is not None:
            then()
    return job_ids, [process.output() for process in running]


def test_without_a_listen_url_bridge_polls_every_second_and_never_listens(
    db_url: str, redis_url: str, bouncer: PgBouncer, functions: FunctionServer, tmp_path: Path
) -> None:
    flush_broker(redis_url)
    env = pooled_environment(db_url, redis_url, bouncer, functions)
    with processes.running(processes.bridge(env, tmp_path), processes.worker(env, tmp_path)):
        wait_until(lambda: bouncer_clients(bouncer, db_url) > 0, 20, "the bridge to connect")
        for _ in range(3):  # each within a poll or two, far from the 15 s default
            add_jobs(db_url, "noop", 1)
            wait_until(lambda: count(db_url) == 0, 5 * POLL_WITHOUT_LISTEN, "a polled job")
    assert len(functions.calls.all()) == 3
    assert listening_sessions(db_url) == 0


def bouncer_clients(bouncer: PgBouncer, db_url: str) -> int:
    """Server sessions PgBouncer has opened to this test's database."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def listening_sessions(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query ILIKE 'LISTEN%'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_the_scheduler_runs_through_the_pooler_and_polls_without_listen(
    db_url: str, conn: psycopg.Connection[Any], bouncer: PgBouncer, tmp_path: Path
) -> None:
    install_sink(db_url)
    env = processes.environment(
        bouncer.url(db_url), "redis://127.0.0.1:9/0", LQJOBS_DATABASE_POOL_MODE="transaction"
    )
    env.pop("LQJOBS_POLL_INTERVAL")
    scheduled = JobsDB().scheduled
    with processes.running(processes.scheduler(env, tmp_path)):
        wait_until(lambda: bouncer_clients(bouncer, db_url) > 0, 20, "the scheduler to connect")
        # Added while it runs: found by the next one-second poll (no LISTEN).
        scheduled.add_scheduled_job(conn, TENANT, "sink-tick", {}, {"rule": "* * * * * *"})
        wait_until(lambda: len(sunk(conn, "sink-tick")) >= 3, 15, "three ticks")
    assert listening_sessions(db_url) == 0


def test_async_callbacks_settle_through_the_pooler(
    db_url: str, redis_url: str, bouncer: PgBouncer
) -> None:
    """Worker and callback service both through PgBouncer: each callback delivered
    twice settles its job once."""
    job_ids = add_async_jobs(db_url, 100, {})
    chain = callback_chain(
        bouncer.url(db_url),
        redis_url,
        callback_deadline=10,
        database_pool_mode="transaction",
        listen_database_url=db_url,
    )
    with chain as (settings, _service, functions, replayer), stack(settings):
        wait_for_empty_queue(db_url, timeout=60)
        wait_until(lambda: replayer.delivered() == 100, 10, "every callback to be replayed")
    assert Counter(call.job_id for call in functions.calls.all()) == Counter(
        dict.fromkeys(job_ids, 1)
    )
    assert Counter(tuple(results) for results in replayer.deliveries) == {
        ("completed", "already_settled"): 100
    }
    assert advisory_locks(db_url) == 0
