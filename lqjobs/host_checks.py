"""What a host Celery app's own settings do to lqjobs' guarantees.

``register(app, settings)`` puts everything lqjobs needs on its task and its queue
and changes nothing global (docs/celery-shops.md). A few settings can only be set
for a whole worker or broker connection: the prefetch, which content types the
worker accepts, the broker, the Redis transport's visibility timeout and unacked
sweep, and what happens to running calls on a lost connection. Those are the host's;
lqjobs checks them instead of overwriting them, at the start of a worker that
consumes its queue and in ``lqjobs doctor --app``.

A :class:`Concern` is ``severe`` when lqjobs' jobs will not run as they should (the
worker refuses the messages, or never receives them); otherwise a guarantee still
holds but weakens (slower recovery, an attempt spent), as its text says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from lqjobs.broker_state import is_redis
from lqjobs.settings import Settings, redact_url
from lqjobs.transport import TRANSPORT_PATH

DEFAULT_BROKER = "amqp://guest@localhost//"  # Celery's, when no broker is configured
# kombu's Redis transport defaults (kombu.transport.redis.Channel).
KOMBU_VISIBILITY_TIMEOUT = 3600.0
KOMBU_RESTORE_INTERVAL = 10.0
KOMBU_RESTORE_THROTTLE = 10.0


@dataclass(frozen=True)
class Concern:
    setting: str
    severe: bool
    detail: str


def broker_of(app: Celery) -> str:
    """The URL the app's workers consume from (``--broker`` included; the first one of
    a failover list), password kept."""
    conf = app.conf
    url: Any = conf.broker_read_url or conf.broker_url or DEFAULT_BROKER
    if isinstance(url, list | tuple):
        url = url[0]
    return str(url).split(";")[0].strip()


def same_broker(first: str, second: str) -> bool:
    """Whether two broker URLs name one server and database (Redis' defaults filled in)."""
    return _broker_key(first) == _broker_key(second)


def _broker_key(url: str) -> tuple[str, ...]:
    parts = urlsplit(url)
    try:
        port = str(parts.port or "")
    except ValueError:
        port = "?"
    path = parts.path.strip("/")
    if is_redis(url):
        port, path = port or "6379", path or "0"
    host = parts.hostname or ""
    return (parts.scheme, host, port, path, parts.username or "", parts.password or "")


def lqjobs_broker(app: Celery, settings: Settings) -> str:
    """Where lqjobs' messages and broker-side keys live for a worker of ``app``:
    LQJOBS_BROKER_URL when it is set, else the app's own broker."""
    if settings.broker_url_given():
        return settings.broker_url.get_secret_value()
    return broker_of(app)


def worker_concerns(
    app: Celery, settings: Settings, prefetch_multiplier: int | None = None
) -> list[Concern]:
    """What in ``app``'s worker-wide settings weakens lqjobs' guarantees.
    ``prefetch_multiplier``: the worker's own (``--prefetch-multiplier``), when known."""
    conf = app.conf
    prefetch = prefetch_multiplier
    if prefetch is None:
        prefetch = conf.worker_prefetch_multiplier
    concerns = _content(conf) + _broker(app, settings) + _prefetch(conf, prefetch)
    concerns += _connection_loss(conf) + _pooled_without_claims(settings)
    if is_redis(broker_of(app)):
        concerns += _redis_transport(conf, settings)
    return concerns


def _pooled_without_claims(settings: Settings) -> list[Concern]:
    """Through a transaction pooler the worker takes no advisory locks; only the start
    claim, kept in Redis, stops a second delivery of a lease from calling again."""
    if settings.database_pool_mode != "transaction" or is_redis(
        settings.broker_url.get_secret_value()
    ):
        return []
    return [
        Concern(
            "LQJOBS_DATABASE_POOL_MODE",
            False,
            "transaction pooling takes no advisory locks and this broker keeps no start "
            "claims (Redis does): a lease delivered twice may call its function twice "
            "(at-least-once; the outcome is still written once); use Redis, or a direct "
            "or session-pooled DATABASE_URL for the workers",
        )
    ]


def _content(conf: Any) -> list[Concern]:
    accepted = set(conf.accept_content or ())
    if accepted & {"json", "application/json"}:
        return []
    return [
        Concern(
            "accept_content",
            True,
            f"{sorted(accepted)} has no json: this worker refuses lqjobs' messages (JSON) "
            "and drops them, so each job waits for the lock expiry and is never run; add "
            '"json" to accept_content, or run lqjobs on a dedicated worker that accepts it',
        )
    ]


def _broker(app: Celery, settings: Settings) -> list[Concern]:
    consumed = broker_of(app)
    concerns = []
    lqjobs_url = settings.broker_url.get_secret_value()
    if settings.broker_url_given() and not same_broker(lqjobs_url, consumed):
        concerns.append(
            Concern(
                "broker_url",
                True,
                f"this worker consumes from {redact_url(consumed)} but LQJOBS_BROKER_URL is "
                f"{redact_url(lqjobs_url)}, where the bridge "
                "publishes: a worker consumes from one broker, so start the lqjobs worker "
                "with --broker set to LQJOBS_BROKER_URL (or unset LQJOBS_BROKER_URL here)",
            )
        )
    if not is_redis(consumed):
        concerns.append(
            Concern(
                "broker_url",
                False,
                f"{redact_url(consumed)} is not Redis: the start claim, the callback "
                "deadlines and the restart reconciler are off (docs/design.md, 7.7), so a "
                "lost worker's job may be called again and a lost message waits for the "
                "lock expiry",
            )
        )
    return concerns


def _prefetch(conf: Any, prefetch: int) -> list[Concern]:
    if prefetch == 1 or conf.get("worker_disable_prefetch"):
        return []
    return [
        Concern(
            "worker_prefetch_multiplier",
            False,
            f"{prefetch}: each slot holds {prefetch} messages, so a job waits behind other "
            "tasks' calls; a lease that waits past LQJOBS_MAX_QUEUE_WAIT is given back "
            "unrun, and a message held unacknowledged past the visibility timeout is "
            "delivered twice; use --prefetch-multiplier 1",
        )
    ]


def _connection_loss(conf: Any) -> list[Concern]:
    if not conf.get("worker_cancel_long_running_tasks_on_connection_loss"):
        return []
    return [
        Concern(
            "worker_cancel_long_running_tasks_on_connection_loss",
            False,
            "True: a broker hiccup cancels running calls, and each redelivery records "
            "'worker lost' (an attempt spent) although its call may have run",
        )
    ]


def _redis_transport(conf: Any, settings: Settings) -> list[Concern]:
    options = conf.broker_transport_options or {}
    visibility = float(options.get("visibility_timeout", KOMBU_VISIBILITY_TIMEOUT))
    concerns = []
    wanted = settings.visibility_timeout
    if visibility < settings.task_time_limit:
        concerns.append(
            Concern(
                "broker_transport_options.visibility_timeout",
                False,
                f"{visibility:g}s is below LQJOBS_TASK_TIME_LIMIT "
                f"({settings.task_time_limit:g}s): a running call's message is delivered "
                "again while it runs (docs/design.md, F6)",
            )
        )
    elif visibility != wanted:
        concerns.append(
            Concern(
                "broker_transport_options.visibility_timeout",
                False,
                f"{visibility:g}s, not LQJOBS_VISIBILITY_TIMEOUT ({wanted:g}s): a dead "
                f"worker's jobs come back after {min(visibility, settings.job_expiry):g}s "
                "(the visibility timeout or the lock expiry), not about "
                f"{wanted:g}s; set LQJOBS_VISIBILITY_TIMEOUT to it (and raise "
                "LQJOBS_JOB_EXPIRY), or give lqjobs a Redis database of its own",
            )
        )
    interval = float(options.get("unacked_restore_interval", KOMBU_RESTORE_INTERVAL))
    throttle = float(options.get("unacked_restore_throttle", KOMBU_RESTORE_THROTTLE))
    if interval * throttle > max(1.0, wanted / 4):
        concerns.append(
            Concern(
                "broker_transport_options.unacked_restore_interval",
                False,
                f"the unacked sweep runs every {interval * throttle:g}s "
                f"(interval {interval:g} x throttle {throttle:g}): a dead worker's messages "
                f"come back up to that long after the visibility timeout, not "
                f"{max(1.0, wanted / 4):g}s",
            )
        )
    if conf.broker_transport != TRANSPORT_PATH:
        concerns.append(
            Concern(
                "broker_transport",
                False,
                f"{conf.broker_transport or 'kombu redis'}: with kombu 5.7 a Redis restart "
                "can stop this worker (docs/design.md, F22); "
                f"broker_transport = {TRANSPORT_PATH!r} rides it out",
            )
        )
    return concerns
