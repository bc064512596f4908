"""register() on a host Celery app changes nothing global: the host's configuration
is the same key by key but for the route lqjobs adds, lqjobs' task carries every
option its guarantees need whatever the host's defaults, and what only a worker can
set is checked (lqjobs.host_checks), not overwritten."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from celery import Celery

from lqjobs.bridge.publisher import _direct_queue
from lqjobs.celery import (
    TASK_NAME,
    _check_worker,
    _with_broker,
    celery_config,
    create_app,
    dedicated_worker_config,
    register,
    with_route,
)
from lqjobs.host_checks import broker_of, same_broker, worker_concerns
from lqjobs.ops import doctor
from lqjobs.settings import Settings

HOST_BROKER = "redis://:host-secret@127.0.0.1:6390/0"
LQJOBS_BROKER = "redis://127.0.0.1:6391/0"
ROUTES_ADDED = {"task_routes"}


def settings(**overrides: Any) -> Settings:
    return Settings(**{"jobs_support_any": True, **overrides})


def host_app() -> Celery:
    """A shop's app as Celery's docs configure one: pickle, a result backend, time
    limits, routes and prefetch of its own."""
    app = Celery("host", broker=HOST_BROKER, backend="redis://127.0.0.1:6390/1")
    app.conf.update(
        task_serializer="pickle",
        result_serializer="pickle",
        accept_content=["pickle", "json"],
        task_time_limit=5,
        task_routes={"*": {"queue": "default"}},
        task_default_queue="default",
        worker_prefetch_multiplier=4,
        task_acks_late=False,
        task_track_started=True,
        task_retry_on_worker_lost=True,
    )
    return app


def snapshot(app: Celery) -> dict[str, Any]:
    """The whole configuration, deep-copied: an in-place change must show too."""
    return copy.deepcopy(dict(app.conf))


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def assert_conf_unchanged_but_routes(before: dict[str, Any], app: Celery) -> None:
    changed = changed_keys(before, snapshot(app)) - ROUTES_ADDED
    assert not changed, f"register() changed the host's {sorted(changed)}"


def test_register_leaves_the_host_configuration_as_it_was_but_for_the_route() -> None:
    app = host_app()
    before = snapshot(app)
    register(app, settings())
    assert_conf_unchanged_but_routes(before, app)
    assert changed_keys(before, snapshot(app)) == ROUTES_ADDED  # not vacuous
    assert app.conf.task_routes == {
        TASK_NAME: {"queue": "lqjobs"},
        "*": {"queue": "default"},
    }


def test_negative_control_the_old_register_fails_the_unchanged_assertion() -> None:
    """The old register() was ``app.conf.update(celery_config(settings))``: the same
    assertion catches it, naming what it rewrote."""
    app = host_app()
    before = snapshot(app)
    app.conf.update(celery_config(settings()))
    register(app, settings())
    with pytest.raises(AssertionError):
        assert_conf_unchanged_but_routes(before, app)
    rewritten = changed_keys(before, snapshot(app)) - ROUTES_ADDED
    assert {"task_serializer", "accept_content", "task_ignore_result", "broker_url"} <= rewritten
    assert {"task_time_limit", "worker_prefetch_multiplier"} <= rewritten


def test_lqjobs_task_carries_its_options_whatever_the_host_s_defaults() -> None:
    app = host_app()
    register(app, settings(task_soft_time_limit=40, task_time_limit=50))
    task = app.tasks[TASK_NAME]
    assert (task.acks_late, task.reject_on_worker_lost, task.ignore_result) == (True,) * 3
    assert (task.serializer, task.time_limit, task.soft_time_limit) == ("json", 50, 40)
    assert (task.track_started, task.retry_on_worker_lost) == (False, False)
    assert (task.acks_on_failure, task.acks_on_timeout, task.max_retries) == (True, True, None)
    # ...and the host's own tasks keep the host's.

    @app.task(name="host.work")
    def work() -> None: ...

    own = app.tasks["host.work"]
    assert (own.serializer, own.time_limit, own.acks_late, own.ignore_result) == (
        "pickle",
        5,
        False,
        False,
    )


def test_lqjobs_messages_go_to_lqjobs_queue_and_the_host_s_elsewhere() -> None:
    app = host_app()
    register(app, settings(queue="app-jobs"))
    assert app.amqp.router.route({}, TASK_NAME)["queue"].name == "app-jobs"
    assert app.amqp.router.route({}, "host.work")["queue"].name == "default"
    assert app.conf.task_default_queue == "default"


def test_lqjobs_own_app_consumes_and_publishes_lqjobs_queue() -> None:
    own = create_app(settings(queue="app-jobs"))
    queue = _direct_queue(own)  # where the bridge publishes
    assert queue is not None and queue.name == "app-jobs"
    assert own.conf.task_default_queue == "app-jobs"  # what `celery -A tasks worker` consumes
    assert set(own.amqp.queues.consume_from) == {"app-jobs"}


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        (None, {TASK_NAME: {"queue": "q"}}),
        ({"a": "x", TASK_NAME: "old"}, {TASK_NAME: {"queue": "q"}, "a": "x"}),
        ([{"a": "x"}], [{TASK_NAME: {"queue": "q"}}, {"a": "x"}]),
        ("proj.routers.route", [{TASK_NAME: {"queue": "q"}}, "proj.routers.route"]),
        ([{TASK_NAME: {"queue": "q"}}, "r"], [{TASK_NAME: {"queue": "q"}}, "r"]),  # once
    ],
)
def test_the_route_comes_first_and_the_host_s_value_is_not_mutated(
    routes: Any, expected: Any
) -> None:
    kept = copy.deepcopy(routes)
    assert with_route(routes, "q") == expected
    assert routes == kept


def test_a_configuration_loaded_after_register_keeps_the_route() -> None:
    """register() before config_from_object(): Celery loads the configuration anew."""

    class HostConfig:
        task_routes: ClassVar = {"a": {"queue": "x"}}

    app = Celery("late", set_as_current=False)
    register(app, settings())
    assert app.conf.task_routes == {TASK_NAME: {"queue": "lqjobs"}}
    app.config_from_object(HostConfig)
    assert app.conf.task_routes == {TASK_NAME: {"queue": "lqjobs"}, "a": {"queue": "x"}}


def test_register_reads_no_configuration_of_an_app_not_yet_configured() -> None:
    """A Django shop's settings load when Celery first needs them, not at register()."""
    app = Celery("lazy", set_as_current=False)
    register(app, settings())
    assert not app.configured


# -- the broker -------------------------------------------------------------------------


def test_an_unset_lqjobs_broker_means_the_host_s_broker_in_its_worker() -> None:
    app = host_app()
    unset = settings()
    assert not unset.broker_url_given()
    register(app, unset)
    assert _with_broker(unset, app).broker_url.get_secret_value() == HOST_BROKER
    given = settings(broker_url=LQJOBS_BROKER)
    assert _with_broker(given, app).broker_url.get_secret_value() == LQJOBS_BROKER
    # lqjobs' own processes keep the default.
    assert create_app(unset).conf.broker_url == "redis://127.0.0.1:6379/0"


def test_the_worker_s_broker_follows_its_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", LQJOBS_BROKER)  # what `--broker` sets
    assert broker_of(host_app()) == LQJOBS_BROKER


def test_broker_urls_compare_with_redis_defaults_filled_in() -> None:
    assert same_broker("redis://h", "redis://h:6379/0")
    assert not same_broker("redis://h:6379/0", "redis://h:6379/1")
    assert not same_broker("redis://:a@h/0", "redis://:b@h/0")


# -- what only a worker can set ----------------------------------------------------------


def concerns_of(app: Celery, lqjobs: Settings, **worker: Any) -> dict[str, bool]:
    return {c.setting: c.severe for c in worker_concerns(app, lqjobs, **worker)}


def test_lqjobs_own_app_raises_no_concern() -> None:
    """The checks agree with the configuration create_app() applies."""
    lqjobs = settings(broker_url=LQJOBS_BROKER)
    assert worker_concerns(create_app(lqjobs), lqjobs) == []


def test_a_host_with_celery_s_defaults_is_told_what_weakens() -> None:
    assert concerns_of(host_app(), settings()) == {
        "worker_prefetch_multiplier": False,
        "broker_transport_options.visibility_timeout": False,
        "broker_transport_options.unacked_restore_interval": False,
        "broker_transport": False,
    }


def test_the_dedicated_worker_settings_clear_those_concerns() -> None:
    app = host_app()
    lqjobs = settings(broker_url=LQJOBS_BROKER)
    app.conf.update(dedicated_worker_config(lqjobs))
    assert worker_concerns(app, lqjobs) == []


def test_the_worker_s_own_prefetch_counts() -> None:
    app = host_app()
    assert "worker_prefetch_multiplier" not in concerns_of(app, settings(), prefetch_multiplier=1)
    app.conf.worker_disable_prefetch = True
    assert "worker_prefetch_multiplier" not in concerns_of(app, settings())


def test_what_stops_lqjobs_jobs_is_severe() -> None:
    app = host_app()
    app.conf.accept_content = ["pickle"]
    found = concerns_of(app, settings(broker_url=LQJOBS_BROKER))
    assert found["accept_content"] is True  # its messages would be refused
    assert found["broker_url"] is True  # the bridge publishes to another broker
    app.conf.update(
        broker_url="amqp://guest@rabbit//", worker_cancel_long_running_tasks_on_connection_loss=True
    )
    found = concerns_of(app, settings())
    assert found["broker_url"] is False  # not Redis: the Redis-based protections are off
    assert found["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert not any(key.startswith("broker_transport") for key in found)


def test_a_visibility_timeout_below_the_call_is_named() -> None:
    app = host_app()
    app.conf.broker_transport_options = {"visibility_timeout": 30}
    (concern,) = [c for c in worker_concerns(app, settings()) if "visibility" in c.setting]
    assert "F6" in concern.detail and "30s" in concern.detail


class FakeWorker(SimpleNamespace):
    app: Celery
    prefetch_multiplier: int


def test_a_worker_consuming_lqjobs_queue_logs_each_concern_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = host_app()
    app.conf.accept_content = ["pickle"]
    register(app, settings())
    app.amqp.queues.select(["default", "lqjobs"])  # what -Q does
    with caplog.at_level(logging.INFO, logger="lqjobs.celery"):
        _check_worker(instance=FakeWorker(app=app, prefetch_multiplier=1))
    shown = {r.setting: r.levelno for r in caplog.records}  # type: ignore[attr-defined]
    assert shown["accept_content"] == logging.ERROR
    assert "worker_prefetch_multiplier" not in shown  # the worker's own value counts
    assert shown["broker_transport"] == logging.WARNING
    assert all(r.consumed == "default,lqjobs" for r in caplog.records)  # type: ignore[attr-defined]


def test_a_worker_that_does_not_consume_lqjobs_queue_only_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = host_app()
    app.conf.accept_content = ["pickle"]
    register(app, settings())
    app.amqp.queues.select(["default"])
    unregistered = host_app()
    with caplog.at_level(logging.INFO, logger="lqjobs.celery"):
        _check_worker(instance=FakeWorker(app=app, prefetch_multiplier=4))
        _check_worker(instance=FakeWorker(app=unregistered, prefetch_multiplier=4))
    assert [r.action for r in caplog.records] == ["lqjobs_queue_not_consumed"]  # type: ignore[attr-defined]


def test_the_worker_path_imports_no_top_level_tasks_or_bridge() -> None:
    """A host project's own ``tasks.py`` (or ``bridge.py``) must never be what lqjobs
    imports: the modules a worker of a host app loads import neither name."""
    code = (
        "import sys; import lqjobs.celery, lqjobs.executors, lqjobs.worker, lqjobs.host_checks;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tasks', 'bridge')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


# -- lqjobs doctor --app ------------------------------------------------------------------


def test_doctor_names_the_host_settings_that_weaken_a_guarantee() -> None:
    app = host_app()
    app.conf.accept_content = ["pickle"]
    register(app, settings())
    found = {f.check: f.level for f in doctor.check_host_app(app, settings())}
    assert found["host app"] is doctor.Level.OK
    assert found["host broker"] is doctor.Level.OK  # LQJOBS_BROKER_URL unset: the app's
    assert found["accept_content"] is doctor.Level.FAIL
    assert found["worker_prefetch_multiplier"] is doctor.Level.WARN


def test_doctor_fails_an_app_without_lqjobs_or_with_its_task_routed_away() -> None:
    (missing,) = doctor.check_host_app(host_app(), settings())
    assert missing.level is doctor.Level.FAIL and "not registered" in missing.detail
    app = host_app()
    register(app, settings())
    assert TASK_NAME in app.conf.task_routes  # the configuration is loaded...
    app.conf.task_routes = {"*": {"queue": "default"}}  # ...and then replaced
    (routed,) = doctor.check_host_app(app, settings())
    assert routed.level is doctor.Level.FAIL and "'default'" in routed.detail


def test_doctor_checks_the_app_s_broker_when_lqjobs_has_none_of_its_own() -> None:
    seen: list[str] = []

    def broker_check(checked: Settings) -> list[doctor.Finding]:
        seen.append(checked.broker_url.get_secret_value())
        return []

    app = host_app()
    register(app, settings())
    doctor.diagnose(settings(), [broker_check], app=app)
    doctor.diagnose(settings(broker_url=LQJOBS_BROKER), [broker_check], app=app)
    assert seen == [HOST_BROKER, LQJOBS_BROKER]


def test_transaction_pooling_without_redis_start_claims_is_named() -> None:
    """Through a transaction pooler the worker takes no advisory locks: only Redis'
    start claim keeps a lease's deliveries from calling twice."""
    rabbit = "amqp://guest@rabbit//"
    app = host_app()
    app.conf.broker_url = rabbit
    pooled = settings(broker_url=rabbit, database_pool_mode="transaction")
    assert concerns_of(app, pooled)["LQJOBS_DATABASE_POOL_MODE"] is False
    assert "LQJOBS_DATABASE_POOL_MODE" not in concerns_of(app, settings(broker_url=rabbit))
    on_redis = settings(broker_url=LQJOBS_BROKER, database_pool_mode="transaction")
    assert "LQJOBS_DATABASE_POOL_MODE" not in concerns_of(host_app(), on_redis)
