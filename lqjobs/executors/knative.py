"""Knative: one service per task, reached directly or through the cluster's ingress."""

from __future__ import annotations

import functools
import re

import httpx

from lqjobs.errors import ConfigurationError
from lqjobs.executors.base import Invocation
from lqjobs.executors.http import FunctionClient, _body, _HttpExecutor, _Request
from lqjobs.executors.validation import _check_url, _Origin, build_headers, function_name

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class KnativeExecutor(_HttpExecutor):
    """A Knative service per task: ``http://<task>.<namespace>.svc.cluster.local/``.

    With ``service_suffix`` (``KNATIVE_SERVICE_URL``) the host is
    ``<task>.<suffix>``. With ``ingress_url`` the request goes to the ingress
    (Kourier, Istio), which routes on the ``Host`` header.
    """

    name = "knative"

    def __init__(
        self,
        client: FunctionClient,
        *,
        namespace: str = "default",
        service_suffix: str | None = None,
        ingress_url: str | None = None,
        retry_on_404: bool = True,
    ) -> None:
        super().__init__(client, retry_on_404)
        if service_suffix:
            self._suffix, self._port = _service_suffix(service_suffix)
        elif _DNS_LABEL.fullmatch(namespace):
            self._suffix, self._port = f"{namespace}.svc.cluster.local", None
        else:
            raise ConfigurationError("LQJOBS_KNATIVE_NAMESPACE must be a DNS label")
        self._ingress = (
            _Origin.parse(ingress_url, "LQJOBS_KNATIVE_INGRESS_URL") if ingress_url else None
        )

    def service_host(self, task: str) -> str:
        """``Host`` of the task's service (with the suffix's port, if it has one)."""
        host = f"{function_name(task)}.{self._suffix}"
        return host if self._port is None else f"{host}:{self._port}"

    @functools.cached_property
    def _ingress_url(self) -> httpx.URL | None:
        """The ingress' URL, the same for every task: built and checked once (a check
        that fails is not cached, so every job fails as before). None: no ingress."""
        return None if self._ingress is None else self._ingress.url("/")

    def _request(self, invocation: Invocation) -> _Request:
        authority = self.service_host(invocation.task_identifier)
        headers = build_headers(invocation)
        ingress = self._ingress_url
        if ingress is not None:
            headers["Host"] = authority
            return _Request(ingress, headers, _body(invocation))
        host = authority.partition(":")[0]
        port = self._port if self._port != 80 else None
        url = _check_url(f"http://{authority}/", "http", host, port, "/")
        return _Request(url, headers, _body(invocation))


def _service_suffix(value: str) -> tuple[str, int | None]:
    """``KNATIVE_SERVICE_URL`` (``default.example.com[:port]``) as a checked host and port."""
    host, _, port_text = value.strip().lower().partition(":")
    labels = host.split(".")
    if len(host) > 190 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigurationError(
            "KNATIVE_SERVICE_URL must be a host name such as default.example.com"
        )
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ConfigurationError("KNATIVE_SERVICE_URL has an invalid port")
    return host, int(port_text) if port_text else None
