"""Which executor runs a task: every configured executor built once, at start-up.

An executor whose configuration is missing or invalid is replaced by an
:class:`UnavailableExecutor` (logged once), which fails its jobs permanently
instead of stopping the worker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from lqjobs.errors import ConfigurationError
from lqjobs.executors.base import Failed, Invocation, JobExecutor, Outcome, log_refused, logger
from lqjobs.executors.devmap import DevMapExecutor
from lqjobs.executors.http import FunctionClient
from lqjobs.executors.knative import KnativeExecutor
from lqjobs.executors.native import HandlerRegistry, NativeExecutor, handlers
from lqjobs.executors.openfaas import OpenFaaSExecutor
from lqjobs.logs import escaped
from lqjobs.settings import ExecutorName, Settings


class UnavailableExecutor:
    """Stands in for an executor whose configuration is missing or invalid."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def invoke(self, invocation: Invocation) -> Outcome:
        message = f"executor {self.name} is not configured: {self.reason}"
        log_refused(self.name, invocation, message)
        return Failed(message, permanent=True)


def canary_bucket(job_id: int, total: int) -> int:
    """A job's place in ``range(total)``: a hash of its id, so consecutive ids spread
    evenly and a job keeps its place on every attempt."""
    digest = hashlib.blake2b(job_id.to_bytes(8, "big", signed=True), digest_size=8).digest()
    return int.from_bytes(digest, "big") % total


def pick_executor(route: Mapping[ExecutorName, int], job_id: int) -> ExecutorName:
    """The executor of ``route`` (weights) that runs job ``job_id``. The executors take
    the buckets in name order, so raising the first one's weight (``knative`` before
    ``openfaas``) only moves jobs onto it, never off it."""
    names = sorted(route)
    if len(names) == 1:
        return names[0]
    bucket = canary_bucket(job_id, sum(route.values()))
    for name in names:
        if bucket < route[name]:
            return name
        bucket -= route[name]
    raise AssertionError("bucket beyond the total weight")


class ExecutorRouter:
    """Picks the executor configured for a task (for a canary, for the job);
    executors are built once."""

    def __init__(self, settings: Settings, executors: Mapping[str, JobExecutor]) -> None:
        self._settings = settings
        self._executors = dict(executors)

    def for_task(self, task_identifier: str, job_id: int = 0) -> JobExecutor:
        name = pick_executor(self._settings.route_of(task_identifier), job_id)
        executor = self._executors.get(name)
        return executor if executor is not None else UnavailableExecutor(name, "not built")

    @property
    def executors(self) -> Mapping[str, JobExecutor]:
        return dict(self._executors)


def build_router(
    settings: Settings, client: FunctionClient, registry: HandlerRegistry = handlers
) -> ExecutorRouter:
    executors: dict[str, JobExecutor] = {
        name: _build_executor(name, settings, client, registry)
        for name in settings.executor_names()
    }
    warn_openfaas_after_flip(settings)
    return ExecutorRouter(settings, executors)


def openfaas_after_flip(settings: Settings) -> list[str]:
    """Tasks that still route (some of) their jobs to OpenFaaS once the default is
    Knative: the migration's leftovers."""
    if settings.executor != "knative":
        return []
    return sorted(
        task
        for task in settings.task_executors
        if {"openfaas", "openfaas-async"} & set(settings.route_of(task))
    )


def warn_openfaas_after_flip(settings: Settings) -> None:
    leftovers = openfaas_after_flip(settings)
    if leftovers:
        logger.warning(
            "OpenFaaS is deprecated here: the default executor is knative, but these "
            "tasks still route to OpenFaaS",
            extra={
                "action": "openfaas_deprecated",
                "tasks": ",".join(escaped(task) for task in leftovers),
            },
        )


def _build_executor(
    name: str, settings: Settings, client: FunctionClient, registry: HandlerRegistry
) -> JobExecutor:
    try:
        return _construct(name, settings, client, registry)
    except ConfigurationError as exc:
        logger.warning(
            "executor not configured",
            extra={"action": "executor_unavailable", "executor": name, "reason": str(exc)},
        )
        return UnavailableExecutor(name, str(exc))


def _construct(
    name: str, settings: Settings, client: FunctionClient, registry: HandlerRegistry
) -> JobExecutor:
    retry_on_404 = settings.retry_on_404
    match name:
        case "openfaas" | "openfaas-async":
            if not settings.internal_gateway_url:
                raise ConfigurationError("INTERNAL_GATEWAY_URL is not set")
            return OpenFaaSExecutor(
                client,
                settings.internal_gateway_url,
                asynchronous=name == "openfaas-async",
                retry_on_404=retry_on_404,
            )
        case "knative":
            return KnativeExecutor(
                client,
                namespace=settings.knative_namespace,
                service_suffix=settings.knative_service_url,
                ingress_url=settings.knative_ingress_url,
                retry_on_404=retry_on_404,
            )
        case "devmap":
            if not settings.internal_gateway_development_map:
                raise ConfigurationError("INTERNAL_GATEWAY_DEVELOPMENT_MAP is empty")
            mapping = settings.internal_gateway_development_map
            return DevMapExecutor(client, mapping, retry_on_404=retry_on_404)
        case "native":
            return NativeExecutor(registry)
    raise ConfigurationError(f"unknown executor {name!r}")
