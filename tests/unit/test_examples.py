"""examples/knative-python-function: the function answers the way lqjobs expects, and
its Knative and OpenFaaS manifests fit lqjobs' naming and timeout ladder."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lqjobs.executors import (
    Done,
    Failed,
    Invocation,
    KnativeExecutor,
    function_name,
    make_http_client,
)
from lqjobs.settings import Settings, load_settings
from tests.yaml_subset import load_yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knative-python-function"
SERVICE: dict[str, Any] = load_yaml((EXAMPLE / "service.yaml").read_text())
STACK: dict[str, Any] = load_yaml((EXAMPLE / "stack.yml").read_text())
TASK = SERVICE["metadata"]["name"]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("knative_python_function", EXAMPLE / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def function() -> Iterator[tuple[ModuleType, int]]:
    """The example's server on 127.0.0.1, an ephemeral port, in a thread."""
    module = load_example()
    server = module.make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield module, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    connection = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def post_job(port: int, payload: bytes, job_id: int = 7) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "x-job-id": str(job_id)}
    return request(port, "POST", "/", payload, headers)


def invocation(payload: str, job_id: int = 7) -> Invocation:
    return Invocation(
        job_id=job_id,
        task_identifier=TASK,
        database_id=str(uuid.uuid4()),
        worker_id="bridge-test-0a1b2c",
        attempt=1,
        payload=payload,
        call_id="call-1",
    )


def go_duration(text: str) -> float:
    """Seconds in a Go duration such as ``25s`` or ``1m30s``."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    assert parts and text, f"not a Go duration: {text!r}"
    hours, minutes, seconds = (float(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def dockerfile() -> dict[str, list[str]]:
    instructions: dict[str, list[str]] = {}
    for line in (EXAMPLE / "Dockerfile").read_text().splitlines():
        if line.strip() and not line.startswith((" ", "#")):
            keyword, _, args = line.partition(" ")
            instructions.setdefault(keyword, []).append(args.strip())
    return instructions


# -- the function ------------------------------------------------------------------------


def test_a_job_is_done_with_200_and_its_job_id_reaches_the_work(
    function: tuple[ModuleType, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, port = function
    with caplog.at_level(logging.INFO, logger="send-welcome-email"):
        assert post_job(port, b'{"id": 42}', job_id=1234) == (200, {})
    assert any("job 1234" in r.getMessage() and "42" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("payload", [b'{"id": "forty-two"}', b"[1, 2]", b"not json", b"\xff\xfe"])
def test_a_job_that_can_never_succeed_is_answered_422(
    function: tuple[ModuleType, int], payload: bytes
) -> None:
    _, port = function
    status, body = post_job(port, payload)
    assert status == 422
    assert isinstance(body["message"], str) and body["message"]


def test_a_failing_job_is_answered_500_with_its_message(
    function: tuple[ModuleType, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, port = function

    def broken(payload: dict[str, Any], job_id: str | None) -> None:
        raise ConnectionError("smtp server unreachable")

    monkeypatch.setattr(module, "handle", broken)
    assert post_job(port, b'{"id": 42}') == (
        500,
        {"message": "ConnectionError: smtp server unreachable"},
    )


def test_lqjobs_reads_the_answers_as_done_retry_and_permanent(
    function: tuple[ModuleType, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, port = function
    with make_http_client(load_settings()) as client:
        # called through an ingress, as Knative's Kourier / Istio route on the Host header
        executor = KnativeExecutor(client, ingress_url=f"http://127.0.0.1:{port}")
        assert executor.invoke(invocation('{"id": 42}')) == Done()
        refused = executor.invoke(invocation('{"id": null}'))
        assert isinstance(refused, Failed) and refused.permanent
        assert "integer 'id'" in refused.message

        def broken(payload: dict[str, Any], job_id: str | None) -> None:
            raise TimeoutError("upstream slow")

        monkeypatch.setattr(module, "handle", broken)
        failed = executor.invoke(invocation('{"id": 42}'))
        assert isinstance(failed, Failed) and not failed.permanent
        assert "upstream slow" in failed.message


def test_the_probed_health_paths_answer(function: tuple[ModuleType, int]) -> None:
    _, port = function
    container = SERVICE["spec"]["template"]["spec"]["containers"][0]
    probed = {
        container["readinessProbe"]["httpGet"]["path"],  # Knative
        STACK["functions"][TASK]["annotations"]["com.openfaas.health.http.path"],
        "/_/health",  # OpenFaaS' default HTTP probe
    }
    assert {path: request(port, "GET", path)[0] for path in probed} == dict.fromkeys(probed, 200)
    assert request(port, "GET", "/nothing-here")[0] == 404


def test_the_script_serves_on_port_and_exits_cleanly_on_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "main.py")],
        env={"PORT": str(port), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the function never listened"
                time.sleep(0.05)
        assert post_job(port, b'{"id": 1}') == (200, {})
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


# -- the manifests -----------------------------------------------------------------------


def test_the_knative_service_is_cluster_local_and_named_after_the_task() -> None:
    assert SERVICE["apiVersion"] == "serving.knative.dev/v1"
    assert SERVICE["kind"] == "Service"
    labels = SERVICE["metadata"]["labels"]
    assert labels["networking.knative.dev/visibility"] == "cluster-local"
    assert function_name(TASK) == TASK  # lqjobs can route to it: a DNS-1035 label
    container = SERVICE["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8080
    assert container["securityContext"]["runAsNonRoot"] is True


def test_knative_ends_a_request_before_lqjobs_gives_up_on_it() -> None:
    settings = Settings()
    timeout = SERVICE["spec"]["template"]["spec"]["timeoutSeconds"]
    assert isinstance(timeout, int) and 0 < timeout < settings.http_timeout
    assert settings.http_timeout < settings.task_soft_time_limit < settings.task_time_limit


def test_the_openfaas_stack_deploys_the_same_function() -> None:
    assert STACK["version"] == 1.0
    assert STACK["provider"]["name"] == "openfaas"
    assert set(STACK["functions"]) == {TASK}
    fn = STACK["functions"][TASK]
    assert fn["lang"] == "dockerfile"
    assert (EXAMPLE / fn["handler"] / "Dockerfile").is_file()
    assert fn["image"] == SERVICE["spec"]["template"]["spec"]["containers"][0]["image"]


def test_openfaas_timeouts_sit_below_lqjobs_http_timeout() -> None:
    env = STACK["functions"][TASK]["environment"]
    execute = go_duration(env["exec_timeout"])
    read, write = go_duration(env["read_timeout"]), go_duration(env["write_timeout"])
    assert 0 < execute <= min(read, write)
    assert max(read, write) < Settings().http_timeout


def test_the_image_runs_the_script_as_a_non_root_user_on_8080() -> None:
    instructions = dockerfile()
    assert instructions["FROM"] == ["python:3.11-slim"]
    assert instructions["COPY"] == ["main.py ./"]
    assert instructions["USER"][-1] not in ("root", "0")
    assert instructions["EXPOSE"] == ["8080"]
    assert "PORT=8080" in (EXAMPLE / "Dockerfile").read_text()
    assert instructions["CMD"] == ['["python", "main.py"]']
