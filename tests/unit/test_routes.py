"""Canary routes: each job's executor is picked from its id and the task's weights."""

from __future__ import annotations

from collections import Counter

import pytest

from lqjobs.errors import ConfigurationError
from lqjobs.executors import Failed, classify_status
from lqjobs.executors.http import parse_retry_after
from lqjobs.executors.router import openfaas_after_flip, pick_executor
from lqjobs.ops.doctor import route_findings
from lqjobs.settings import Settings, load_settings

CANARY = {"knative": 10, "openfaas": 90}


def test_a_canary_splits_consecutive_ids_by_weight_and_keeps_each_job_on_its_route() -> None:
    picks = {job_id: pick_executor(CANARY, job_id) for job_id in range(1, 10_001)}
    shares = Counter(picks.values())
    assert 900 <= shares["knative"] <= 1100  # 10 % of 10,000, give or take
    assert all(pick_executor(CANARY, job_id) == picked for job_id, picked in picks.items())


def test_raising_the_first_weight_only_moves_jobs_onto_it() -> None:
    before = {job_id: pick_executor(CANARY, job_id) for job_id in range(1, 5001)}
    after = {job_id: pick_executor({"knative": 50, "openfaas": 50}, job_id) for job_id in before}
    assert all(after[job_id] == "knative" for job_id, route in before.items() if route == "knative")
    assert sum(route == "knative" for route in after.values()) > 2 * sum(
        route == "knative" for route in before.values()
    )


def test_routes_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "LQJOBS_TASK_EXECUTORS", '{"resize-image": {"knative": 10, "openfaas": 90}, "a": "native"}'
    )
    settings = load_settings()
    assert settings.route_of("resize-image") == CANARY
    assert settings.route_of("a") == {"native": 1}
    assert settings.route_of("other") == {"openfaas": 1}
    assert settings.executor_names() == {"knative", "openfaas", "native"}
    monkeypatch.setenv("LQJOBS_TASK_EXECUTORS", '{"t": {"knative": 0, "openfaas": 0}}')
    with pytest.raises(ConfigurationError, match="LQJOBS_TASK_EXECUTORS"):
        load_settings()
    monkeypatch.setenv("LQJOBS_TASK_EXECUTORS", '{"t": {"lambda": 5}}')
    with pytest.raises(ConfigurationError, match="LQJOBS_TASK_EXECUTORS"):
        load_settings()


def test_after_the_flip_openfaas_routes_are_named_deprecated() -> None:
    flipped = Settings(
        executor="knative", task_executors={"legacy": "openfaas", "resize": CANARY, "k": "knative"}
    )
    assert openfaas_after_flip(flipped) == ["legacy", "resize"]
    assert openfaas_after_flip(Settings(task_executors={"legacy": "openfaas"})) == []
    lines = [(f.level.value, f.detail) for f in route_findings(flipped)]
    assert ("ok", "resize: knative 10 %, openfaas 90 %") in lines
    assert (
        "warn",
        "OpenFaaS is deprecated after the flip to knative; still routed there: legacy, resize",
    ) in lines


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_a_gateway_s_answer_means_the_function_never_ran(status: int) -> None:
    outcome = classify_status(status, retry_on_404=True, retry_after=3.0)
    assert isinstance(outcome, Failed) and outcome.never_ran and outcome.retry_after == 3.0
    assert not outcome.permanent


@pytest.mark.parametrize("status", [500, 501, 404, 422])
def test_the_function_s_own_failure_ran(status: int) -> None:
    outcome = classify_status(status, retry_on_404=True, retry_after=3.0)
    assert isinstance(outcome, Failed) and not outcome.never_ran


def test_retry_after_reads_seconds_and_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
