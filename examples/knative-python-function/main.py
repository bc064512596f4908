"""A job function for lqjobs, served on Knative or OpenFaaS: Python standard library only.

lqjobs POSTs the job's payload as the JSON body, with headers such as ``x-job-id``,
``x-job-attempt`` and ``Idempotency-Key``. A 2xx answer completes the job; 500 fails
it for a retry on the SQL back-off; 422 fails it for good (a retry cannot help).
"""

import json
import logging
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("send-welcome-email")


class PermanentError(ValueError):
    """The job can never succeed as it is: answer 422, not 500."""


def handle(payload: dict[str, Any], job_id: str | None) -> None:
    """The work. Raise to fail the job; the same job id may come again (at least once)."""
    if not isinstance(payload.get("id"), int):
        raise PermanentError("payload needs an integer 'id'")
    log.info("job %s: welcome e-mail for user %s", job_id, payload["id"])


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            payload = json.loads(body or b"{}")
            if not isinstance(payload, dict):
                raise PermanentError("payload must be a JSON object")
            handle(payload, self.headers.get("x-job-id"))
        except (PermanentError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.answer(422, {"message": str(exc)})
        except Exception as exc:
            self.answer(500, {"message": f"{type(exc).__name__}: {exc}"})
        else:
            self.answer(200, {})

    def do_GET(self) -> None:  # readiness: Knative probes /healthz, OpenFaaS /_/health
        ok = self.path in ("/healthz", "/_/health")
        self.answer(200 if ok else 404, {} if ok else {"message": "not found"})

    def answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def make_server(host: str = "0.0.0.0", port: int = 8080) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = False  # server_close() waits for requests in flight
    return server


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    server = make_server(port=int(os.environ.get("PORT", "8080")))  # Knative sets PORT
    # SIGTERM (scale-down, rollout): stop accepting, finish what is running, exit.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    server.server_close()
