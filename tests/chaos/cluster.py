"""The processes under test and the servers they need, for one chaos run.

A :class:`Cluster` owns a Postgres and a Redis of its own (scenarios restart and
kill them) and a migrated template database. Each scenario gets a :class:`Run`: a
fresh database, a function server that logs every call to ``calls.jsonl``, and the
real components as supervised subprocesses that a supervisor restarts when they
die, as Kubernetes would.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import redis

from lqjobs.db import JobsDB
from lqjobs.ops import migrate
from lqjobs.ops.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests.databases import database_url, recreate_database
from tests.least_privilege import granted_logins

ROOT = Path(__file__).resolve().parents[2]
TENANT = UUID("11111111-2222-3333-4444-555555555555")
TEMPLATE = "chaos_template"
# Canaries: no component log may ever show them (the S-LOG row greps for "CANARY").
CALLBACK_KEYS = "c1:" + "chaos-CANARY-2-callback-signing-key-0123456789"
DB_PASSWORD = "pw-CANARY-1"

# The timeout ladder of every run, short so that recoveries bounded by it are quick:
# T_http 1+2 s < soft 4 s < hard 5 s < V 8 s; wait 8 + V 8 + hard 5 = 21 s < E 30 s.
LADDER = {
    "LQJOBS_POLL_INTERVAL": "1",
    "LQJOBS_HTTP_CONNECT_TIMEOUT": "1",
    "LQJOBS_HTTP_TIMEOUT": "2",
    "LQJOBS_TASK_SOFT_TIME_LIMIT": "4",
    "LQJOBS_TASK_TIME_LIMIT": "5",
    "LQJOBS_VISIBILITY_TIMEOUT": "8",
    "LQJOBS_MAX_QUEUE_WAIT": "8",
    "LQJOBS_JOB_EXPIRY": "30",
    "LQJOBS_CALLBACK_DEADLINE": "6",
    # The in-flight cap bounds the queue wait: a few slots' worth per worker slot keeps
    # every message well inside MAX_QUEUE_WAIT, even while a worker restarts.
    "LQJOBS_MAX_IN_FLIGHT": "64",
}


# A line each component writes once it runs (and handles SIGTERM gracefully).
READY_MARKERS = {
    "bridge": "bridge started",
    "worker": "[queues]",  # the banner, which every log level prints
    "callback": "callback service listening",
    "scheduler": "scheduler started",
}


class Component:
    """One lqjobs process, restarted by a supervisor thread whenever it exits."""

    def __init__(
        self, role: str, name: str, env: dict[str, str], logs: Path, options: Sequence[str]
    ) -> None:
        self.role, self.name = role, name
        self.env, self.logs, self.options = env, logs, list(options)
        self.incarnation = 0
        self.unplanned_exits: list[tuple[float, int]] = []  # (monotonic time, return code)
        self.exit_codes: list[int] = []  # of the exits we asked for (SIGTERM)
        self.supervised = True
        self._lock = threading.Lock()
        self._planned = False
        self.proc = self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}.log"

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = self.env | {"CHAOS_COMPONENT": self.name, "CHAOS_INCARNATION": str(self.incarnation)}
        self.spawned_at = time.monotonic()
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.agent", self.role, *self.options],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _supervise(self) -> None:
        while True:
            code = self.proc.wait()
            with self._lock:
                if not self._planned:
                    self.unplanned_exits.append((time.monotonic(), code))
                elif code != -signal.SIGKILL:
                    self.exit_codes.append(code)
                self._planned = False
                if not self.supervised:
                    return
                time.sleep(0.2)  # a restart policy's small delay
                self.incarnation += 1
                self.proc = self._spawn()

    @property
    def own_exits(self) -> list[int]:
        """Return codes of the exits nothing asked for: neither the suite (a SIGKILL or
        SIGTERM it sent) nor a fault this component was told to inject (CHAOS_FAULT)."""
        injected = -signal.SIGKILL if "CHAOS_FAULT" in self.env else None
        with self._lock:
            return [code for _, code in self.unplanned_exits if code != injected]

    def send(self, signum: int, *, planned: bool = True) -> None:
        with self._lock:
            if self.proc.poll() is None:
                self._planned = planned and signum in (signal.SIGKILL, signal.SIGTERM)
                self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL; the supervisor starts the next incarnation."""
        self.send(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM (a graceful stop); the supervisor starts the next incarnation."""
        self.send(signal.SIGTERM)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the current incarnation has said it runs."""
        marker = READY_MARKERS[self.role]
        wait_until(
            lambda: self.output().count(marker) > self.incarnation, timeout, f"{self.name} ready"
        )

    def wait_restarted(self, after: int, timeout: float = 20) -> None:
        wait_until(lambda: self.incarnation > after, timeout, f"{self.name} to restart")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, no restart; SIGKILL after ``timeout``. Returns the exit code."""
        with self._lock:
            self.supervised = False
            self._planned = True
            proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        self._supervisor.join(5)
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """Postgres, Redis and a migrated template database for a whole chaos run."""

    def __init__(self, root: Path, seed: int, *, postgres_bin_dir: Path | None = None) -> None:
        """``postgres_bin_dir``: a system install's server (default: the embedded one)."""
        self.root = root
        self.seed = seed
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # postgres runs as a non-root user when we are root
        # durable: an immediate shutdown must not lose acknowledged commits (with
        # synchronous_commit off it does, and the oracle would blame lqjobs)
        self.pg = EmbeddedPostgres(root / "pg", durable=True, bin_dir=postgres_bin_dir)
        self.redis = EmbeddedRedis(root / "redis")
        self._names = itertools.count(1)
        self.least_privilege_runs = 0

    def start(self) -> Cluster:
        self.pg.start()
        self.redis.start()
        recreate_database(self.pg.url, TEMPLATE)
        migrate.migrate(database_url(self.pg.url, TEMPLATE))
        return self

    def stop(self) -> None:
        self.redis.stop()
        self.pg.stop()

    def new_database(self) -> str:
        name = f"chaos_{next(self._names)}"
        recreate_database(self.pg.url, name, TEMPLATE)
        return database_url(self.pg.url, name)

    def restart_postgres(self) -> None:
        """An immediate shutdown (SIGQUIT: no checkpoint, crash recovery on start)."""
        proc = self.pg._proc
        assert proc is not None
        proc.send_signal(signal.SIGQUIT)
        proc.wait(30)
        self.pg._proc = None
        self.pg.start()

    def stop_redis_saving(self) -> None:
        """SHUTDOWN SAVE: the broker is away, its queues kept on disk for the restart."""
        client = redis.Redis.from_url(self.redis.url)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(save=True)
        client.close()
        proc = self.redis._proc
        assert proc is not None
        proc.wait(30)
        self.redis._proc = None

    def restart_redis_empty(self, down_for: float = 0.0) -> None:
        """SIGKILL redis (no persistence) and start it again, empty, on the same port,
        ``down_for`` seconds later (a restart that takes time, as a pod's does)."""
        self.redis.kill()
        (self.redis.data_dir / "dump.rdb").unlink(missing_ok=True)  # from a SHUTDOWN SAVE
        time.sleep(down_for)  # the fault schedule: the broker's downtime
        self.redis.start()

    @contextmanager
    def run(
        self,
        name: str,
        *,
        settings: dict[str, str] | None = None,
        least_privilege: bool = True,
    ) -> Iterator[Run]:
        """A scenario's run; ``settings`` are environment variables for every component.
        With ``least_privilege`` each component connects as a login in its ``lqjobs
        grant`` role; negative controls emulating upstream behaviour run as the owner."""
        logs = self.root / "logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        client = redis.Redis.from_url(self.redis.url)
        client.flushdb()
        client.close()
        run = Run(self, name, self.new_database(), logs, settings or {})
        with contextlib.ExitStack() as stack:
            if least_privilege:
                logins = stack.enter_context(granted_logins(run.db_url, DB_PASSWORD))
                run.role_urls = dict(logins.urls)
                self.least_privilege_runs += 1
            stack.callback(run.close)  # first out: the processes stop before their roles go
            yield run


class Run:
    """One scenario's database, functions and components."""

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        db_url: str,
        logs: Path,
        settings: dict[str, str],
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.db_url = db_url
        self.logs = logs
        self.jobs_db = JobsDB()
        self.functions = FunctionServer(log_path=logs / "calls.jsonl").start()
        self.callback_port = free_port()
        self.components: dict[str, Component] = {}
        self.role_urls: dict[str, str] = {}  # least-privilege URLs, when the run uses them
        self.settings = settings
        self.started = time.monotonic()

    def env(self, role: str, **overrides: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LQJOBS_", "JOBS_", "PG", "INTERNAL_", "KNATIVE_", "CHAOS_"))
        }
        env.update(LADDER)
        env.update(
            {
                "DATABASE_URL": self.role_urls.get(role, self.db_url),
                "LQJOBS_BROKER_URL": self.cluster.redis.url,
                "JOBS_SUPPORT_ANY": "true",
                "HOSTNAME": "chaos",
                "LQJOBS_EXECUTOR": "knative",
                "LQJOBS_KNATIVE_INGRESS_URL": self.functions.url,
                "INTERNAL_GATEWAY_URL": self.functions.url,
                "INTERNAL_JOBS_CALLBACK_PORT": str(self.callback_port),
                "LQJOBS_CALLBACK_HOST": "127.0.0.1",
                "LQJOBS_CALLBACK_KEYS": CALLBACK_KEYS,
                "LQJOBS_LOG_LEVEL": "INFO",
                "CHAOS_SEED": str(self.cluster.seed),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.settings)
        env.update(overrides)
        if "openfaas-async" in env["LQJOBS_EXECUTOR"] + env.get("LQJOBS_TASK_EXECUTORS", ""):
            # asynchronous functions report through the callback service
            callback = f"http://127.0.0.1:{self.callback_port}/callback"
            env["INTERNAL_JOBS_CALLBACK_URL"] = callback
        return env

    def spawn(self, role: str, name: str | None = None, *options: str, **env: str) -> Component:
        name = name or role
        if role == "worker" and not options:
            options = (*WORKER_OPTIONS, "--hostname", f"{name}@%h")
        component = Component(role, name, self.env(role, **env), self.logs, options)
        self.components[name] = component
        return component

    def add_jobs(self, task: str, payloads: Sequence[Any], **options: Any) -> list[int]:
        with psycopg.connect(self.db_url, autocommit=True) as conn, conn.transaction():
            ids = [
                self.jobs_db.queue.add_job(conn, TENANT, task, payload, **options).id
                for payload in payloads
            ]
        return ids

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cursor = conn.execute(query, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def user(self, role: str) -> str | None:
        """The login ``role`` connects as (None: the owner)."""
        url = self.role_urls.get(role)
        return None if url is None else psycopg.conninfo.conninfo_to_dict(url).get("user")

    def stop_components(self) -> dict[str, int | None]:
        codes = {}
        for name, component in list(self.components.items()):
            codes[name] = component.stop()
        return codes

    def close(self) -> None:
        for component in self.components.values():
            if component.proc.poll() is None or component.supervised:
                component.stop(timeout=10)
        self.functions.stop()


WORKER_OPTIONS = (
    "--pool",
    "threads",
    "--concurrency",
    "16",
    "--loglevel",
    "WARNING",
    "--without-heartbeat",
    "--without-mingle",
    "--without-gossip",
)
