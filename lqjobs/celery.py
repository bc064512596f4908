"""lqjobs on Celery: the task that runs app_jobs jobs, its configuration, the app,
and the worker's log format.

``celery -A tasks worker`` builds the app with :func:`create_app` and logs in
lqjobs' format (:func:`install_log_format`); an existing Celery shop calls
:func:`register` on its own app instead, which leaves its logging alone. Nothing
here imports a top-level ``tasks`` module, so a project's own ``tasks.py`` cannot
shadow it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from logging.handlers import WatchedFileHandler
from typing import Any, Literal

from celery import Celery, Task, signals

from lqjobs.broker_state import is_redis
from lqjobs.errors import ConfigurationError
from lqjobs.lease import TASK_NAME, Lease
from lqjobs.logs import KeyValueFormatter
from lqjobs.settings import Settings, load_settings
from lqjobs.transport import TRANSPORT_PATH
from lqjobs.worker import JobRunner, Result, build_runner

BUSY_RETRY_SECONDS = 2.0
MAX_RETRY_SECONDS = 30.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings that make a job impossible to lose: late acks, requeue on a lost
    worker, one prefetched message per slot, JSON only."""
    broker_url = settings.broker_url.get_secret_value()
    return {
        "broker_url": broker_url,
        **redis_transport(broker_url),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": redis_transport_options(settings.visibility_timeout),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # Flower builds its task list from the worker's events; a "task-sent" event per
        # message would cost the bridge a quarter of its publish time.
        "task_send_sent_event": False,
        "worker_send_task_events": True,
        # Running calls finish on a broker hiccup; their redelivery is dropped by the
        # lease check once the job is settled.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
    }


def redis_transport(broker_url: str) -> dict[str, Any]:
    """kombu's Redis transport minus a client object built per command
    (lqjobs/transport.py), for plain Redis URLs; any other broker is left alone."""
    if is_redis(broker_url):
        return {"broker_transport": TRANSPORT_PATH}
    return {}


def redis_transport_options(visibility_timeout: float) -> dict[str, Any]:
    """kombu's Redis transport redelivers unacknowledged messages (a worker killed
    mid-call) only when a consumer sweeps for them, by default every 10 x 10 s. Sweep
    every quarter of the visibility timeout instead, so a lost worker's jobs come
    back about V after the loss, as the timeout ladder assumes."""
    return {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": max(1.0, visibility_timeout / 4),
        "unacked_restore_throttle": 1,
    }


def check_timeout_ladder(settings: Settings) -> None:
    problems = settings.timeout_ladder_problems()
    if problems:
        raise ConfigurationError("timeout ladder violated: " + "; ".join(problems))


class _PerProcess:
    """One runner per worker process, built lazily after a prefork child forks."""

    def __init__(self, factory: Callable[[], JobRunner]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._runner: JobRunner | None = None
        self._pid = 0

    def get(self) -> JobRunner:
        with self._lock:
            if self._runner is None or self._pid != os.getpid():
                self._runner, self._pid = self._factory(), os.getpid()
            return self._runner

    def close(self) -> None:
        with self._lock:
            if self._runner is not None and self._pid == os.getpid():
                self._runner.close()
            self._runner = None


def register_run_job(app: Celery, settings: Settings) -> Any:
    """Add the run_job task to ``app``; returns the Celery task."""
    runners = _PerProcess(lambda: build_runner(settings))

    def run_job(
        self: Task,
        job_id: int,
        worker_id: str,
        attempts: int,
        locked_at: str,
        task_identifier: str,
        database_id: str | None = None,  # shown in Flower; the row is what counts
    ) -> str:
        lease = Lease.from_message(job_id, worker_id, attempts, locked_at)
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        result = runners.get().run(lease, task_identifier, self.request.id, redelivered)
        if result is Result.BUSY:  # come back later, never drop
            raise self.retry(countdown=BUSY_RETRY_SECONDS)
        if result is Result.UNAVAILABLE:  # the database keeps failing: back off
            raise self.retry(countdown=retry_delay(self.request.retries))
        return str(result.value)

    task = app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=None,
        shared=False,
    )(run_job)
    task.runners = runners  # lets an embedding process (or a test) close the pools
    return task


def retry_delay(retries: int) -> float:
    """2, 4, 8, 16, then 30 s between deliveries while the database fails."""
    return min(MAX_RETRY_SECONDS, BUSY_RETRY_SECONDS * float(2 ** min(retries, 4)))


def register(app: Celery, settings: Settings) -> None:
    """Add lqjobs' task (and its configuration) to an existing Celery app."""
    check_timeout_ladder(settings)
    app.conf.update(celery_config(settings))
    register_run_job(app, settings)


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery("lqjobs", set_as_current=False)
    register(app, settings)
    return app


# -- the worker's log format ----------------------------------------------------------

# Celery passes its message's context again as the extra ``data``: not repeated.
_OMIT = ("data",)


def install_log_format(scope: Literal["worker", "lqjobs"] = "worker") -> None:
    """Log the worker in lqjobs' format (``key=value`` fields, every line escaped),
    through Celery's logging signals; call it before the worker starts.

    ``"worker"`` (what ``celery -A tasks worker`` does) replaces Celery's logging
    setup: every record of the process, Celery's own included, goes to stderr (or
    ``--logfile``) in lqjobs' format at ``--loglevel``. ``"lqjobs"`` is the opt-in for
    a host app that keeps its own format: after Celery's setup only lqjobs' loggers
    get a handler in lqjobs' format (and stop propagating, so no line shows twice).
    The signals are process-wide, so this is a choice for the process, not an app;
    :func:`register` never makes it.
    """
    if scope == "worker":
        signals.setup_logging.connect(_log_whole_worker, weak=False, dispatch_uid=__name__)
    else:
        signals.after_setup_logger.connect(_log_lqjobs_only, weak=False, dispatch_uid=__name__)


def _log_whole_worker(
    loglevel: int | str | None = None, logfile: str | None = None, **_: Any
) -> None:
    root = logging.getLogger()
    root.handlers[:] = [_handler(logfile)]
    if loglevel:
        root.setLevel(loglevel)


def _log_lqjobs_only(logfile: str | None = None, **_: Any) -> None:
    own = logging.getLogger("lqjobs")
    if not any(isinstance(h.formatter, KeyValueFormatter) for h in own.handlers):
        own.addHandler(_handler(logfile))
    own.propagate = False


def _handler(logfile: str | None) -> logging.Handler:
    """Where Celery would write: ``--logfile``, else the process's real stderr."""
    handler: logging.Handler = (
        WatchedFileHandler(logfile, encoding="utf-8")
        if logfile
        else logging.StreamHandler(sys.__stderr__)
    )
    handler.setFormatter(KeyValueFormatter(omit=_OMIT))
    return handler


__all__ = ["TASK_NAME", "celery_config", "create_app", "install_log_format", "register"]
