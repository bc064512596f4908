"""Which executor runs a task: every configured executor built once, at start-up.

An executor whose configuration is missing or invalid is replaced by an
:class:`UnavailableExecutor` (logged once), which fails its jobs permanently
instead of stopping the worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from lqjobs.errors import ConfigurationError
from lqjobs.executors.base import Failed, Invocation, JobExecutor, Outcome, log_refused, logger
from lqjobs.executors.devmap import DevMapExecutor
from lqjobs.executors.http import FunctionClient
from lqjobs.executors.knative import KnativeExecutor
from lqjobs.executors.native import HandlerRegistry, NativeExecutor, handlers
from lqjobs.executors.openfaas import OpenFaaSExecutor
from lqjobs.settings import Settings


class UnavailableExecutor:
    """Stands in for an executor whose configuration is missing or invalid."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def invoke(self, invocation: Invocation) -> Outcome:
        message = f"executor {self.name} is not configured: {self.reason}"
        log_refused(self.name, invocation, message)
        return Failed(message, permanent=True)


class ExecutorRouter:
    """Picks the executor configured for a task; executors are built once."""

    def __init__(self, settings: Settings, executors: Mapping[str, JobExecutor]) -> None:
        self._settings = settings
        self._executors = dict(executors)

    def for_task(self, task_identifier: str) -> JobExecutor:
        name = self._settings.executor_for(task_identifier)
        executor = self._executors.get(name)
        return executor if executor is not None else UnavailableExecutor(name, "not built")

    @property
    def executors(self) -> Mapping[str, JobExecutor]:
        return dict(self._executors)


def build_router(
    settings: Settings, client: FunctionClient, registry: HandlerRegistry = handlers
) -> ExecutorRouter:
    names = {settings.executor, *settings.task_executors.values()}
    executors: dict[str, JobExecutor] = {
        name: _build_executor(name, settings, client, registry) for name in names
    }
    return ExecutorRouter(settings, executors)


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
