"""A Prometheus text endpoint (``GET /metrics``) on a background thread.

Small on purpose: the processes expose a handful of counters and gauges, so the
exposition format is written by hand instead of adding a client library. Task
outcomes per task name come from Flower's own ``/metrics``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Sample:
    name: str  # without the lqjobs_ prefix
    kind: str  # "counter" | "gauge"
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


def counter_samples(
    name: str, help: str, counts: Mapping[str, int], label: str = "result"
) -> list[Sample]:
    """One sample per key of ``counts`` (e.g. per task result), as a labelled counter."""
    return [
        Sample(name, "counter", help, float(value), ((label, key),))
        for key, value in sorted(counts.items())
    ]


def serve(port: int | None, collect: Callable[[], Iterable[Sample]]) -> MetricsServer | None:
    """Start an endpoint on ``port`` (LQJOBS_METRICS_PORT) if one is configured."""
    return None if port is None else MetricsServer("0.0.0.0", port, collect).start()


def render(samples: Iterable[Sample]) -> str:
    lines: list[str] = []
    described: set[str] = set()
    for sample in samples:
        name = f"lqjobs_{sample.name}"
        if name not in described:
            lines += [f"# HELP {name} {sample.help}", f"# TYPE {name} {sample.kind}"]
            described.add(name)
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels)
        lines.append(
            f"{name}{{{labels}}} {sample.value:g}" if labels else f"{name} {sample.value:g}"
        )
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """Serves ``collect()`` as Prometheus text on ``host:port`` until ``stop()``."""

    def __init__(self, host: str, port: int, collect: Callable[[], Iterable[Sample]]) -> None:
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.collect = collect  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, daemon=True, name="metrics"
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        try:
            body = render(self.server.collect()).encode()  # type: ignore[attr-defined]
        except Exception:  # a failing collector must not take the process down
            self.send_error(503, "metrics unavailable")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the logs
