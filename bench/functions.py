"""The bench's stand-in function: a minimal HTTP/1.1 responder on asyncio.

In service a job's function runs in its own pod, not on the cores of the bridge
and the workers; here it shares this machine's two cores with them.
``lqjobs.ops.example_functions.FunctionServer`` (built for tests: every route, status
and callback they need) spends about 1 ms of CPU per call in ``http.server``, a
tenth of a no-op job's whole cost, so the bench would partly measure its own
stand-in. This one answers keep-alive POSTs from one thread.

It records each call as one JSON line (``job_id``, ``started``, ``ended``, on the
monotonic clock the bench shares) and understands the two payload keys the bench
sends: ``sleep`` (seconds before answering) and ``fail_times`` (answer 500 to a
job's first N calls).

``python -m bench.functions PORT CALLS_PATH``
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any


def _response(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


OK = _response("200 OK", b"{}")
FAILED = _response("500 Internal Server Error", b'{"message": "failing, as asked"}')


class Functions:
    def __init__(self, log: IO[str]) -> None:
        self.log = log
        self.calls_per_job: Counter[int] = Counter()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                started = time.monotonic()
                job_id, length = _headers(head)
                body = await reader.readexactly(length) if length else b""
                writer.write(await self.call(job_id, body, started))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed its keep-alive connection
        finally:
            writer.close()

    async def call(self, job_id: int, body: bytes, started: float) -> bytes:
        options = _options(body)
        sleep = float(options.get("sleep", 0))
        if sleep > 0:
            await asyncio.sleep(sleep)
        self.calls_per_job[job_id] += 1
        failing = self.calls_per_job[job_id] <= int(options.get("fail_times", 0))
        record = {"job_id": job_id, "started": started, "ended": time.monotonic()}
        self.log.write(json.dumps(record) + "\n")  # line-buffered: one write per call
        return FAILED if failing else OK


def _headers(head: bytes) -> tuple[int, int]:
    """X-Job-Id and Content-Length of one request head."""
    job_id = length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"x-job-id":
            job_id = int(value)
    return job_id, length


def _options(body: bytes) -> dict[str, Any]:
    if b"sleep" not in body and b"fail_times" not in body:
        return {}  # the no-op payload: not worth a JSON parse
    payload = json.loads(body)
    return payload if isinstance(payload, dict) else {}


async def main(port: int, calls_path: Path) -> None:
    with calls_path.open("a", encoding="utf-8", buffering=1) as log:
        functions = Functions(log)
        server = await asyncio.start_server(functions.serve, "127.0.0.1", port, backlog=256)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
