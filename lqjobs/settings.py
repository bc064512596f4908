"""All configuration, read from the environment in exactly one place.

Names match the Node runtime (``PGHOST``, ``JOBS_SUPPORTED``, ...) so a team can
swap runtimes without touching its deployment; lqjobs-only options carry the
``LQJOBS_`` prefix. Build a :class:`Settings` once at the edge (CLI, Celery app)
and pass it down; library code never reads ``os.environ``.
"""

from __future__ import annotations

import re
import socket
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from lqjobs.errors import ConfigurationError

ExecutorName = Literal["openfaas", "openfaas-async", "knative", "devmap", "native"]
# A task's route: one executor, or canary weights ({"knative": 10, "openfaas": 90}).
Weight = Annotated[int, Field(ge=0, le=1_000_000)]
Route = ExecutorName | dict[ExecutorName, Weight]
# Seconds between polls of a component that cannot LISTEN (a transaction pooler and
# no LQJOBS_LISTEN_DATABASE_URL), unless LQJOBS_POLL_INTERVAL says otherwise.
POLL_WITHOUT_LISTEN = 1.0

# Fields whose values must never be echoed, not even in a validation error.
SECRET_FIELDS = frozenset(
    {"database_url", "listen_database_url", "pgpassword", "broker_url", "callback_keys"}
)


def _env(name: str, **kwargs: Any) -> Any:
    return Field(validation_alias=name, **kwargs)


class Settings(BaseSettings):
    """lqjobs configuration. Field docs name the environment variable behind each."""

    model_config = SettingsConfigDict(
        populate_by_name=True,
        case_sensitive=True,
        extra="ignore",
        frozen=True,
    )

    # -- Postgres (Node runtime names) -------------------------------------
    database_url: SecretStr | None = _env("DATABASE_URL", default=None)
    pghost: str | None = _env("PGHOST", default=None)
    pgport: int | None = _env("PGPORT", default=None, ge=1, le=65535)
    pguser: str | None = _env("PGUSER", default=None)
    pgpassword: SecretStr | None = _env("PGPASSWORD", default=None)
    pgdatabase: str | None = _env("PGDATABASE", default=None)

    # -- The queue (Node runtime names) ------------------------------------
    jobs_schema: str = _env("JOBS_SCHEMA", default="app_jobs", min_length=1, max_length=63)
    jobs_support_any: bool = _env("JOBS_SUPPORT_ANY", default=False)
    jobs_supported: Annotated[tuple[str, ...], NoDecode] = _env("JOBS_SUPPORTED", default=())
    hostname: str = _env("HOSTNAME", default_factory=socket.gethostname)

    # -- Functions and callbacks (Node runtime names) -----------------------
    internal_jobs_callback_port: int = _env(
        "INTERNAL_JOBS_CALLBACK_PORT", default=12345, ge=1, le=65535
    )
    internal_jobs_callback_url: str | None = _env("INTERNAL_JOBS_CALLBACK_URL", default=None)
    internal_gateway_url: str | None = _env("INTERNAL_GATEWAY_URL", default=None)
    knative_service_url: str | None = _env("KNATIVE_SERVICE_URL", default=None)
    internal_gateway_development_map: dict[str, str] = _env(
        "INTERNAL_GATEWAY_DEVELOPMENT_MAP", default_factory=dict
    )
    node_env: str = _env("NODE_ENV", default="development")

    # -- lqjobs-only --------------------------------------------------------
    # How DATABASE_URL reaches Postgres, in PgBouncer's words: "session" (directly, or a
    # pooler in session mode: every connection is one server session) or "transaction"
    # (a transaction pooler: no session state survives a transaction; docs/postgres.md).
    database_pool_mode: Literal["session", "transaction"] = _env(
        "LQJOBS_DATABASE_POOL_MODE", default="session"
    )
    # A direct URL for LISTEN (a transaction pooler cannot deliver notifications);
    # unset: DATABASE_URL.
    listen_database_url: SecretStr | None = _env("LQJOBS_LISTEN_DATABASE_URL", default=None)
    # Unset, lqjobs' own processes use this default, and a host app's worker (register())
    # uses the host's broker: broker_url_given() tells the two apart.
    broker_url: SecretStr = _env("LQJOBS_BROKER_URL", default=SecretStr("redis://127.0.0.1:6379/0"))
    # The Celery queue lqjobs' messages go to and its workers consume (`-Q`). A name as
    # `-Q` takes it: no comma, no space.
    queue: str = _env("LQJOBS_QUEUE", default="lqjobs", pattern=r"^[\w.:-]{1,200}$")
    executor: ExecutorName = _env("LQJOBS_EXECUTOR", default="openfaas")
    task_executors: dict[str, Route] = _env("LQJOBS_TASK_EXECUTORS", default_factory=dict)
    knative_namespace: str = _env("LQJOBS_KNATIVE_NAMESPACE", default="default")
    # Call Knative services through this ingress (Host header = the service's host)
    # instead of resolving <task>.<namespace>.svc.cluster.local directly.
    knative_ingress_url: str | None = _env("LQJOBS_KNATIVE_INGRESS_URL", default=None)
    retry_on_404: bool = _env("LQJOBS_RETRY_ON_404", default=True)
    # A call that never reached its function (docs/design.md, F25) is retried this many
    # times in a row with its attempt returned; after that, each costs an attempt.
    never_ran_retries: int = _env("LQJOBS_NEVER_RAN_RETRIES", default=10, ge=0)
    db_pool_size: int = _env("LQJOBS_DB_POOL_SIZE", default=32, ge=1)
    metrics_port: int | None = _env("LQJOBS_METRICS_PORT", default=None, ge=0, le=65535)
    max_in_flight: int = _env("LQJOBS_MAX_IN_FLIGHT", default=200, ge=1)
    # Connections a bridge locks jobs on at once during a burst (a first batch that
    # came back full); one at a time otherwise. Each is a Postgres backend.
    lock_connections: int = _env("LQJOBS_LOCK_CONNECTIONS", default=2, ge=1, le=16)
    max_payload_bytes: int = _env("LQJOBS_MAX_PAYLOAD_BYTES", default=1024 * 1024, ge=2)
    poll_interval: float = _env("LQJOBS_POLL_INTERVAL", default=15.0, gt=0)
    # Seconds between the bridge's checks for a restarted Redis (its run_id), after
    # which it re-publishes the leases it holds (lqjobs/bridge/reconcile.py); 0 turns it off.
    reconcile_interval: float = _env("LQJOBS_RECONCILE_INTERVAL", default=5.0, ge=0)
    http_connect_timeout: float = _env("LQJOBS_HTTP_CONNECT_TIMEOUT", default=5.0, gt=0)
    http_timeout: float = _env("LQJOBS_HTTP_TIMEOUT", default=30.0, gt=0)
    task_soft_time_limit: float = _env("LQJOBS_TASK_SOFT_TIME_LIMIT", default=45.0, gt=0)
    task_time_limit: float = _env("LQJOBS_TASK_TIME_LIMIT", default=60.0, gt=0)
    visibility_timeout: float = _env("LQJOBS_VISIBILITY_TIMEOUT", default=120.0, gt=0)
    max_queue_wait: float = _env("LQJOBS_MAX_QUEUE_WAIT", default=180.0, gt=0)
    job_expiry: float = _env("LQJOBS_JOB_EXPIRY", default=600.0, gt=0)
    # The scheduler's stable id (default scheduler-<HOSTNAME>): it must survive restarts,
    # because the rows a dead scheduler held are released only by its successor.
    scheduler_id: str | None = _env("LQJOBS_SCHEDULER_ID", default=None)
    callback_keys: SecretStr | None = _env("LQJOBS_CALLBACK_KEYS", default=None)
    # The callback service's bind address. All interfaces by default: its callers (the
    # OpenFaaS queue-worker, functions) are other hosts or pods, and every request is
    # authenticated before any database access. Restrict it here or with a NetworkPolicy.
    callback_host: str = _env("LQJOBS_CALLBACK_HOST", default="0.0.0.0", min_length=1)
    # Seconds a job deferred to an asynchronous callback may wait for it before it is
    # failed; unset: 300 s, or half of LQJOBS_JOB_EXPIRY when that is shorter.
    callback_deadline: float | None = _env("LQJOBS_CALLBACK_DEADLINE", default=None, gt=0)
    # What clients may hold of the callback service (docs/design.md, S8): seconds to send
    # one whole request (head and body), connections open at once, and seconds a stop
    # waits for the requests in flight before it closes them.
    callback_request_timeout: float = _env("LQJOBS_CALLBACK_REQUEST_TIMEOUT", default=10.0, gt=0)
    callback_max_connections: int = _env("LQJOBS_CALLBACK_MAX_CONNECTIONS", default=256, ge=1)
    callback_drain_timeout: float = _env("LQJOBS_CALLBACK_DRAIN_TIMEOUT", default=10.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _env(
        "LQJOBS_LOG_LEVEL", default="INFO"
    )

    @field_validator("jobs_supported", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("task_executors")
    @classmethod
    def _weights_add_up(cls, value: dict[str, Route]) -> dict[str, Route]:
        for task, route in value.items():
            if isinstance(route, dict) and sum(route.values()) <= 0:
                raise ValueError(f"the weights of {task!r} add up to 0")
        return value

    @field_validator("jobs_schema")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL")
        return value

    # -- derived values ------------------------------------------------------

    def broker_url_given(self) -> bool:
        """Whether LQJOBS_BROKER_URL (or ``broker_url=``) was set, rather than defaulted."""
        return "broker_url" in self.model_fields_set

    def listen_conninfo(self) -> str:
        """Where LISTEN connects: LQJOBS_LISTEN_DATABASE_URL, else :meth:`conninfo`."""
        if self.listen_database_url is not None:
            return self.listen_database_url.get_secret_value()
        return self.conninfo()

    def listens_through_pooler(self) -> bool:
        """True when notifications cannot reach us: LISTEN would go through a
        transaction pooler (no direct listen URL given)."""
        return self.database_pool_mode == "transaction" and self.listen_database_url is None

    def poll_seconds(self) -> float:
        """Seconds between safety polls: LQJOBS_POLL_INTERVAL, except that a component
        that cannot LISTEN polls every POLL_WITHOUT_LISTEN unless the interval was set."""
        if self.listens_through_pooler() and "poll_interval" not in self.model_fields_set:
            return POLL_WITHOUT_LISTEN
        return self.poll_interval

    def conninfo(self) -> str:
        """libpq connection string: DATABASE_URL if given, else the PG* variables."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        parts = {
            "host": self.pghost,
            "port": self.pgport,
            "user": self.pguser,
            "password": self.pgpassword.get_secret_value() if self.pgpassword else None,
            "dbname": self.pgdatabase,
        }
        return make_conninfo("", **{k: v for k, v in parts.items() if v is not None})

    def task_filter(self) -> list[str] | None:
        """The task list handed to get_job: None means any task (JOBS_SUPPORT_ANY)."""
        return None if self.jobs_support_any else list(self.jobs_supported)

    def route_of(self, task_identifier: str) -> dict[ExecutorName, int]:
        """The task's executors with their weights (one executor: weight 1); executors
        of weight 0 left out."""
        route = self.task_executors.get(task_identifier, self.executor)
        if isinstance(route, str):
            return {route: 1}
        return {name: weight for name, weight in route.items() if weight > 0}

    def executor_names(self) -> set[ExecutorName]:
        """Every executor some task may route to."""
        names: set[ExecutorName] = {self.executor}
        for task in self.task_executors:
            names |= set(self.route_of(task))
        return names

    def callback_deadline_seconds(self) -> float:
        """How long a deferred job waits for its callback before it is failed."""
        if self.callback_deadline is not None:
            return self.callback_deadline
        return min(300.0, self.job_expiry / 2)

    def start_window_seconds(self) -> float:
        """How long after ``get_job`` locked it (database clock) a delivery may still
        start its job's call: the wait for a worker slot, plus one visibility timeout
        for the redelivery after a lost worker. The ladder keeps a call started that
        late inside the lease; a later delivery gives the lease back unrun."""
        return self.max_queue_wait + self.visibility_timeout

    def call_bound_seconds(self) -> float:
        """The longest one call can still be running after its start: the task's hard
        time limit (an HTTP exchange ends sooner, at its wall-clock deadline)."""
        return self.task_time_limit + 1.0

    def timeout_ladder_problems(self) -> list[str]:
        """Violations of T_http < T_soft < T_hard < V and V + T_hard + wait < E."""
        problems = []
        t_http = self.http_connect_timeout + self.http_timeout
        if not t_http < self.task_soft_time_limit:
            problems.append(
                "LQJOBS_HTTP_CONNECT_TIMEOUT + LQJOBS_HTTP_TIMEOUT "
                f"({t_http:g}s) must be below LQJOBS_TASK_SOFT_TIME_LIMIT "
                f"({self.task_soft_time_limit:g}s)"
            )
        if not self.task_soft_time_limit < self.task_time_limit:
            problems.append(
                f"LQJOBS_TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit:g}s) must be below "
                f"LQJOBS_TASK_TIME_LIMIT ({self.task_time_limit:g}s)"
            )
        if not self.task_time_limit < self.visibility_timeout:
            problems.append(
                f"LQJOBS_TASK_TIME_LIMIT ({self.task_time_limit:g}s) must be below "
                f"LQJOBS_VISIBILITY_TIMEOUT ({self.visibility_timeout:g}s)"
            )
        needed = self.max_queue_wait + self.visibility_timeout + self.task_time_limit
        if not needed < self.job_expiry:
            problems.append(
                "LQJOBS_MAX_QUEUE_WAIT + LQJOBS_VISIBILITY_TIMEOUT + LQJOBS_TASK_TIME_LIMIT "
                f"({needed:g}s) must be below LQJOBS_JOB_EXPIRY ({self.job_expiry:g}s)"
            )
        if not self.callback_deadline_seconds() < self.job_expiry:
            problems.append(
                f"LQJOBS_CALLBACK_DEADLINE ({self.callback_deadline_seconds():g}s) must be "
                f"below LQJOBS_JOB_EXPIRY ({self.job_expiry:g}s)"
            )
        return problems


def env_name(field: str) -> str:
    """The environment variable behind a Settings field."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Read the environment once; a bad value becomes one line naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None
    except SettingsError as exc:  # a JSON-valued variable that is not JSON
        found = re.search(r'field "(\w+)"', str(exc))
        variable = env_name(found.group(1)) if found else "settings"
        raise ConfigurationError(f"invalid {variable}: not valid JSON") from None


def _describe(exc: ValidationError) -> str:
    lines = []
    by_alias = {env_name(name): name for name in Settings.model_fields}
    for error in exc.errors(include_url=False, include_input=False):
        where = str(error["loc"][0]) if error["loc"] else "settings"
        field = by_alias.get(where, where)
        variable = env_name(field) if field in Settings.model_fields else where
        lines.append(f"invalid {variable}: {error['msg']}")
    return "; ".join(lines)


# Query parameters and conninfo keys that carry a secret (redis-py and kombu take
# ?password=, libpq sslpassword, tokens and keys in service URLs).
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Hide every secret in a URL or libpq conninfo, for logs and banners: the
    password of the user part and any secret-bearing query parameter or key."""
    if "://" in url:
        return _redact_uri(url)
    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "<unparsable conninfo>"
    shown = {
        key: "***" if _SECRET_KEY.search(key) else str(value)
        for key, value in params.items()
        if value is not None
    }
    return make_conninfo(**shown)


def _redact_uri(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if port is not None:
            host = f"{host}:{port}"
        netloc = f"{parts.username or ''}:***@{host}"
    query = [
        (key, "***" if _SECRET_KEY.search(key) else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*"), ""))
