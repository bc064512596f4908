"""``lqjobs doctor``: what is wrong with this deployment, readable at a glance.

Each check returns one line: ok, warn (works, but something needs a look) or
fail (jobs will not run as they should). The command exits 1 on any fail.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
from celery import Celery
from celery.app.routes import Router, prepare
from pydantic import SecretStr

from lqjobs import db
from lqjobs.broker_state import is_redis
from lqjobs.db import server
from lqjobs.errors import LqJobsError
from lqjobs.executors.router import openfaas_after_flip
from lqjobs.host_checks import broker_of, lqjobs_broker, worker_concerns
from lqjobs.lease import TASK_NAME
from lqjobs.logs import escaped
from lqjobs.settings import Settings, redact_url


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    detail: str


Check = Callable[[Settings], list[Finding]]


def check_settings(settings: Settings) -> list[Finding]:
    findings = [
        Finding("timeout ladder", Level.FAIL, problem)
        for problem in settings.timeout_ladder_problems()
    ]
    if not findings:
        findings.append(
            Finding(
                "timeout ladder",
                Level.OK,
                f"http {settings.http_timeout:g}s < soft {settings.task_soft_time_limit:g}s < hard "
                f"{settings.task_time_limit:g}s < visibility {settings.visibility_timeout:g}s; "
                f"lock expiry {settings.job_expiry:g}s",
            )
        )
    if settings.jobs_support_any:
        findings.append(Finding("tasks", Level.OK, "any task (JOBS_SUPPORT_ANY=true)"))
    elif settings.jobs_supported:
        findings.append(Finding("tasks", Level.OK, ", ".join(settings.jobs_supported)))
    else:
        findings.append(
            Finding("tasks", Level.FAIL, "neither JOBS_SUPPORTED nor JOBS_SUPPORT_ANY is set")
        )
    findings += route_findings(settings)
    uses_async = "openfaas-async" in settings.executor_names()
    if uses_async and not (settings.callback_keys and settings.internal_jobs_callback_url):
        findings.append(
            Finding(
                "callbacks",
                Level.FAIL,
                "openfaas-async needs LQJOBS_CALLBACK_KEYS and INTERNAL_JOBS_CALLBACK_URL",
            )
        )
    return findings


def check_broker(settings: Settings) -> list[Finding]:
    url = settings.broker_url.get_secret_value()
    shown = redact_url(url)
    if not is_redis(url):
        return [Finding("broker", Level.OK, f"{shown} (not Redis: not inspected)")]
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "?")
    except redis.ResponseError:  # CONFIG disabled (managed Redis): cannot tell
        return [Finding("broker", Level.OK, f"{shown} reachable; eviction policy unknown")]
    except redis.RedisError as exc:
        return [Finding("broker", Level.FAIL, f"{shown} unreachable: {type(exc).__name__}")]
    finally:
        client.close()
    if policy != "noeviction":
        return [
            Finding(
                "broker",
                Level.WARN,
                f"{shown}: maxmemory-policy {policy} may evict queued messages; use noeviction",
            )
        ]
    return [Finding("broker", Level.OK, f"{shown}, maxmemory-policy noeviction")]


def check_database(settings: Settings) -> list[Finding]:
    shown = redact_url(settings.conninfo())
    reads = db.Reads(settings.jobs_schema)
    try:
        with db.connect(
            settings.conninfo(), autocommit=True, pool_mode=settings.database_pool_mode
        ) as conn:
            if not reads.schema_installed(conn):
                return [
                    Finding(
                        "database", Level.FAIL, f"{shown}: schema {settings.jobs_schema} missing"
                    )
                ]
            gauges = reads.queue_gauges(
                conn, settings.task_filter(), timedelta(seconds=settings.job_expiry)
            )
    except LqJobsError as exc:
        return [Finding("database", Level.FAIL, f"{shown}: {exc}")]
    findings = [Finding("database", Level.OK, f"{shown}, schema {settings.jobs_schema}")]
    if gauges.unroutable:
        findings.append(
            Finding(
                "unroutable jobs",
                Level.WARN,
                f"{gauges.unroutable} ready jobs of tasks this deployment does not serve",
            )
        )
    if gauges.abandoned:
        findings.append(
            Finding(
                "abandoned leases",
                Level.FAIL,
                f"{gauges.abandoned} jobs locked past the lease expiry on their last attempt: "
                "get_job never takes them again; a running bridge fails them within a minute "
                "(is any bridge running?)",
            )
        )
    if gauges.locked_last_attempt:
        findings.append(
            Finding(
                "last attempts",
                Level.OK,
                f"{gauges.locked_last_attempt} jobs locked on their last attempt",
            )
        )
    if gauges.failed_permanently:
        findings.append(
            Finding(
                "failed jobs",
                Level.WARN,
                f"{gauges.failed_permanently} jobs parked after max_attempts (lqjobs status)",
            )
        )
    findings.append(
        Finding(
            "queue",
            Level.OK,
            f"{gauges.ready} ready, oldest {gauges.oldest_ready_age_seconds:.0f}s",
        )
    )
    return findings


# What CI runs (README, "Supported servers"); 13 is the oldest the schema can run on
# (gen_random_uuid() is core from 13 on, and the SQL needs no extension).
TESTED_MAJORS = (15, 18)
OLDEST_MAJOR = 13
# How long the listener check waits for its own notification: a direct connection
# hears it within milliseconds.
NOTIFY_TIMEOUT = 2.0


def check_server(settings: Settings) -> list[Finding]:
    """The server's version, and whether JIT compilation is on and possible there
    (then any statement planned above jit_above_cost pays for an LLVM compile)."""
    try:
        with db.connect(
            settings.conninfo(), autocommit=True, pool_mode=settings.database_pool_mode
        ) as conn:
            info = server.server_info(conn)
    except LqJobsError as exc:
        return [Finding("server", Level.FAIL, str(exc))]
    return [_version_finding(info), _jit_finding(info)]


def _version_finding(info: server.ServerInfo) -> Finding:
    shown = f"PostgreSQL {info.version}"
    if info.major < OLDEST_MAJOR:
        return Finding(
            "server",
            Level.WARN,
            f"{shown}: older than {OLDEST_MAJOR}, the oldest lqjobs is expected to work on",
        )
    tested = ", ".join(str(major) for major in TESTED_MAJORS)
    if info.major in TESTED_MAJORS:
        return Finding("server", Level.OK, f"{shown} (tested: {tested})")
    return Finding("server", Level.OK, f"{shown} (expected to work; tested: {tested})")


def _jit_finding(info: server.ServerInfo) -> Finding:
    if not info.jit:
        return Finding("jit", Level.OK, "off")
    if not info.jit_available:
        return Finding("jit", Level.OK, "on, but no JIT provider is installed: never used")
    return Finding("jit", Level.OK, f"on, available (jit_above_cost {info.jit_above_cost:g})")


def route_findings(settings: Settings) -> list[Finding]:
    """The route table: the default executor, then each task routed its own way, a
    canary with its shares; a WARN for OpenFaaS routes left after the flip to Knative."""
    found = [Finding("routes", Level.OK, f"default: {settings.executor}")]
    for task in sorted(settings.task_executors):
        route = settings.route_of(task)
        total = sum(route.values())
        shares = ", ".join(
            f"{name} {100 * weight / total:g} %" if len(route) > 1 else name
            for name, weight in sorted(route.items())
        )
        found.append(Finding("routes", Level.OK, f"{escaped(task)}: {shares or 'nothing'}"))
    leftovers = openfaas_after_flip(settings)
    if leftovers:
        found.append(
            Finding(
                "routes",
                Level.WARN,
                "OpenFaaS is deprecated after the flip to knative; still routed there: "
                + ", ".join(escaped(task) for task in leftovers),
            )
        )
    return found


def check_listener(settings: Settings) -> list[Finding]:
    """Whether a NOTIFY sent through DATABASE_URL reaches a LISTEN on the listen URL,
    tried for real: a transaction pooler in between loses it without an error."""
    if settings.listens_through_pooler():
        return [
            Finding(
                "listener",
                Level.WARN,
                "poll only (LQJOBS_DATABASE_POOL_MODE=transaction, no "
                f"LQJOBS_LISTEN_DATABASE_URL): new jobs wait up to {settings.poll_seconds():g}s "
                "for the next poll; set LQJOBS_LISTEN_DATABASE_URL to a direct URL to be "
                "woken at once",
            )
        ]
    where = "LISTEN on DATABASE_URL"
    if settings.listen_database_url is not None:
        where = f"LISTEN on LQJOBS_LISTEN_DATABASE_URL ({redact_url(settings.listen_conninfo())})"
    try:
        heard_after, databases = _notify_round_trip(settings)
    except LqJobsError as exc:
        return [Finding("listener", Level.FAIL, f"{where}: {exc}")]
    if heard_after is None:
        return [Finding("listener", Level.FAIL, _lost_notification(where, *databases))]
    return [Finding("listener", Level.OK, f"{where}: NOTIFY heard in {heard_after * 1000:.0f} ms")]


def _notify_round_trip(settings: Settings) -> tuple[float | None, tuple[str, str]]:
    """Seconds from a NOTIFY sent through DATABASE_URL until a LISTEN on the listen URL
    hears it (None: not within NOTIFY_TIMEOUT), and the databases the two reached."""
    channel = f"lqjobs:doctor:{secrets.token_hex(8)}"  # no one else's notifications
    payload = secrets.token_hex(8)
    with (
        db.connect(settings.listen_conninfo(), autocommit=True) as listener,
        db.connect(
            settings.conninfo(), autocommit=True, pool_mode=settings.database_pool_mode
        ) as sender,
    ):
        db.listen(listener, channel)
        started = time.monotonic()
        server.notify(sender, channel, payload)
        heard = server.wait_for_notification(listener, channel, payload, NOTIFY_TIMEOUT)
        elapsed = time.monotonic() - started
        databases = (server.database_name(listener), server.database_name(sender))
    return (elapsed if heard else None), databases


def _lost_notification(where: str, listen_db: str, sent_db: str) -> str:
    lost = f"{where} did not hear a NOTIFY sent through DATABASE_URL within {NOTIFY_TIMEOUT:g}s"
    if listen_db != sent_db:
        return (
            f"{lost}; the listen URL is database {escaped(listen_db)}, DATABASE_URL is "
            f"{escaped(sent_db)}, and notifications stay in their database"
        )
    return (
        f"{lost}; a transaction pooler in between loses notifications: set "
        "LQJOBS_LISTEN_DATABASE_URL to a direct URL, or LQJOBS_DATABASE_POOL_MODE=transaction "
        "to poll only"
    )


def check_schedules(settings: Settings) -> list[Finding]:
    """Scheduled jobs that may never fire again (see ``lqjobs schedules``)."""
    from lqjobs.scheduler import report as schedule_report
    from lqjobs.scheduler.service import APPLICATION_NAME_PREFIX

    try:
        with db.connect(
            settings.conninfo(), autocommit=True, pool_mode=settings.database_pool_mode
        ) as conn:
            statuses = db.Reads(settings.jobs_schema).scheduled_job_overview(
                conn, APPLICATION_NAME_PREFIX
            )
    except LqJobsError as exc:
        return [Finding("schedules", Level.FAIL, str(exc))]
    items = schedule_report.reports(statuses, datetime.now(UTC), grace=60.0)
    flagged = [item for item in items if item.flags]
    if not flagged:
        return [Finding("schedules", Level.OK, f"{len(items)} scheduled jobs, none stuck")]
    return [
        Finding(
            "schedules",
            Level.WARN,
            f"scheduled job {item.id} ({escaped(item.task)}): {', '.join(item.flags)}",
        )
        for item in flagged
    ]


CHECKS: list[Check] = [
    check_settings,
    check_broker,
    check_database,
    check_server,
    check_listener,
    check_schedules,
]


def check_host_app(app: Celery, settings: Settings) -> list[Finding]:
    """A host Celery app lqjobs is registered on (``--app``): the task and its route,
    and each of the app's worker-wide settings that weakens a guarantee
    (docs/celery-shops.md)."""
    name = escaped(str(app.main))
    if TASK_NAME not in app.tasks:
        return [
            Finding(
                "host app",
                Level.FAIL,
                f"{name}: lqjobs is not registered (call lqjobs.celery.register(app, settings))",
            )
        ]
    # Today's task_routes: app.amqp caches the routes it read first.
    router = Router(prepare(app.conf.task_routes), app.amqp.queues, True, app)
    routed = router.route({}, TASK_NAME).get("queue")
    routed_name = getattr(routed, "name", routed)
    if routed_name != settings.queue:
        return [
            Finding(
                "host app",
                Level.FAIL,
                f"{name}: {TASK_NAME} is routed to {routed_name!r}, not LQJOBS_QUEUE "
                f"({settings.queue!r}) where the bridge publishes; set task_routes before "
                "register()",
            )
        ]
    findings = [
        Finding(
            "host app",
            Level.OK,
            f"{name}: lqjobs registered, its jobs on queue {settings.queue} "
            f"(run a worker with -Q {settings.queue})",
        )
    ]
    if not settings.broker_url_given():
        findings.append(
            Finding(
                "host broker",
                Level.OK,
                f"LQJOBS_BROKER_URL unset: the app's workers take lqjobs' jobs from "
                f"{redact_url(broker_of(app))}; the bridge and callback service need "
                "LQJOBS_BROKER_URL set to it",
            )
        )
    findings += [
        Finding(concern.setting, Level.FAIL if concern.severe else Level.WARN, concern.detail)
        for concern in worker_concerns(app, settings)
    ]
    return findings


def diagnose(
    settings: Settings, checks: list[Check] | None = None, app: Celery | None = None
) -> list[Finding]:
    """Every check's findings; with a host ``app``, its own too, and lqjobs' broker is
    the app's when LQJOBS_BROKER_URL is unset."""
    host: list[Finding] = []
    if app is not None:
        host = check_host_app(app, settings)
        url = SecretStr(lqjobs_broker(app, settings))
        settings = settings.model_copy(update={"broker_url": url})
    return [finding for check in (checks or CHECKS) for finding in check(settings)] + host


def render(findings: list[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    return "\n".join(f"{f.level.value:<4}  {f.check:<{width}}  {f.detail}" for f in findings)
