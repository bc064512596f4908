"""``python -m bench``: throughput and latency of lqjobs against the raw SQL limit.

Starts its own Postgres (fsync on) and Redis from the embedded wheels, a
function server, a Celery worker and a bridge, each in its own process, and
prints one table. Every figure is the median of ``--runs`` runs (min-max beside
it), and the SQL limit is measured in the same run, so ratios compare like
with like.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from redis import Redis

from bench import cpu
from lqjobs.db.queue import Queue
from lqjobs.executors import Done, Invocation, build_router, make_http_client
from lqjobs.ops import migrate
from lqjobs.ops.dev import worker_argv
from lqjobs.ops.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_until
from lqjobs.settings import load_settings

TENANT = "00000000-0000-0000-0000-00000000bead"
ROOT = Path(__file__).resolve().parent.parent
QUIET = ("--without-heartbeat", "--without-mingle", "--without-gossip")


def add_jobs(url: str, n: int, payload: dict[str, Any] | None = None, task: str = "noop") -> None:
    """``n`` jobs through ``add_job``, in one statement (as a trigger adding a batch
    would): the bench's own CPU stays off the cores being measured."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT count(app_jobs.add_job(%(tenant)s::uuid, %(task)s, "
            "coalesce(%(payload)s::json, json_build_object('i', i)))) "
            "FROM generate_series(0, %(n)s - 1) AS i",
            {
                "tenant": TENANT,
                "task": task,
                "payload": None if payload is None else json.dumps(payload),
                "n": n,
            },
        )


@functools.cache
def _probe(url: str) -> psycopg.Connection[Any]:
    """The one connection the bench polls on: a connection per poll would start a
    Postgres backend every 20 ms, CPU taken from what is being measured."""
    return psycopg.connect(url, autocommit=True)


def drained(url: str) -> bool:
    row = _probe(url).execute("SELECT NOT EXISTS (SELECT FROM app_jobs.jobs)").fetchone()
    return bool(row and row[0])


def sql_drain(url: str, n: int, connections: int, walk_index: bool = False) -> float:
    """The raw SQL limit: get_job + complete_job in a loop, no Celery, no HTTP;
    ``walk_index``: on sessions set up as the bridge sets up its own."""
    add_jobs(url, n)
    jobs_db = Queue()

    def drain(index: int) -> None:
        worker = f"bench-sql-{index:04d}"
        with psycopg.connect(url, autocommit=True) as conn:
            if walk_index:
                # The raw SQL at its best: get_job walking its index on every call (the
                # bridge turns this on inside its lock statement, see WALK_JOB_INDEX).
                conn.execute("SET enable_sort = off")
            while (job := jobs_db.get_job(conn, worker, ["noop"])) is not None:
                jobs_db.complete_job(conn, worker, job.id)

    started = time.monotonic()
    threads = [threading.Thread(target=drain, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return n / (time.monotonic() - started)


class Stack:
    """Function server, Celery worker and bridge, each a real process."""

    def __init__(
        self, db_url: str, redis_url: str, folder: Path, concurrency: int, workers: int = 1
    ) -> None:
        self.workers = workers
        self.calls_path = folder / "calls.jsonl"
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("LQJOBS_", "JOBS_"))}
        self.env |= {
            "DATABASE_URL": db_url,
            "LQJOBS_BROKER_URL": redis_url,
            "JOBS_SUPPORTED": "noop",
            "LQJOBS_EXECUTOR": "knative",
            "LQJOBS_KNATIVE_INGRESS_URL": f"http://127.0.0.1:{self.port}",
            "LQJOBS_LOG_LEVEL": "WARNING",
            "LQJOBS_DB_POOL_SIZE": str(concurrency + 2),
        }
        self.concurrency = concurrency
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        server = [sys.executable, "-m", "bench.functions", str(self.port), str(self.calls_path)]
        self._spawn("functions", server)
        for n in range(self.workers):  # a worker's threads share one GIL: several processes
            self._spawn(
                f"worker-{n}",
                worker_argv(
                    self.concurrency, "--loglevel", "WARNING", "--hostname", f"bench{n}@%h", *QUIET
                ),
            )
        self._spawn("bridge", [sys.executable, "-m", "lqjobs", "bridge"])

    def start_plain_celery(self) -> None:
        """Workers of bench.celery_alone, set up exactly as lqjobs' workers."""
        for n in range(self.workers):
            argv = worker_argv(
                self.concurrency, "--loglevel", "WARNING", "--hostname", f"plain{n}@%h", *QUIET
            )
            argv[argv.index("tasks")] = "bench.celery_alone"
            self._spawn(f"plain-{n}", [*argv, "--queues", "bench-noop"])

    def stop_plain_celery(self) -> None:
        for name in [name for name in self.named if name.startswith("plain-")]:
            proc = self.named.pop(name)
            proc.terminate()
            proc.wait(30)
            self.procs.remove(proc)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.folder / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.named[name] = proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)

    def cpu_groups(self, servers: dict[str, int]) -> dict[str, list[int]]:
        """Process ids per component, for the CPU account of a run."""
        workers = [proc.pid for name, proc in self.named.items() if name.startswith("worker-")]
        return {
            "bridge": [self.named["bridge"].pid],
            "Celery workers": workers,
            "function server": [self.named["functions"].pid],
            **{name: [pid] for name, pid in servers.items()},
        }

    def calls(self) -> list[dict[str, Any]]:
        if not self.calls_path.exists():
            return []
        lines = self.calls_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line]


def one_at_a_time(stack: Stack, url: str, n: int, payload: dict[str, Any]) -> float:
    """The runtime lqjobs replaces: get_job, call the function, complete_job, one job
    at a time on one connection; the call made by lqjobs' own Knative executor, to
    the same function server, for a task the running bridge does not serve. Jobs
    per second."""
    settings = load_settings(
        database_url=url,
        jobs_support_any=True,
        executor="knative",
        knative_ingress_url=f"http://127.0.0.1:{stack.port}",
    )
    jobs_db, task = Queue(), "one-at-a-time"
    add_jobs(url, n, payload, task)
    with make_http_client(settings) as client, psycopg.connect(url, autocommit=True) as conn:
        executor = build_router(settings, client).for_task(task)
        started = time.monotonic()
        while (job := jobs_db.get_job(conn, "bench-one-at-a-time", [task])) is not None:
            invocation = Invocation(
                job_id=job.id,
                task_identifier=job.task_identifier,
                database_id=str(job.database_id),
                worker_id="bench-one-at-a-time",
                attempt=job.attempts,
                payload=job.payload,
                call_id=f"one-at-a-time-{job.id}",
            )
            assert isinstance(executor.invoke(invocation), Done), "the function failed"
            jobs_db.complete_job(conn, "bench-one-at-a-time", job.id)
        return n / (time.monotonic() - started)


def celery_alone(redis_url: str, n: int) -> float:
    """Plain Celery no-op tasks through the same worker setup: no bridge, no
    Postgres, no HTTP. Workers are started once, on their own queue."""
    from bench.celery_alone import QUEUE, TASK, app

    app.conf.broker_url = redis_url
    client = Redis.from_url(redis_url)
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task(TASK, args=[i], queue=QUEUE, producer=producer)

    def drained() -> bool:
        return client.llen(QUEUE) == 0 and client.hlen("unacked") == 0

    wait_until(drained, 600, f"{n} plain Celery tasks")
    elapsed = time.monotonic() - started
    client.close()
    return n / elapsed


def end_to_end(
    stack: Stack, url: str, n: int, payload: dict[str, Any] | None, groups: dict[str, list[int]]
) -> tuple[float, dict[str, float]]:
    """Jobs per second through the whole stack, and CPU milliseconds per job by component."""
    before = len(stack.calls())
    cpu_before = cpu.snapshot(groups)
    started = time.monotonic()
    add_jobs(url, n, payload)
    wait_until(lambda: drained(url), 600, f"{n} jobs to complete")
    elapsed = time.monotonic() - started
    cpu_ms = cpu.per_job_ms(cpu_before, cpu.snapshot(groups), n)
    cpu_ms["idle"] = (os.cpu_count() or 1) * elapsed * 1000 / n - sum(cpu_ms.values())
    assert len(stack.calls()) - before >= n, "fewer function calls than jobs"
    return n / elapsed, cpu_ms


def latency(stack: Stack, url: str, n: int, gap: float) -> tuple[float, float]:
    """add_job commit -> function called, one job every ``gap`` seconds (ms p50, p99)."""
    jobs_db = Queue()
    committed: dict[int, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(n):
            job = jobs_db.add_job(conn, TENANT, "noop", {})
            committed[job.id] = time.monotonic()  # autocommit: returned = committed
            time.sleep(gap)
    wait_until(lambda: drained(url), 120, "latency jobs to complete")
    delays = sorted(
        (call["started"] - committed[call["job_id"]]) * 1000
        for call in stack.calls()
        if call["job_id"] in committed
    )
    return statistics.median(delays), delays[int(len(delays) * 0.99) - 1]


def delayed_latency(stack: Stack, url: str, n: int, delay: float) -> tuple[float, float]:
    """How late after its run_at a delayed job is called (ms p50, p99): no NOTIFY comes
    when run_at arrives, so this measures the bridge's timer."""
    jobs_db = Queue()
    due: dict[int, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(n):
            wall, mono = datetime.now(UTC), time.monotonic()
            job = jobs_db.add_job(conn, TENANT, "noop", {}, run_at=wall + timedelta(seconds=delay))
            due[job.id] = mono + delay
            time.sleep(0.02)
    wait_until(lambda: drained(url), 120, "delayed jobs to complete")
    late = sorted(
        (c["started"] - due[c["job_id"]]) * 1000 for c in stack.calls() if c["job_id"] in due
    )
    return statistics.median(late), late[int(len(late) * 0.99) - 1]


def retry_latency(stack: Stack, url: str, n: int) -> tuple[float, float]:
    """How late after its back-off a retried job is called (ms p50, p99): each job fails
    once; fail_job moves run_at by e^1 s from about the end of the first call."""
    jobs_db = Queue()
    ids: set[int] = set()
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(n):
            ids.add(jobs_db.add_job(conn, TENANT, "noop", {"fail_times": 1}).id)
            time.sleep(0.02)
    wait_until(lambda: drained(url), 120, "retried jobs to complete")
    calls: dict[int, list[dict[str, Any]]] = {}
    for call in stack.calls():
        if call["job_id"] in ids:
            calls.setdefault(call["job_id"], []).append(call)
    late = sorted(
        (second["started"] - first["ended"] - math.e) * 1000
        for first, second in (sorted(c, key=lambda c: c["started"])[:2] for c in calls.values())
    )
    return statistics.median(late), late[int(len(late) * 0.99) - 1]


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def memory_growth(
    stack: Stack, url: str, n: int, chunk: int = 5000
) -> dict[str, tuple[float, float]]:
    """RSS in MB of the bridge and of each worker process before and after ``n`` no-op
    jobs, added ``chunk`` at a time (the stack has run the other figures already)."""
    names = ["bridge", *(f"worker-{i}" for i in range(stack.workers))]
    before = {name: rss_mb(stack.named[name].pid) for name in names}
    done = 0
    while done < n:
        size = min(chunk, n - done)
        add_jobs(url, size, None)
        wait_until(lambda: drained(url), 600, f"{size} memory jobs to complete")
        done += size
    return {name: (before[name], rss_mb(stack.named[name].pid)) for name in names}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def dispatch_ceiling(stack: Stack, url: str, n: int) -> tuple[float, float]:
    """The bridge alone, nobody consuming: jobs locked and published per second, and the
    bridge's CPU milliseconds per job. The jobs are added while the bridge is paused
    (SIGSTOP), as the SQL limit's are added before its clock starts; the clock starts
    when it resumes, with their NOTIFY waiting."""
    env = stack.env | {"LQJOBS_MAX_IN_FLIGHT": str(n + 10), "LQJOBS_LOG_LEVEL": "INFO"}
    log_path = stack.folder / "bridge-ceiling.log"
    log = log_path.open("wb")  # a fresh log: the start line of an earlier run must not count
    bridge = subprocess.Popen(
        [sys.executable, "-m", "lqjobs", "bridge"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: "bridge started" in log_path.read_text(),
            60,
            "the bridge to start",
        )
        bridge.send_signal(signal.SIGSTOP)
        add_jobs(url, n, None)
        cpu_before, started = cpu_seconds(bridge.pid), time.monotonic()
        bridge.send_signal(signal.SIGCONT)
        wait_until(lambda: locked(url) == n, 300, f"{n} jobs dispatched")
        elapsed, cpu = time.monotonic() - started, cpu_seconds(bridge.pid) - cpu_before
    finally:
        bridge.terminate()
        bridge.wait(30)
        log.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM app_jobs.jobs")
    redis_client = Redis.from_url(stack.env["LQJOBS_BROKER_URL"])
    redis_client.flushdb()  # the messages nobody consumed
    redis_client.close()
    return n / elapsed, cpu / n * 1000


def locked(url: str) -> int:
    row = _probe(url).execute("SELECT count(*) FROM app_jobs.jobs WHERE locked_by IS NOT NULL")
    found = row.fetchone()
    return int(found[0]) if found else 0


def measure(runs: int, fn: Callable[[], float]) -> list[float]:
    return [fn() for _ in range(runs)]


def row(name: str, values: list[float], unit: str, limit: float | None) -> str:
    med = statistics.median(values)
    ratio = f"{med / limit:5.2f}x" if limit else "     "
    digits = 2 if abs(med) < 10 else 1  # CPU per job is a fraction of a millisecond
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return f"{name:<44} {med:9.{digits}f} {unit:<7} ({low}-{high})  {ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000, help="no-op jobs end to end")
    parser.add_argument("--slow-jobs", type=int, default=2000, help="50 ms jobs end to end")
    parser.add_argument(
        "--dispatch-jobs",
        type=int,
        default=2000,
        help="jobs for the SQL limit and the dispatch ceiling (the same number for both)",
    )
    parser.add_argument("--runs", type=int, default=3)
    # The recommended setup for HTTP-bound work: thread pool, 8 threads per process, one
    # process per core plus one (docs/performance.md: the extra process fills the time the
    # others' threads spend waiting for their GIL).
    parser.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    parser.add_argument(
        "--workers", type=int, default=(os.cpu_count() or 1) + 1, help="worker processes"
    )
    parser.add_argument(
        "--memory-jobs",
        type=int,
        default=100_000,
        help="jobs for the RSS growth row (0 skips it)",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lqjobs-bench-"))
    folder.chmod(0o755)
    pg = EmbeddedPostgres(folder / "pg", durable=True)
    redis = EmbeddedRedis(folder / "redis")
    pg.start()
    redis.start()
    try:
        migrate.migrate(pg.url)
        print(
            f"lqjobs bench: {args.jobs} no-op jobs, {args.slow_jobs} 50 ms jobs, SQL limit and "
            f"dispatch ceiling over {args.dispatch_jobs}, {args.runs} runs, worker threads "
            f"{args.concurrency} x {args.workers} processes, RSS over {args.memory_jobs} jobs, "
            f"Postgres fsync on, logs in {folder}",
            flush=True,
        )
        n = args.dispatch_jobs
        sql1 = measure(args.runs, lambda: sql_drain(pg.url, n, 1))
        sql8 = measure(args.runs, lambda: sql_drain(pg.url, n, 8))
        sql8_walk = measure(args.runs, lambda: sql_drain(pg.url, n, 8, walk_index=True))
        stack = Stack(pg.url, redis.url, folder, args.concurrency, args.workers)
        ceiling = [dispatch_ceiling(stack, pg.url, n) for _ in range(args.runs)]
        # With nobody consuming, each get_job walks past every job locked so far: the
        # ceiling falls as the pile grows (in service the in-flight cap bounds it).
        big_pile = [dispatch_ceiling(stack, pg.url, args.jobs)[0] for _ in range(args.runs)]
        stack.start_plain_celery()
        try:
            celery_alone(redis.url, 200)  # warm-up
            plain = measure(args.runs, lambda: celery_alone(redis.url, args.jobs))
        finally:
            stack.stop_plain_celery()
        stack.start()
        try:
            groups = stack.cpu_groups({"postgres": pg.pid or 0, "redis": redis.pid or 0})
            end_to_end(stack, pg.url, 200, None, groups)  # warm-up: imports, pools, connections
            e2e_runs = [
                end_to_end(stack, pg.url, args.jobs, None, groups) for _ in range(args.runs)
            ]
            slow_runs = [
                end_to_end(stack, pg.url, args.slow_jobs, {"sleep": 0.05}, groups)
                for _ in range(args.runs)
            ]
            single = measure(args.runs, lambda: one_at_a_time(stack, pg.url, 100, {"sleep": 0.05}))
            lat = [latency(stack, pg.url, 200, 0.02) for _ in range(args.runs)]
            late = [delayed_latency(stack, pg.url, 100, 0.5) for _ in range(args.runs)]
            retry = [retry_latency(stack, pg.url, 50) for _ in range(args.runs)]
            growth = memory_growth(stack, pg.url, args.memory_jobs) if args.memory_jobs else {}
        finally:
            stack.stop()
        limit = statistics.median(sql8)
        print(f"{'figure':<44} {'median':>9} {'unit':<7} (min-max)       vs SQL x8")
        print(row("SQL limit: get_job+complete_job, 1 conn", sql1, "jobs/s", limit))
        print(row("SQL limit: get_job+complete_job, 8 conns", sql8, "jobs/s", limit))
        print(row("  the same, sessions walking the job index", sql8_walk, "jobs/s", limit))
        print(
            row(
                "dispatch ceiling: bridge alone, no consumer",
                [c for c, _ in ceiling],
                "jobs/s",
                limit,
            )
        )
        print(row(f"  the same over {args.jobs} jobs (a bigger pile)", big_pile, "jobs/s", limit))
        print(row("bridge CPU per job (dispatch ceiling)", [ms for _, ms in ceiling], "ms", None))
        print(row("Celery alone: no-op task, same workers", plain, "tasks/s", limit))
        print(
            row("end to end, no-op function (Knative)", [r for r, _ in e2e_runs], "jobs/s", limit)
        )
        for name in e2e_runs[0][1]:
            label = f"  no-op e2e CPU per job: {name}"
            print(row(label, [account[name] for _, account in e2e_runs], "ms", None))
        print(
            row("end to end, 50 ms function (Knative)", [r for r, _ in slow_runs], "jobs/s", limit)
        )
        print(row("  one at a time (get, call, complete), 50 ms", single, "jobs/s", limit))
        gain = statistics.median(r for r, _ in slow_runs) / statistics.median(single)
        print(f"{'  50 ms: end to end / one at a time':<44} {gain:9.1f} x       (medians)")
        print(row("latency add_job -> function called, p50", [p50 for p50, _ in lat], "ms", None))
        print(row("latency add_job -> function called, p99", [p99 for _, p99 in lat], "ms", None))
        print(
            row("delayed job: called after its run_at, p50", [p50 for p50, _ in late], "ms", None)
        )
        print(
            row("delayed job: called after its run_at, p99", [p99 for _, p99 in late], "ms", None)
        )
        print(row("retry: called after its back-off, p50", [p50 for p50, _ in retry], "ms", None))
        print(row("retry: called after its back-off, p99", [p99 for _, p99 in retry], "ms", None))
        for name, (first, last) in growth.items():
            label = f"RSS growth {name} ({first:.0f} -> {last:.0f} MB)"
            print(row(label, [last - first], "MB", None))
    finally:
        pg.stop()
        redis.stop()


if __name__ == "__main__":
    main()
