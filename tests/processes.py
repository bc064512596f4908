"""The real CLI processes (`lqjobs bridge`, `lqjobs scheduler`, `lqjobs callback`,
`celery -A lqjobs.app worker`) for tests that kill, signal or multiply them. Each writes
its output to a log file under ``logs``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from lqjobs.ops.dev import worker_argv

ROOT = Path(__file__).resolve().parent.parent


def environment(db_url: str, redis_url: str, **variables: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LQJOBS_", "JOBS_", "PG", "INTERNAL_", "KNATIVE_"))
    }
    env.update(
        {
            "DATABASE_URL": db_url,
            "LQJOBS_BROKER_URL": redis_url,
            "JOBS_SUPPORT_ANY": "true",
            "HOSTNAME": "proc-host",
            "LQJOBS_POLL_INTERVAL": "1",
            "LQJOBS_HTTP_TIMEOUT": "5",
            "LQJOBS_HTTP_CONNECT_TIMEOUT": "1",
            "LQJOBS_TASK_SOFT_TIME_LIMIT": "8",
            "LQJOBS_TASK_TIME_LIMIT": "10",
            "LQJOBS_VISIBILITY_TIMEOUT": "20",
            "LQJOBS_MAX_QUEUE_WAIT": "20",
            "LQJOBS_JOB_EXPIRY": "60",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(variables)
    return env


class Process:
    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def bridge(
    env: dict[str, str], logs: Path, name: str = "bridge", *args: str, cwd: Path = ROOT
) -> Process:
    return Process(name, [sys.executable, "-m", "lqjobs", "bridge", *args], env, logs, cwd)


def scheduler(env: dict[str, str], logs: Path, name: str = "scheduler") -> Process:
    return Process(name, [sys.executable, "-m", "lqjobs", "scheduler"], env, logs)


def callback(env: dict[str, str], logs: Path, port: int, name: str = "callback") -> Process:
    argv = [sys.executable, "-m", "lqjobs", "callback", "--host", "127.0.0.1", "--port", str(port)]
    return Process(name, argv, env, logs)


def worker(
    env: dict[str, str],
    logs: Path,
    name: str = "worker",
    concurrency: int = 8,
    loglevel: str = "WARNING",
    cwd: Path = ROOT,
) -> Process:
    argv = worker_argv(
        concurrency,
        "--loglevel",
        loglevel,
        "--hostname",
        f"{name}@%h",
        "--without-heartbeat",
        "--without-mingle",
        "--without-gossip",
    )
    return Process(name, argv, env, logs, cwd)


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[tuple[Process, ...]]:
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()
