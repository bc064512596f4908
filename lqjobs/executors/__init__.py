"""Invoke a job's function: one protocol, one class per platform.

An executor turns one job into an :data:`Outcome` and never raises for a failure of
the function or of the network. The package's modules, one role each:

* ``base``: the invocation, the outcomes, the errors, status classification, logs;
* ``validation``: task names, headers and URLs, checked before any I/O;
* ``http``: the shared HTTP client and the POST every HTTP executor makes;
* ``openfaas``, ``knative``, ``devmap``: one platform each;
* ``native``: Python handlers run in the Celery worker itself;
* ``router``: which executor runs a task, built once from the settings.
"""

from lqjobs.executors.base import (
    EXCERPT_CHARS,
    Deferred,
    Done,
    Failed,
    InvalidInvocation,
    Invocation,
    JobExecutor,
    Outcome,
    PermanentJobError,
    classify_status,
    is_permanent_status,
)
from lqjobs.executors.devmap import DevMapExecutor
from lqjobs.executors.http import MAX_RESPONSE_BYTES, FunctionClient, make_http_client
from lqjobs.executors.knative import KnativeExecutor
from lqjobs.executors.native import Handler, HandlerRegistry, NativeExecutor, handlers, job_handler
from lqjobs.executors.openfaas import OpenFaaSExecutor
from lqjobs.executors.router import ExecutorRouter, UnavailableExecutor, build_router
from lqjobs.executors.validation import build_headers, function_name

__all__ = [
    "EXCERPT_CHARS",
    "MAX_RESPONSE_BYTES",
    "Deferred",
    "DevMapExecutor",
    "Done",
    "ExecutorRouter",
    "Failed",
    "FunctionClient",
    "Handler",
    "HandlerRegistry",
    "InvalidInvocation",
    "Invocation",
    "JobExecutor",
    "KnativeExecutor",
    "NativeExecutor",
    "OpenFaaSExecutor",
    "Outcome",
    "PermanentJobError",
    "UnavailableExecutor",
    "build_headers",
    "build_router",
    "classify_status",
    "function_name",
    "handlers",
    "is_permanent_status",
    "job_handler",
    "make_http_client",
]
