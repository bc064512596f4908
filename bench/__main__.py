"""``python -m bench``: throughput and latency of lqjobs against the raw SQL limit.

Starts its own Postgres servers (fsync on; ``--postgres``: the stock one from a
system install, the embedded wheel's, both, or a URL), a Redis from its wheel, a
function server, Celery workers and a bridge, each in its own process, and prints
one table with a column per server. Every figure is the median of ``--runs`` runs
(min-max beside it), and each server's SQL limit is measured in the same run, so
ratios compare like with like. ``--quick``: small sizes, for CI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from redis import Redis

from bench import cpu, servers
from bench.servers import Server
from bench.table import Column, Figure, median, render
from lqjobs.db.queue import Queue
from lqjobs.executors import Done, Invocation, build_router, make_http_client
from lqjobs.ops import migrate
from lqjobs.ops.dev import worker_argv
from lqjobs.ops.embedded import EmbeddedRedis, free_port, wait_until
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


def probe_backends(url: str) -> list[int]:
    """The backend serving the bench's polls: its CPU is the bench client's."""
    return [_probe(url).info.backend_pid]


def close_probe(url: str) -> None:
    _probe(url).close()
    _probe.cache_clear()


def p50_p99(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[max(int(len(ordered) * 0.99) - 1, 0)]


def drained(url: str) -> bool:
    row = _probe(url).execute("SELECT NOT EXISTS (SELECT FROM app_jobs.jobs)").fetchone()
    return bool(row and row[0])


def sql_drain(url: str, n: int, connections: int, walk_index: bool = False) -> float:
    """The raw SQL limit: get_job + complete_job in a loop, no Celery, no HTTP;
    ``walk_index``: on sessions with sorting disabled, so that get_job walks its
    index on every call, as it does inside the bridge's lock statement."""
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
            argv[argv.index("-A") + 1] = "bench.celery_alone"
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
    cpu_before = cpu.snapshot(groups, probe_backends(url))
    started = time.monotonic()
    add_jobs(url, n, payload)
    wait_until(lambda: drained(url), 600, f"{n} jobs to complete")
    elapsed = time.monotonic() - started
    cpu_ms = cpu.per_job_ms(cpu_before, cpu.snapshot(groups, probe_backends(url)), n)
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
    return p50_p99(called_after(stack, committed))


def called_after(stack: Stack, since: dict[int, float]) -> list[float]:
    """Milliseconds from ``since[job id]`` to the first call of each of those jobs."""
    first: dict[int, float] = {}
    for call in stack.calls():
        if call["job_id"] in since:
            first[call["job_id"]] = min(first.get(call["job_id"], math.inf), call["started"])
    return [(started - since[job_id]) * 1000 for job_id, started in first.items()]


def idle_latency(
    stack: Stack, url: str, n: int, groups: dict[str, list[int]]
) -> tuple[float, float, dict[str, float]]:
    """add_job commit -> function called on an idle queue (ms p50, p99): each job is
    added once the one before has completed, so the bridge waits in LISTEN and every
    job costs a whole lock pass; and CPU milliseconds per job by component."""
    jobs_db = Queue()
    committed: dict[int, float] = {}
    cpu_before = cpu.snapshot(groups, probe_backends(url))
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(n):
            job = jobs_db.add_job(conn, TENANT, "noop", {})
            committed[job.id] = time.monotonic()  # autocommit: returned = committed
            wait_until(lambda: drained(url), 30, "an idle-queue job to complete")
    account = cpu.per_job_ms(cpu_before, cpu.snapshot(groups, probe_backends(url)), n)
    return *p50_p99(called_after(stack, committed)), account


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
    return p50_p99(called_after(stack, due))


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
    return p50_p99(
        [
            (second["started"] - first["ended"] - math.e) * 1000
            for first, second in (sorted(c, key=lambda c: c["started"])[:2] for c in calls.values())
        ]
    )


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


@dataclass(frozen=True)
class Plan:
    """How much the bench measures on each server: jobs per figure, runs, workers."""

    jobs: int = 5000  # no-op jobs end to end, and the dispatch ceiling's bigger pile
    slow_jobs: int = 2000  # 50 ms jobs end to end
    dispatch_jobs: int = 2000  # the SQL limit's and the dispatch ceiling's
    runs: int = 3
    memory_jobs: int = 100_000  # 0 skips the RSS rows
    # The recommended setup for HTTP-bound work: thread pool, 8 threads per process, one
    # process per core plus one (docs/performance.md: the extra process fills the time the
    # others' threads spend waiting for their GIL).
    concurrency: int = 8
    workers: int = (os.cpu_count() or 1) + 1
    latency_jobs: int = 200  # one every 20 ms
    idle_jobs: int = 100  # each added once the one before completed
    delayed_jobs: int = 100
    retry_jobs: int = 50
    one_at_a_time_jobs: int = 100
    warmup_jobs: int = 200  # celery alone's and end to end's, before their clocks


# A short bench on every server for CI: each row measured once, on small piles.
QUICK = Plan(
    jobs=300,
    slow_jobs=150,
    dispatch_jobs=300,
    runs=1,
    memory_jobs=0,
    latency_jobs=50,
    idle_jobs=20,
    delayed_jobs=20,
    retry_jobs=10,
    one_at_a_time_jobs=20,
    warmup_jobs=50,
)
OVERRIDABLE = (
    "jobs",
    "slow_jobs",
    "dispatch_jobs",
    "runs",
    "memory_jobs",
    "concurrency",
    "workers",
)
LIMIT_LABEL = "SQL limit: get_job+complete_job, 8 conns"
COMPONENTS = (
    "bridge",
    "Celery workers",
    "function server",
    "postgres",
    "redis",
    "bench client",
    "idle",
)


def repeat(plan: Plan, fn: Callable[[], float]) -> list[float]:
    return [fn() for _ in range(plan.runs)]


def rate(label: str, values: Sequence[float], unit: str = "jobs/s") -> Figure:
    return Figure(label, unit, values, vs_limit=True)


def ms(label: str, values: Sequence[float]) -> Figure:
    return Figure(label, "ms", values)


def sql_limit_figures(url: str, plan: Plan) -> list[Figure]:
    n = plan.dispatch_jobs
    return [
        rate("SQL limit: get_job+complete_job, 1 conn", repeat(plan, lambda: sql_drain(url, n, 1))),
        rate(LIMIT_LABEL, repeat(plan, lambda: sql_drain(url, n, 8))),
        rate(
            "  the same, sessions walking the job index",
            repeat(plan, lambda: sql_drain(url, n, 8, walk_index=True)),
        ),
    ]


def dispatch_figures(stack: Stack, url: str, plan: Plan) -> list[Figure]:
    ceiling = [dispatch_ceiling(stack, url, plan.dispatch_jobs) for _ in range(plan.runs)]
    # With nobody consuming, each get_job walks past every job locked so far: the
    # ceiling falls as the pile grows (in service the in-flight cap bounds it).
    big_pile = repeat(plan, lambda: dispatch_ceiling(stack, url, plan.jobs)[0])
    return [
        rate("dispatch ceiling: bridge alone, no consumer", [rate for rate, _ in ceiling]),
        rate(f"  the same over {plan.jobs} jobs (a bigger pile)", big_pile),
        ms("bridge CPU per job (dispatch ceiling)", [cpu_ms for _, cpu_ms in ceiling]),
    ]


def celery_alone_figures(stack: Stack, redis_url: str, plan: Plan) -> list[Figure]:
    stack.start_plain_celery()
    try:
        celery_alone(redis_url, plan.warmup_jobs)
        plain = repeat(plan, lambda: celery_alone(redis_url, plan.jobs))
    finally:
        stack.stop_plain_celery()
    return [rate("Celery alone: no-op task, same workers", plain, "tasks/s")]


def cpu_figures(prefix: str, accounts: Sequence[dict[str, float]]) -> list[Figure]:
    """A row per component; a component not measured (a remote server) has no values."""
    return [
        ms(f"{prefix}{name}", [account[name] for account in accounts if name in account])
        for name in COMPONENTS
    ]


def end_to_end_figures(
    stack: Stack, url: str, plan: Plan, groups: dict[str, list[int]]
) -> list[Figure]:
    end_to_end(stack, url, plan.warmup_jobs, None, groups)  # imports, pools, connections
    noop = [end_to_end(stack, url, plan.jobs, None, groups) for _ in range(plan.runs)]
    slow_payload = {"sleep": 0.05}
    slow = [end_to_end(stack, url, plan.slow_jobs, slow_payload, groups) for _ in range(plan.runs)]
    n = plan.one_at_a_time_jobs
    single = repeat(plan, lambda: one_at_a_time(stack, url, n, {"sleep": 0.05}))
    gain = median([r for r, _ in slow]) / median(single)
    return [
        rate("end to end, no-op function (Knative)", [r for r, _ in noop]),
        *cpu_figures("  no-op e2e CPU per job: ", [account for _, account in noop]),
        rate("end to end, 50 ms function (Knative)", [r for r, _ in slow]),
        rate("  one at a time (get, call, complete), 50 ms", single),
        Figure("  50 ms: end to end / one at a time", "x", [gain], note="(medians)"),
    ]


def latency_figures(
    stack: Stack, url: str, plan: Plan, groups: dict[str, list[int]]
) -> list[Figure]:
    idle = [idle_latency(stack, url, plan.idle_jobs, groups) for _ in range(plan.runs)]
    every_20ms = [latency(stack, url, plan.latency_jobs, 0.02) for _ in range(plan.runs)]
    late = [delayed_latency(stack, url, plan.delayed_jobs, 0.5) for _ in range(plan.runs)]
    retry = [retry_latency(stack, url, plan.retry_jobs) for _ in range(plan.runs)]
    postgres_ms = [account["postgres"] for *_, account in idle if "postgres" in account]
    return [
        ms("idle queue: add_job -> function called, p50", [p50 for p50, _, _ in idle]),
        ms("idle queue: add_job -> function called, p99", [p99 for _, p99, _ in idle]),
        ms("  idle queue: Postgres CPU per job", postgres_ms),
        ms("every 20 ms: add_job -> function called, p50", [p50 for p50, _ in every_20ms]),
        ms("every 20 ms: add_job -> function called, p99", [p99 for _, p99 in every_20ms]),
        ms("delayed job: called after its run_at, p50", [p50 for p50, _ in late]),
        ms("delayed job: called after its run_at, p99", [p99 for _, p99 in late]),
        ms("retry: called after its back-off, p50", [p50 for p50, _ in retry]),
        ms("retry: called after its back-off, p99", [p99 for _, p99 in retry]),
    ]


def memory_figures(stack: Stack, url: str, plan: Plan) -> list[Figure]:
    if not plan.memory_jobs:
        return []
    growth = memory_growth(stack, url, plan.memory_jobs)
    return [
        Figure(f"RSS growth: {name}", "MB", [last - first], note=f"({first:.0f} -> {last:.0f} MB)")
        for name, (first, last) in growth.items()
    ]


def timed(heading: str, what: str, measure: Callable[[], list[Figure]]) -> list[Figure]:
    """``measure()``, saying on stderr how long it took (the table comes at the end)."""
    started = time.monotonic()
    figures = measure()
    elapsed = time.monotonic() - started
    print(f"  {heading}: {what} took {elapsed:.1f} s", file=sys.stderr, flush=True)
    return figures


def stack_figures(
    stack: Stack, server: Server, redis: EmbeddedRedis, plan: Plan, heading: str
) -> list[Figure]:
    """Everything measured through the whole stack: bridge, workers, function."""
    measured = {"redis": redis.pid or 0}
    if server.postmaster_pid is not None:
        measured = {"postgres": server.postmaster_pid, **measured}
    stack.start()
    try:
        groups = stack.cpu_groups(measured)
        url = server.url
        return [
            *timed(heading, "end to end", lambda: end_to_end_figures(stack, url, plan, groups)),
            *timed(heading, "latency", lambda: latency_figures(stack, url, plan, groups)),
            *timed(heading, "memory", lambda: memory_figures(stack, url, plan)),
        ]
    finally:
        stack.stop()


def measure_server(
    server: Server, heading: str, redis: EmbeddedRedis, folder: Path, plan: Plan
) -> Column:
    """Every row on one server, its own SQL limit included; ``folder``: its logs."""
    folder.mkdir(parents=True, exist_ok=True)
    flush_redis(redis.url)
    url = server.url
    probe_backends(url)  # the poll connection, open before any CPU account
    try:
        figures = timed(heading, "SQL limit", lambda: sql_limit_figures(url, plan))
        stack = Stack(url, redis.url, folder, plan.concurrency, plan.workers)
        figures += timed(heading, "dispatch", lambda: dispatch_figures(stack, url, plan))
        figures += timed(
            heading, "Celery alone", lambda: celery_alone_figures(stack, redis.url, plan)
        )
        figures += stack_figures(stack, server, redis, plan, heading)
    finally:
        close_probe(server.url)
    limit = median(next(figure.values for figure in figures if figure.label == LIMIT_LABEL))
    return Column(heading, figures, limit)


def flush_redis(url: str) -> None:
    client = Redis.from_url(url)
    client.flushdb()
    client.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--postgres",
        type=servers.parse_choice,
        default=None,
        metavar="stock|embedded|both|URL",
        help="the servers to measure, a column each (default: stock, else embedded)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a short bench for CI")
    parser.add_argument("--jobs", type=int, help="no-op jobs end to end (5000)")
    parser.add_argument("--slow-jobs", type=int, help="50 ms jobs end to end (2000)")
    parser.add_argument(
        "--dispatch-jobs",
        type=int,
        help="jobs for the SQL limit and the dispatch ceiling, the same for both (2000)",
    )
    parser.add_argument("--runs", type=int, help="runs per figure (3)")
    parser.add_argument("--concurrency", type=int, help="threads per worker (8)")
    parser.add_argument("--workers", type=int, help="worker processes (one per core plus one)")
    parser.add_argument(
        "--memory-jobs", type=int, help="jobs for the RSS growth rows, 0 skips them (100000)"
    )
    return parser.parse_args()


def plan_from(args: argparse.Namespace) -> Plan:
    """--quick's sizes or the defaults, with the sizes given on the command line."""
    given = {name: getattr(args, name) for name in OVERRIDABLE if getattr(args, name) is not None}
    return dataclasses.replace(QUICK if args.quick else Plan(), **given)


def intro(plan: Plan, folder: Path) -> str:
    return (
        f"lqjobs bench: {plan.jobs} no-op jobs, {plan.slow_jobs} 50 ms jobs, SQL limit and "
        f"dispatch ceiling over {plan.dispatch_jobs}, {plan.runs} runs, worker threads "
        f"{plan.concurrency} x {plan.workers} processes, RSS over {plan.memory_jobs} jobs, "
        f"logs in {folder}"
    )


def main() -> None:
    args = parse_args()
    plan = plan_from(args)
    kinds = servers.chosen(args.postgres)
    folder = Path(tempfile.mkdtemp(prefix="lqjobs-bench-"))
    folder.chmod(0o755)  # postgres runs as a non-root user when the bench runs as root
    with contextlib.ExitStack() as running:
        redis = EmbeddedRedis(folder / "redis")
        redis.start()
        running.callback(redis.stop)
        measured = [running.enter_context(servers.running(kind, folder)) for kind in kinds]
        for server in measured:
            migrate.migrate(server.url)
        descriptions = [servers.describe(server.url) for server in measured]
        print(intro(plan, folder))
        for server, description in zip(measured, descriptions, strict=True):
            print(servers.describe_line(server, description), flush=True)
        columns = [
            measure_server(server, heading, redis, folder / server.kind, plan)
            for server, heading in (
                (server, servers.heading(server, description))
                for server, description in zip(measured, descriptions, strict=True)
            )
        ]
    print("\n".join(render(columns)))


if __name__ == "__main__":
    main()
