"""``lqjobs dev``: the whole stack on one laptop, with no servers installed.

Postgres and Redis come from the embedded wheels (data kept under ``--data-dir``
and reused) unless DATABASE_URL / PG* and LQJOBS_BROKER_URL are given. Then the
bridge, a Celery worker, the callback service, the scheduler, Flower and an
example function server run as child processes, a small demo is enqueued, and
the terminal shows its progress until Ctrl-C stops everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lqjobs import db
from lqjobs.errors import ConfigurationError
from lqjobs.logs import escaped
from lqjobs.ops import migrate
from lqjobs.ops.embedded import EmbeddedPostgres, EmbeddedRedis, die_with_parent, free_port
from lqjobs.settings import Settings, redact_url

DEMO_TENANT = "00000000-0000-0000-0000-0000000000de"
# task -> (executor, payload, how many)
DEMO_JOBS: dict[str, tuple[str, dict[str, Any], int]] = {
    "hello-knative": ("knative", {"sleep": 0.2}, 3),
    "hello-openfaas": ("openfaas", {"sleep": 0.2}, 3),
    "hello-async": ("openfaas-async", {"sleep": 0.5}, 3),
    "flaky": ("knative", {"fail_times": 1}, 1),  # fails once, retried on the SQL back-off
}
DEMO_SCHEDULE = ("tick", {"rule": "*/5 * * * * *"})  # every five seconds
ROLES = ("functions", "worker", "callback", "scheduler", "bridge", "flower")
DEFAULT_DATA_DIR = Path(".lqjobs")
# What another terminal sources to point lqjobs' commands at the running stack.
EXPORTS_FILE = "env.sh"
EXPORTED = (
    "DATABASE_URL",
    "LQJOBS_BROKER_URL",
    "JOBS_SUPPORT_ANY",
    "LQJOBS_EXECUTOR",
    "LQJOBS_TASK_EXECUTORS",
    "LQJOBS_KNATIVE_INGRESS_URL",
    "INTERNAL_GATEWAY_URL",
    "INTERNAL_JOBS_CALLBACK_URL",
    "LQJOBS_CALLBACK_KEYS",
)


@dataclass
class Servers:
    """Where the stack's Postgres and Redis are, and the embedded ones to stop."""

    database_url: str
    broker_url: str
    owned: list[EmbeddedPostgres | EmbeddedRedis] = field(default_factory=list)

    def stop(self) -> None:
        for server in reversed(self.owned):
            server.stop()


def start_servers(settings: Settings, data_dir: Path) -> Servers:
    """External servers when configured, embedded ones otherwise."""
    given = settings.model_fields_set
    servers = Servers("", "")
    if given & {"database_url", "pghost", "pgport", "pgdatabase", "pguser"}:
        servers.database_url = settings.conninfo()
    else:
        pg = EmbeddedPostgres(data_dir / "postgres")
        pg.start()
        servers.owned.append(pg)
        servers.database_url = pg.url
    if "broker_url" in given:
        servers.broker_url = settings.broker_url.get_secret_value()
    else:
        redis = EmbeddedRedis(data_dir / "redis")
        redis.start()
        servers.owned.append(redis)
        servers.broker_url = redis.url
    return servers


def reachable_data_dir(wanted: Path, out: TextIO) -> Path:
    """Postgres runs as an unprivileged user when we are root: it must reach the folder."""
    wanted = wanted.resolve()
    wanted.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or all(p.stat().st_mode & 0o001 for p in wanted.parents):
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:8]
    fallback = Path(tempfile.gettempdir()) / f"lqjobs-dev-{digest}"
    fallback.mkdir(mode=0o755, exist_ok=True)
    print(
        f"note: {wanted} is not reachable by the unprivileged user that runs Postgres "
        f"(we are root); keeping the data in {fallback}",
        file=out,
    )
    return fallback


def worker_argv(concurrency: int, *options: str) -> list[str]:
    """``celery -A lqjobs.app worker`` with the thread pool, right for HTTP-bound jobs."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "lqjobs.app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        *options,
    ]


class Stack:
    """The child processes, each logging to ``<data-dir>/logs/<role>.log``."""

    def __init__(self, env: dict[str, str], logs: Path, ports: dict[str, int]) -> None:
        self.env = env
        self.logs = logs
        self.ports = ports
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def commands(self) -> dict[str, list[str]]:
        python = sys.executable
        return {
            "functions": [
                python,
                "-m",
                "lqjobs.ops.example_functions",
                "--port",
                str(self.ports["functions"]),
            ],
            "worker": worker_argv(8, "--loglevel", "INFO", "--hostname", "dev@%h"),
            "callback": [python, "-m", "lqjobs", "callback"],
            "scheduler": [python, "-m", "lqjobs", "scheduler"],
            "bridge": [python, "-m", "lqjobs", "bridge"],
            "flower": [
                python,
                "-m",
                "celery",
                "-A",
                "lqjobs.app",
                "flower",
                f"--port={self.ports['flower']}",
                "--address=127.0.0.1",
            ],
        }

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for role, argv in self.commands().items():
            # Own sessions: Ctrl-C reaches only us, and we stop them in order.
            # Should we die anyway, they get SIGTERM instead of lingering.
            with (self.logs / f"{role}.log").open("ab") as log:
                self.procs[role] = subprocess.Popen(
                    argv,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=die_with_parent(signal.SIGTERM),
                )

    def dead(self) -> list[str]:
        return [role for role, proc in self.procs.items() if proc.poll() is not None]

    def stop(self) -> None:
        # Producers first (no new work), then the workers, then what serves them.
        for role in ("bridge", "scheduler", "worker", "callback", "flower", "functions"):
            proc = self.procs.get(role)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def child_environment(servers: Servers, ports: dict[str, int]) -> dict[str, str]:
    functions = f"http://127.0.0.1:{ports['functions']}"
    executors = {task: executor for task, (executor, _, _) in DEMO_JOBS.items()}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LQJOBS_", "JOBS_", "PG", "INTERNAL_", "KNATIVE_", "DATABASE_"))
    }
    env.update(
        {
            "DATABASE_URL": servers.database_url,
            "LQJOBS_BROKER_URL": servers.broker_url,
            "JOBS_SUPPORT_ANY": "true",
            "LQJOBS_EXECUTOR": "knative",
            "LQJOBS_TASK_EXECUTORS": json.dumps(executors),
            "LQJOBS_KNATIVE_INGRESS_URL": functions,
            "INTERNAL_GATEWAY_URL": functions,
            "INTERNAL_JOBS_CALLBACK_PORT": str(ports["callback"]),
            "INTERNAL_JOBS_CALLBACK_URL": f"http://127.0.0.1:{ports['callback']}/callback",
            "LQJOBS_CALLBACK_HOST": "127.0.0.1",
            "LQJOBS_CALLBACK_KEYS": f"dev:{secrets.token_hex(32)}",  # fresh per run
            "LQJOBS_POLL_INTERVAL": "5",
            "LQJOBS_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def write_exports(folder: Path, env: dict[str, str]) -> Path:
    """``folder/env.sh``: the stack's addresses (and its callback keys, so the file is
    the owner's alone) as shell exports, for `lqjobs status` and friends elsewhere."""
    path = folder / EXPORTS_FILE
    lines = [f"export {name}={shlex.quote(env[name])}\n" for name in EXPORTED if name in env]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("# written by `lqjobs dev` while it runs; removed when it stops\n")
        file.writelines(lines)
    return path


def print_exports(path: Path, env: dict[str, str], out: TextIO) -> None:
    shown = {name: redact_url(env[name]) for name in ("DATABASE_URL", "LQJOBS_BROKER_URL")}
    print(f"other terminals: . {shlex.quote(str(path))}   # or:", file=out)
    for name, value in shown.items():
        print(f"  export {name}={shlex.quote(value)}", file=out)
    print(flush=True, file=out)


def enqueue_demo(database_url: str) -> set[int]:
    jobs_db = db.JobsDB()
    with db.connect(database_url, autocommit=True) as conn, conn.transaction():
        ids = {
            jobs_db.queue.add_job(conn, DEMO_TENANT, task, {**payload, "n": n}).id
            for task, (_, payload, count) in DEMO_JOBS.items()
            for n in range(count)
        }
        task, schedule = DEMO_SCHEDULE
        jobs_db.scheduled.add_scheduled_job(
            conn, DEMO_TENANT, task, {"demo": True}, schedule, job_key="lqjobs-dev-tick"
        )
    return ids


class Progress:
    """Prints per-task counts when they change, and one line when the demo is done."""

    def __init__(self, database_url: str, demo_ids: set[int], out: TextIO) -> None:
        self.database_url = database_url
        self.demo_ids = demo_ids
        self.out = out
        self.last = ""
        self.announced = False

    def show(self) -> None:
        with db.connect(self.database_url, autocommit=True) as conn:
            reads = db.Reads()
            rows = reads.task_status(conn)
            pending = reads.existing_job_ids(conn, sorted(self.demo_ids))
        done = len(self.demo_ids) - len(pending)
        parts = [
            f"{escaped(r.task_identifier)}: {r.ready} ready, {r.delayed} waiting, "
            f"{r.locked} running, {r.failed_permanently} failed"
            for r in rows
        ]
        line = f"demo {done}/{len(self.demo_ids)} done | " + (" | ".join(parts) or "queue empty")
        if line != self.last:
            print(line, file=self.out, flush=True)
            self.last = line
        if not pending and not self.announced:
            print(
                "all demo jobs done (the 'tick' schedule keeps running; Ctrl-C stops)",
                file=self.out,
                flush=True,
            )
            self.announced = True


def run(
    settings: Settings,
    data_dir: Path,
    *,
    demo: bool = True,
    flower_port: int = 5555,
    out: TextIO = sys.stdout,
) -> int:
    requested_dir = data_dir
    data_dir = reachable_data_dir(data_dir, out)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    servers = start_servers(settings, data_dir)
    stack: Stack | None = None
    try:
        result = migrate.migrate(servers.database_url)
        print(
            f"database {redact_url(servers.database_url)}: schema {result.outcome.value}", file=out
        )
        ports = {
            "functions": free_port(),
            "callback": free_port(),
            "flower": flower_port if _free(flower_port) else free_port(),
        }
        env = child_environment(servers, ports)
        stack = Stack(env, data_dir / "logs", ports)
        stack.start()
        exports = write_exports(requested_dir, env)
        print(
            f"broker {redact_url(servers.broker_url)} | Flower http://127.0.0.1:"
            f"{ports['flower']} | logs {data_dir / 'logs'}",
            file=out,
            flush=True,
        )
        print_exports(exports, env, out)
        demo_ids = enqueue_demo(servers.database_url) if demo else set()
        _watch(stack, Progress(servers.database_url, demo_ids, out), stopping.is_set, out)
    finally:
        print("stopping ...", file=out, flush=True)
        if stack is not None:
            stack.stop()
        servers.stop()
        (requested_dir / EXPORTS_FILE).unlink(missing_ok=True)
    print("stopped", file=out, flush=True)
    return 0


def _watch(stack: Stack, progress: Progress, stopped: Callable[[], bool], out: TextIO) -> None:
    while not stopped():
        dead = stack.dead()
        if dead:
            raise ConfigurationError(f"{', '.join(dead)} exited; see {stack.logs}")
        progress.show()
        deadline = time.monotonic() + 1.0
        while not stopped() and time.monotonic() < deadline:
            time.sleep(0.05)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
