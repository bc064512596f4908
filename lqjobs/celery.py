"""lqjobs on Celery: the task that runs app_jobs jobs, its configuration, the app,
and the worker's log format.

``celery -A lqjobs.app worker`` builds the app with :func:`create_app` and logs in
lqjobs' format (:func:`install_log_format`); an existing Celery shop calls
:func:`register` on its own app instead, which adds the task and its route and
leaves the app's configuration and logging alone (docs/celery-shops.md). Nothing
here imports a top-level ``tasks`` module, so a project's own ``tasks.py`` cannot
shadow it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from logging.handlers import WatchedFileHandler
from typing import Any, Literal

from celery import Celery, Task, signals
from pydantic import SecretStr

from lqjobs.broker_state import is_redis
from lqjobs.errors import ConfigurationError
from lqjobs.host_checks import lqjobs_broker, worker_concerns
from lqjobs.lease import TASK_NAME, Lease
from lqjobs.logs import KeyValueFormatter
from lqjobs.settings import Settings, load_settings
from lqjobs.transport import TRANSPORT_PATH
from lqjobs.worker import JobRunner, Result, build_runner

BUSY_RETRY_SECONDS = 2.0
MAX_RETRY_SECONDS = 30.0
log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """lqjobs' own app (:func:`create_app`): settings that make a job impossible to lose
    (late acks, requeue on a lost worker, one prefetched message per slot, JSON only),
    for the whole app. A host app gets the task-level ones on lqjobs' task instead
    (:func:`register`)."""
    return {
        **dedicated_worker_config(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # `celery -A lqjobs.app worker` consumes lqjobs' queue without a -Q.
        "task_default_queue": settings.queue,
        # Flower builds its task list from the worker's events; a "task-sent" event per
        # message would cost the bridge a quarter of its publish time.
        "task_send_sent_event": False,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
    }


def dedicated_worker_config(settings: Settings) -> dict[str, Any]:
    """The settings that exist only per worker or broker connection, as lqjobs wants
    them: LQJOBS_BROKER_URL with lqjobs' Redis transport, its visibility timeout and
    unacked sweep, one prefetched message per slot, running calls kept on a lost
    connection. :func:`register` never applies them; a host's process that runs only
    lqjobs' queue may (``app.conf.update(dedicated_worker_config(settings))``,
    docs/celery-shops.md), since they reach every queue on that connection."""
    broker_url = settings.broker_url.get_secret_value()
    return {
        "broker_url": broker_url,
        **redis_transport(broker_url),
        "broker_transport_options": redis_transport_options(settings.visibility_timeout),
        "worker_prefetch_multiplier": 1,
        # Running calls finish on a broker hiccup; their redelivery is dropped by the
        # lease check once the job is settled.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def task_options(settings: Settings) -> dict[str, Any]:
    """What the run_job task carries itself, so that no host setting reaches it: Celery
    reads each of these from the app's configuration only where the task leaves it
    unset (``Task.from_config``)."""
    return {
        "acks_late": True,
        "acks_on_failure_or_timeout": True,
        "acks_on_failure": True,
        "acks_on_timeout": True,  # a hard time limit: the row waits for E (F12)
        "reject_on_worker_lost": True,  # the redelivery records "worker lost" (F5)
        "retry_on_worker_lost": False,
        "ignore_result": True,
        "store_errors_even_if_ignored": False,
        "store_eager_result": False,
        "track_started": False,
        "serializer": "json",  # the worker's retries, as the bridge publishes
        "soft_time_limit": settings.task_soft_time_limit,
        "time_limit": settings.task_time_limit,
        "max_retries": None,
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
    """Add the run_job task to ``app``; returns the Celery task (a proxy until the app
    is finalized: nothing here reads the app's configuration)."""
    runners = _PerProcess(lambda: build_runner(_with_broker(settings, app)))

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

    # ``runners`` lets an embedding process (or a test) close the pools.
    return app.task(
        name=TASK_NAME, bind=True, shared=False, runners=runners, **task_options(settings)
    )(run_job)


def _with_broker(settings: Settings, app: Celery) -> Settings:
    """The settings a worker of ``app`` runs with: LQJOBS_BROKER_URL unset means the
    app's own broker, where its lqjobs messages arrive and its start claims belong."""
    if settings.broker_url_given():
        return settings
    return settings.model_copy(update={"broker_url": SecretStr(lqjobs_broker(app, settings))})


def retry_delay(retries: int) -> float:
    """2, 4, 8, 16, then 30 s between deliveries while the database fails."""
    return min(MAX_RETRY_SECONDS, BUSY_RETRY_SECONDS * float(2 ** min(retries, 4)))


def register(app: Celery, settings: Settings) -> None:
    """Add lqjobs' task to an existing Celery app, changing nothing global.

    Everything lqjobs' guarantees need travels on its task (:func:`task_options`)
    and its queue: one route sends ``lqjobs.run_job`` to ``LQJOBS_QUEUE``, ahead of
    the app's own routes. Settings that exist only per worker (prefetch, accepted
    content, the broker and its transport options) stay the host's; a worker that
    consumes lqjobs' queue logs what in them weakens a guarantee when it starts
    (:mod:`lqjobs.host_checks`), as ``lqjobs doctor --app`` does. The route is added
    when the app's configuration is loaded, again if it is loaded anew.
    """
    check_timeout_ladder(settings)
    register_run_job(app, settings)
    _REGISTERED[app] = settings

    def add_route(source: Any = None, **_: Any) -> None:
        conf = source if source is not None else app.conf
        conf.task_routes = with_route(conf.task_routes, settings.queue)

    app.on_after_configure.connect(add_route, weak=False)
    if app.configured:
        add_route()
    signals.celeryd_after_setup.connect(_check_worker, weak=False, dispatch_uid=__name__)


def with_route(routes: Any, queue: str) -> Any:
    """``task_routes`` with lqjobs' task routed to ``queue`` before any of the app's
    own routes (a host's ``"*"`` pattern included); the host's value is not mutated."""
    ours = {"queue": queue}
    if routes is None:
        return {TASK_NAME: ours}
    if isinstance(routes, Mapping):  # an exact name wins over the patterns of its map
        return {TASK_NAME: ours, **{k: v for k, v in routes.items() if k != TASK_NAME}}
    routers = list(routes) if isinstance(routes, list | tuple) else [routes]
    if routers and routers[0] == {TASK_NAME: ours}:
        return routes
    return [{TASK_NAME: ours}, *routers]


# The apps lqjobs is registered on, with their settings, for the worker's start check.
_REGISTERED: weakref.WeakKeyDictionary[Celery, Settings] = weakref.WeakKeyDictionary()


def _check_worker(instance: Any = None, **_: Any) -> None:
    """At a worker's start (after ``-Q`` applied): if it consumes lqjobs' queue, log
    each host setting that weakens lqjobs' guarantees there."""
    app = getattr(instance, "app", None)
    settings = _REGISTERED.get(app) if app is not None else None
    if app is None or settings is None:
        return
    consumed = set(app.amqp.queues.consume_from)
    fields = {"queue": settings.queue, "consumed": ",".join(sorted(consumed))}
    if settings.queue not in consumed:
        log.info(
            "this worker does not consume lqjobs' queue: app_jobs jobs run elsewhere",
            extra={"action": "lqjobs_queue_not_consumed", **fields},
        )
        return
    prefetch = getattr(instance, "prefetch_multiplier", None)
    for concern in worker_concerns(app, settings, prefetch):
        log.log(
            logging.ERROR if concern.severe else logging.WARNING,
            "host setting weakens lqjobs: %s: %s",
            concern.setting,
            concern.detail,
            extra={"action": "host_setting_concern", "setting": concern.setting, **fields},
        )


def create_app(settings: Settings | None = None) -> Celery:
    """lqjobs' own app (``celery -A lqjobs.app worker``, the bridge): the whole configuration
    is lqjobs', so its worker consumes ``LQJOBS_QUEUE`` and passes every check."""
    settings = settings or load_settings()
    app = Celery("lqjobs", set_as_current=False)
    app.conf.update(celery_config(settings))
    # Loaded now, so the route is in place at once: the bridge and the tests read the
    # configuration straight away, and a test may replace the routes afterwards.
    app.conf.get("task_routes")
    register(app, settings)
    return app


# -- the worker's log format ----------------------------------------------------------

# Celery passes its message's context again as the extra ``data``: not repeated.
_OMIT = ("data",)


def install_log_format(scope: Literal["worker", "lqjobs"] = "worker") -> None:
    """Log the worker in lqjobs' format (``key=value`` fields, every line escaped),
    through Celery's logging signals; call it before the worker starts.

    ``"worker"`` (what ``celery -A lqjobs.app worker`` does) replaces Celery's logging
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


__all__ = [
    "TASK_NAME",
    "celery_config",
    "create_app",
    "dedicated_worker_config",
    "install_log_format",
    "register",
    "task_options",
]
