"""The scenarios of reliability.md, section 7: each runs once protected and, where a
protection can be switched off, once more without it (the negative control)."""

from __future__ import annotations

import base64
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg

from lqjobs import tokens
from lqjobs.db import RawJson
from lqjobs.embedded import wait_until
from lqjobs.lease import Lease
from tests.chaos.cluster import CALLBACK_KEYS, TENANT, WORKER_OPTIONS, Cluster, Component, Run
from tests.chaos.oracle import Tally, job_states, judge, wait_quiescent
from tests.chaos.scoreboard import Bounds, Result, Row
from tests.job_sink import install_sink, sunk, whole_seconds


@dataclass(frozen=True)
class Scale:
    """1.0: the full run; the quick subset inside pytest uses less."""

    factor: float = 1.0

    def jobs(self, full: int, least: int = 20) -> int:
        return max(least, int(full * self.factor))


def sabotage(protected: bool, *protections: str) -> dict[str, str]:
    return {} if protected else {"CHAOS_SABOTAGE": ",".join(protections)}


def killed(*components: Component) -> list[float]:
    """Times of the SIGKILLs the components suffered (self-inflicted faults)."""
    return [at for c in components for at, code in c.unplanned_exits if code == -9]


def finish(
    run: Run,
    ids: list[int],
    fault_times: list[float] | Callable[[], list[float]],
    *,
    timeout: float = 120,
    stall: float = 15,
    genuine_failures: Mapping[int, int] | None = None,
    expect_parked: tuple[int, ...] | list[int] = (),
    checks: dict[str, bool] | None = None,
    faults: int | None = None,
) -> Result:
    """Wait for quiescence, stop every component, and judge the run."""
    quiet_at = wait_quiescent(run.db_url, ids, timeout, stall)
    run.stop_components()
    if callable(fault_times):
        fault_times = fault_times()
    time.sleep(0.3)  # a call answered as the worker stopped is in the log by now
    tally = judge(
        run.db_url,
        ids,
        run.functions.calls.all(),
        genuine_failures=genuine_failures,
        expect_parked=expect_parked,
    )
    last_fault = max(fault_times, default=run.started)  # continuous faults: from the start
    recovery = None
    if quiet_at is not None:
        recovery = max(0.0, quiet_at - last_fault)
    return Result(
        tally,
        len(fault_times) if faults is None else faults,
        recovery,
        checks or {},
    )


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
    )


# -- R03: the broker goes away during publishes ---------------------------------------


def r03(cluster: Cluster, scale: Scale) -> Row:
    outages = 3 if scale.factor >= 1 else 1
    with cluster.run("R03") as run:
        run.spawn("worker")
        run.spawn("bridge")
        ids = run.add_jobs("noop", [{"warmup": i} for i in range(20)])
        wait_quiescent(run.db_url, ids, 60)
        untouched, ends = True, []
        for outage in range(outages):
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
        return_row = finish(
            run, ids, ends, checks={"no lock and no attempt while the broker was down": untouched}
        )
    return Row("R03", f"F3 Redis down during publish ({outages} x 8 s)", return_row, Bounds())


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
                cluster.restart_redis_empty()
                faults.append(time.monotonic())
            return finish(run, ids, faults, stall=10)

    bound = kills * concurrency * 2
    return Row(
        "R04",
        f"F4 Redis SIGKILL, restarted empty (x{kills})",
        once(True),
        Bounds(duplicated=bound, attempts_burned=bound, recovery=20),
        once(False),
        "reconciler off",
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
    )


def wait_for_calls(run: Run, calls: int) -> None:
    wait_until(lambda: len(run.functions.calls) >= calls, 120, f"{calls} calls")


def locked_count(run: Run) -> int:
    row = run.sql("SELECT count(*) FROM app_jobs.jobs WHERE locked_by IS NOT NULL")
    return int(row[0][0])


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


# -- R09-R11, R17: asynchronous callbacks ------------------------------------------------

ASYNC = {"LQJOBS_EXECUTOR": "openfaas-async"}


def r09(cluster: Cluster, scale: Scale) -> Row:
    n = scale.jobs(300, least=60)
    payloads = [{"callback_copies": 5 if i % 10 == 0 else 2} for i in range(n)]
    with cluster.run("R09", settings=ASYNC) as run:
        ids = run.add_jobs("asyncfn", payloads)
        run.spawn("callback")
        run.spawn("worker")
        run.spawn("bridge")
        result = finish(run, ids, [], stall=15)
        result.faults = sum(p["callback_copies"] - 1 for p in payloads)
        calls = run.functions.calls.all()
        result.checks["first callback accepted"] = all(c.callback_status == 200 for c in calls)
    return Row("R09", "F9 every callback x2 (x5 for 10 %)", result, Bounds())


def r10(cluster: Cluster, scale: Scale) -> Row:
    n = scale.jobs(200, least=40)
    late = set(range(0, n, 10))
    payloads = [{"callback_delay": 12, "late_calls": 1} if i in late else {} for i in range(n)]
    with cluster.run("R10", settings=ASYNC) as run:
        ids = run.add_jobs("asyncfn", payloads)
        late_ids = {ids[i] for i in late}
        run.spawn("callback")
        run.spawn("worker")
        run.spawn("bridge")
        quiet = wait_quiescent(run.db_url, ids, 120, 20)
        # the late callbacks land after their jobs were re-run and completed
        wait_until(
            lambda: (
                sum(1 for c in run.functions.calls.all() if c.job_id in late_ids and c.attempt == 1)
                >= len(late_ids)
            ),
            30,
            "the late callbacks",
        )
        result = finish(run, ids, [], stall=15, genuine_failures=dict.fromkeys(late_ids, 1))
        result.recovery = None if quiet is None else result.recovery
        stale = [
            c.callback_status
            for c in run.functions.calls.all()
            if c.job_id in late_ids and c.attempt == 1
        ]
        result.faults = len(late_ids)
        result.checks["late callbacks refused (409) or moot (200 already settled)"] = all(
            status in (200, 409) for status in stale
        )
    return Row(
        "R10",
        "F10 late callback after the job was re-run",
        result,
        Bounds(duplicated=len(late), attempts_burned=0),
    )


def r11(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        n = scale.jobs(100, least=30)
        forged = scale.jobs(2000, least=300)
        settings = ASYNC | {"JOBS_SUPPORT_ANY": "false", "JOBS_SUPPORTED": "asyncfn"}
        with cluster.run(
            f"R11{'' if protected else '-negative'}", settings=settings, least_privilege=protected
        ) as run:
            ids = run.add_jobs("asyncfn", [{"sleep": 0.5} for _ in range(n)])
            bait = run.add_jobs("bait", [{"bait": i} for i in range(20)])
            run.job_ids = ids
            victim = lock_bait(run, bait[:10])
            run.spawn("callback", **sabotage(protected, "unauthenticated_callbacks"))
            run.spawn("worker")
            run.spawn("bridge")
            before = bait_rows(run, bait)
            statuses = forge_callbacks(run, bait, victim, forged, cluster.seed)
            result = finish(run, ids, [], stall=15)
            result.faults = forged
            result.checks["forged callbacks change no row"] = bait_rows(run, bait) == before
            result.checks["every forged callback answered 4xx"] = all(
                400 <= s < 500 for s in statuses
            )
            result.notes = f"forged callbacks answered {dict(Counter(statuses))}"
            return result

    return Row(
        "R11",
        "F11 forged and replayed callbacks",
        once(True),
        Bounds(),
        once(False),
        "no callback authentication",
    )


def lock_bait(run: Run, bait: list[int]) -> list[Lease]:
    """Lock bait jobs under a lease nobody runs (as if a bridge held them)."""
    leases = []
    with psycopg.connect(run.db_url, autocommit=True) as conn:
        for _ in bait:
            job = run.jobs_db.get_job(conn, "bridge-victim-1", ["bait"], timedelta(hours=1))
            if job is not None:
                leases.append(Lease.of(job))
    return leases


def bait_rows(run: Run, bait: list[int]) -> list[tuple[Any, ...]]:
    return run.sql(
        "SELECT id, attempts, locked_by, locked_at, run_at, last_error FROM app_jobs.jobs "
        "WHERE id = ANY(%s) ORDER BY id",
        [bait],
    )


def forge_callbacks(
    run: Run, bait: list[int], victims: list[Lease], count: int, seed: int
) -> list[int]:
    """POST ``count`` forged callbacks; returns their status codes."""
    rng = random.Random(f"{seed}:R11")
    keys = tokens.CallbackKeys.parse(CALLBACK_KEYS)
    wrong_keys = tokens.CallbackKeys.parse("c1:" + "not-the-callback-signing-key-98765")
    base = f"http://127.0.0.1:{run.callback_port}/callback"
    expired = [
        tokens.sign(
            keys,
            Lease(v.job_id, v.worker_id, v.attempts, v.locked_at - timedelta(hours=2)),
            timedelta(seconds=30),
        )
        for v in victims
    ]
    leaked = [tokens.sign(keys, v, timedelta(hours=1)) for v in victims]
    statuses = []
    wait_until(lambda: _listening(run.callback_port), 30, "the callback service")
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            victim = rng.choice(victims)
            other = rng.choice([b for b in bait if b != victim.job_id])
            headers = {"X-Job-Id": str(victim.job_id), "X-Worker-Id": victim.worker_id}
            body = b'{"status": "success"}'
            kind = i % 7
            url = base
            if kind == 0:  # a job id and no token at all
                headers["X-Job-Id"] = str(rng.choice([*bait, rng.randrange(10**6)]))
            elif kind == 1:  # a leaked token of job A, sent for job B
                url = tokens.callback_url(base, leaked[victims.index(victim)])
                headers["X-Job-Id"] = str(other)
            elif kind == 2:  # a token with one signature bit flipped
                token = leaked[victims.index(victim)]
                url = tokens.callback_url(base, flip_bit(token, rng))
            elif kind == 3:  # an expired token of the right lease
                url = tokens.callback_url(base, expired[victims.index(victim)])
            elif kind == 4:  # signed with the wrong key
                url = tokens.callback_url(base, tokens.sign(wrong_keys, victim, timedelta(hours=1)))
            elif kind == 5:  # an oversized body
                body = b'{"status": "success", "pad": "' + b"x" * (128 * 1024) + b'"}'
            else:  # not JSON, and a junk token
                body = b"\x00\xffnot json{"
                url = f"{base}?token=v1.c1.{rng.randbytes(12).hex()}.{rng.randbytes(8).hex()}"
            try:
                statuses.append(client.post(url, content=body, headers=headers).status_code)
            except httpx.HTTPError:
                statuses.append(599)
    return statuses


def flip_bit(token: str, rng: random.Random) -> str:
    """The token with one bit of its signature flipped (decoded, not in the base64
    text, whose last character carries padding bits a decoder ignores)."""
    head, mac = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)))
    bit = rng.randrange(len(raw) * 8)
    raw[bit // 8] ^= 1 << (bit % 8)
    return f"{head}.{base64.urlsafe_b64encode(bytes(raw)).decode().rstrip('=')}"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def r17(cluster: Cluster, scale: Scale) -> Row:
    n = scale.jobs(200, least=50)

    def once(protected: bool) -> Result:
        payloads = [
            {"drop_callback": True} if i % 10 == 0 else {"unreachable": True} if i % 10 == 1 else {}
            for i in range(n)
        ]
        with cluster.run(
            f"R17{'' if protected else '-negative'}", settings=ASYNC, least_privilege=protected
        ) as run:
            good = run.add_jobs("asyncfn", [p for p in payloads if not p])
            dropped = run.add_jobs(
                "asyncfn", [p for p in payloads if "drop_callback" in p], max_attempts=2
            )
            unreachable = run.add_jobs(
                "asyncfn", [p for p in payloads if "unreachable" in p], max_attempts=2
            )
            run.spawn("callback", **sabotage(protected, "unauthenticated_callbacks"))
            run.spawn("worker", **sabotage(protected, "no_callback_deadline"))
            run.spawn("bridge")
            ids = good + dropped + unreachable
            result = finish(
                run,
                ids,
                [],
                stall=25,  # a deadline, a back-off and a deadline pass without progress
                expect_parked=dropped + unreachable,
                genuine_failures=dict.fromkeys(dropped + unreachable, 1),
            )
            result.faults = len(dropped) + len(unreachable)
            errors = dict(
                run.sql(
                    "SELECT id, coalesce(last_error, '') FROM app_jobs.jobs WHERE id = ANY(%s)",
                    [dropped + unreachable],
                )
            )
            result.checks["unreachable: failed by the header-less 503 callback"] = all(
                "503" in errors.get(i, "") for i in unreachable
            )
            result.checks["dropped: failed by the callback deadline"] = all(
                "callback not received" in errors.get(i, "") for i in dropped
            )
            return result

    return Row(
        "R17",
        "F19 callbacks lost (10 %) or header-less 503 (10 %)",
        once(True),
        # a function whose callback was lost ran; at-least-once runs it again
        Bounds(duplicated=len(range(0, n, 10))),
        once(False),
        "upstream callback server, no deadline",
    )


# -- R12: hanging functions and the status-code matrix ----------------------------------

RETRYABLE = (408, 425, 429, 500, 502, 503, 504, 404, 302)
PERMANENT = (400, 401, 403, 405, 410, 413, 415, 422)


def r12(cluster: Cluster, scale: Scale) -> Row:
    per = scale.jobs(8, least=3)
    with cluster.run("R12") as run:
        healthy = run.add_jobs("noop", [{"i": i} for i in range(scale.jobs(300, least=60))])
        by_code = {
            code: run.add_jobs(
                "status",
                [{"redirect": "http://127.0.0.1:9/"} if code == 302 else {"status": code}] * per,
                max_attempts=3,
            )
            for code in RETRYABLE + PERMANENT
        }
        hangs = run.add_jobs("hang", [{"hang": True}] * per, max_attempts=2)
        run.spawn("worker")
        run.spawn("bridge")
        failing = [i for ids in by_code.values() for i in ids] + hangs
        ids = healthy + failing
        genuine = {i: 2 for i in failing}
        result = finish(run, ids, [], stall=25, expect_parked=failing, genuine_failures=genuine)
        calls = Counter(c.job_id for c in run.functions.calls.all())
        result.faults = len(failing)
        result.checks["retryable codes: called max_attempts (3) times"] = all(
            calls[i] == 3 for code in RETRYABLE for i in by_code[code]
        )
        result.checks["permanent codes: called once"] = all(
            calls[i] == 1 for code in PERMANENT for i in by_code[code]
        )
        errors = dict(
            run.sql(
                "SELECT id, coalesce(last_error, '') FROM app_jobs.jobs WHERE id = ANY(%s)", [hangs]
            )
        )
        result.checks["hangs fail with a timeout"] = all(
            errors.get(i, "").startswith("timeout") for i in hangs
        )
    return Row(
        "R12",
        f"F12/F13 hangs + {len(RETRYABLE) + len(PERMANENT)} status codes",
        result,
        Bounds(attempts_burned=None),
    )


# -- R13: bad payloads and hostile task names --------------------------------------------


def r13(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        with (
            Canary("127.0.0.2") as canary,
            cluster.run(
                f"R13{'' if protected else '-negative'}",
                settings={"KNATIVE_SERVICE_URL": "svc.local"} if not protected else {},
                least_privilege=protected,
            ) as run,
        ):
            hostile_names = [
                "evil.com/x",
                "../admin",
                "a b",
                "UPPER",
                "x" * 126,
                f"127.0.0.2:{canary.port}/x?",
                f"127.0.0.2:{canary.port}#",
                f"user@127.0.0.2:{canary.port}",
                "169.254.169.254/latest/meta-data#",
            ]
            hostile = [run.add_jobs(name, [{}], max_attempts=2)[0] for name in hostile_names]
            oversized = run.add_jobs("noop", [{"pad": "x" * (2 * 1024 * 1024)}] * 3)
            odd = run.add_jobs("noop", [RawJson("[" * 3000 + "]" * 3000), {"nul": "\u0000"}])
            good = run.add_jobs("noop", [{"i": i} for i in range(40)]) if protected else []
            bridge = run.spawn("bridge")
            run.spawn("worker", **sabotage(protected, "task_name_in_url"))
            ids = hostile + oversized + odd + good
            result = finish(run, ids, [], stall=10, expect_parked=hostile + oversized)
            result.faults = len(hostile) + len(oversized) + len(odd)
            result.checks["the canary on 127.0.0.2 got no request"] = canary.hits == 0
            result.checks["the bridge never crashed"] = not bridge.unplanned_exits
            errors = dict(
                run.sql(
                    "SELECT id, coalesce(last_error, '') FROM app_jobs.jobs WHERE id = ANY(%s)",
                    [oversized],
                )
            )
            result.checks["oversized: failed by the bridge, never published"] = all(
                errors.get(i, "").startswith("payload too large") for i in oversized
            )
            return result

    return Row(
        "R13",
        "F14/F15 bad payloads + hostile task names",
        once(True),
        Bounds(attempts_burned=None),
        once(False),
        "task name in the URL",
    )


class Canary:
    """An attacker's listener: counts every request, whatever its method or path."""

    def __init__(self, host: str) -> None:
        self.hits = 0
        canary = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one_request(self) -> None:
                self.raw_requestline = self.rfile.readline(65537)
                if self.raw_requestline:
                    canary.hits += 1
                    self.wfile.write(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                self.close_connection = True

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# -- R14: clock skew --------------------------------------------------------------------


def faketime(offset: str) -> dict[str, str]:
    import libfaketime

    library = Path(libfaketime.__file__).parent / "vendor/libfaketime/src/libfaketime.so.1"
    return {
        "LD_PRELOAD": str(library),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }


def r14(cluster: Cluster, scale: Scale) -> Row:
    results = []
    for offset in ("+2h", "-2h"):
        n = scale.jobs(300, least=60)
        with cluster.run(f"R14{offset}", settings=faketime(offset)) as run:
            ids = run.add_jobs("noop", [{"i": i} for i in range(n)])
            async_ids = run.add_jobs("asyncfn", [{"i": i} for i in range(n // 3)])
            run.spawn("callback")
            run.spawn("worker", LQJOBS_TASK_EXECUTORS='{"asyncfn": "openfaas-async"}')
            run.spawn("bridge")
            result = finish(run, ids + async_ids, [], stall=15)
            result.checks[f"{offset}: no callback token refused"] = all(
                c.callback_status == 200 for c in run.functions.calls.all() if c.route != "knative"
            )
            result.preconditions[f"{offset}: the processes' clock really was skewed"] = skewed(
                run.env("bridge"), offset
            )
            results.append(result)
    merged = merge(results)
    merged.faults = 2
    return Row("R14", "F16 bridge, worker, callback at +2 h and -2 h", merged, Bounds())


def skewed(env: dict[str, str], offset: str) -> bool:
    """Whether a process started with ``env`` sees its clock ``offset`` away."""
    seen = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    hours = float(seen.stdout) - time.time()
    return abs(hours - (2 * 3600 if offset.startswith("+") else -2 * 3600)) < 60


def merge(results: list[Result]) -> Result:
    tally = Tally()
    for r in results:
        for name in (
            "jobs",
            "completed",
            "parked",
            "lost",
            "duplicated",
            "overlapping",
            "stranded",
            "attempts_burned",
        ):
            setattr(tally, name, getattr(tally, name) + getattr(r.tally, name))
        tally.lost_ids += r.tally.lost_ids
    recoveries = [r.recovery for r in results]
    return Result(
        tally,
        sum(r.faults for r in results),
        None if None in recoveries else max(x for x in recoveries if x is not None),
        {k: v for r in results for k, v in r.checks.items()},
        {k: v for r in results for k, v in r.preconditions.items()},
    )


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
        result = finish(run, ids, terms, stall=15)
        bad = {c.name: [code for code in c.exit_codes if code] for c in order}
        bad = {name: codes for name, codes in bad.items() if codes}
        result.checks["every SIGTERM ended in exit 0"] = not bad
        result.notes = f"non-zero exits {bad}" if bad else ""
    return Row("R15", "F17 rolling SIGTERM of every component", result, Bounds())


def count_left(run: Run, ids: list[int]) -> int:
    row = run.sql("SELECT count(*) FROM app_jobs.jobs WHERE id = ANY(%s)", [ids])
    return int(row[0][0])


# -- R16: the scheduler dies ----------------------------------------------------------------


def r16(cluster: Cluster, scale: Scale) -> Row:
    kills = 10 if scale.factor >= 1 else 4
    with cluster.run("R16") as run:
        install_sink(run.db_url)
        with psycopg.connect(run.db_url, autocommit=True) as conn:
            run.jobs_db.add_scheduled_job(conn, TENANT, "sink-tick", {}, {"rule": "*/1 * * * * *"})
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
    result = Result(tally, kills, 0.0, notes=f"{missed} ticks missed while down")
    # node-schedule's policy: no catch-up for ticks missed while no scheduler ran
    result.checks[f"missed ticks only while down ({missed} <= {kills * 3})"] = missed <= kills * 3
    return Row("R16", f"F18 scheduler SIGKILL x{kills}, a tick every second", result, Bounds())


def _ticks(run: Run) -> list[Any]:
    with psycopg.connect(run.db_url, autocommit=True) as conn:
        return sunk(conn, "sink-tick")


# -- S-ROLE, S-LOG: least privilege and redaction -------------------------------------

DENIED = {
    "CREATE TABLE in app_jobs": "CREATE TABLE app_jobs.chaos_probe (id int)",
    "CREATE TABLE in public": "CREATE TABLE public.chaos_probe (id int)",
    "TRUNCATE jobs": "TRUNCATE app_jobs.jobs",
    "ALTER TABLE jobs": "ALTER TABLE app_jobs.jobs ADD COLUMN chaos_probe int",
    "DROP FUNCTION": "DROP FUNCTION app_jobs.add_job",
    "SELECT another schema": "SELECT * FROM private.secrets",
    "release_jobs": "SELECT app_jobs.release_jobs('bridge-x-1')",
}


def s_role(cluster: Cluster, scale: Scale) -> Row:
    """Every protected run above connected its components as ``lqjobs grant`` logins;
    here each login tries what none may do."""
    denied = allowed = 0
    with cluster.run("S-ROLE") as run:
        run.sql("CREATE SCHEMA private; CREATE TABLE private.secrets AS SELECT 1 AS s")
        for component, url in run.role_urls.items():
            for what, statement in DENIED.items():
                try:
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute(statement)  # type: ignore[arg-type]
                    allowed += 1
                    print(f"S-ROLE: {component} was allowed: {what}", flush=True)
                except psycopg.errors.InsufficientPrivilege:
                    denied += 1
        superusers = run.sql(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s) AND (rolsuper OR rolcreaterole "
            "OR rolcreatedb OR rolbypassrls)",
            [[run.user(c) for c in run.role_urls]],
        )
    result = Result(Tally(), 0, 0.0, notes=f"denied x{denied}")
    result.checks["every forbidden statement denied (42501)"] = allowed == 0 and denied > 0
    result.checks["no login is superuser or may create roles"] = superusers[0][0] == 0
    result.checks["protected runs used least-privilege logins"] = cluster.least_privilege_runs > 0
    result.notes += f"; {cluster.least_privilege_runs} runs under least privilege"
    return Row("S-ROLE", "S6 least-privilege roles", result, Bounds(attempts_burned=None))


CANARY = "CANARY"


def s_log(cluster: Cluster, scale: Scale) -> Row:
    """A run at DEBUG with canaries in every payload, then a grep of every component
    log of the whole chaos run (the callback key and the database password of every
    run are canaries too)."""
    debug = {"LQJOBS_LOG_LEVEL": "DEBUG", "LQJOBS_TASK_EXECUTORS": '{"asyncfn": "openfaas-async"}'}
    with cluster.run("S-LOG", settings=debug) as run:
        secret = {"token": f"{CANARY}-3"}
        ids = run.add_jobs("noop", [secret] * 20)
        ids += run.add_jobs("asyncfn", [secret] * 10)
        ids += run.add_jobs("failing", [secret | {"status": 400}] * 5)
        with psycopg.connect(run.db_url, autocommit=True) as conn:
            run.jobs_db.add_scheduled_job(conn, TENANT, "ticker", secret, {"rule": "*/1 * * * * *"})
        worker_options = (*WORKER_OPTIONS, "--loglevel", "DEBUG", "--hostname", "worker@%h")
        run.spawn("worker", "worker", *worker_options)
        run.spawn("bridge")
        run.spawn("callback")
        run.spawn("scheduler", LQJOBS_SCHEDULER_ID="chaos-scheduler")
        result = finish(run, ids, [], stall=15, expect_parked=ids[30:])
        calls = (run.logs / "calls.jsonl").read_text()
    logs = [
        path
        for path in (cluster.root / "logs").rglob("*.log")
        if path.name.split(".")[0].split("-")[0] in ("bridge", "worker", "callback", "scheduler")
    ]
    leaks = [str(path.relative_to(cluster.root)) for path in logs if CANARY in path.read_text()]
    result.preconditions["payload canaries reached the functions (the grep can find them)"] = (
        f"{CANARY}-3" in calls and "token=" in calls
    )
    result.checks[f"no component log shows a canary ({len(logs)} logs)"] = not leaks
    result.notes = f"{len(logs)} logs, {len(leaks)} with a canary {leaks[:3]}"
    result.tally = Tally(
        jobs=len(ids), completed=result.tally.completed, parked=result.tally.parked
    )
    return Row(
        "S-LOG", "S4 canary grep over every log, DEBUG", result, Bounds(attempts_burned=None)
    )


SCENARIOS: dict[str, Callable[[Cluster, Scale], Row]] = {
    "R01": r01,
    "R02": r02,
    "R03": r03,
    "R04": r04,
    "R05": r05,
    "R06": r06,
    "R07": r07,
    "R08": r08,
    "R09": r09,
    "R10": r10,
    "R11": r11,
    "R12": r12,
    "R13": r13,
    "R14": r14,
    "R15": r15,
    "R16": r16,
    "R17": r17,
    "S-ROLE": s_role,
    "S-LOG": s_log,  # last: it greps the logs of every run before it
}
QUICK = ("R02", "R04", "R06", "R11", "R13")
