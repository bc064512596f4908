from __future__ import annotations

import pytest

from lqjobs.errors import ConfigurationError
from lqjobs.settings import POLL_WITHOUT_LISTEN, Settings, env_name, load_settings, redact_url

CANARY = "pw-CANARY-1"


def test_node_runtime_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "PGHOST": "db.internal",
        "PGPORT": "5433",
        "PGUSER": "jobs",
        "PGPASSWORD": CANARY,
        "PGDATABASE": "app",
        "JOBS_SCHEMA": "my_jobs",
        "JOBS_SUPPORT_ANY": "false",
        "JOBS_SUPPORTED": "send-email, resize ,",
        "HOSTNAME": "pod-1",
        "INTERNAL_JOBS_CALLBACK_PORT": "12346",
        "INTERNAL_GATEWAY_URL": "http://gateway:8080",
        "KNATIVE_SERVICE_URL": "default.example.com",
        "INTERNAL_GATEWAY_DEVELOPMENT_MAP": '{"send-email": "http://localhost:9000"}',
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.jobs_supported == ("send-email", "resize")
    assert settings.task_filter() == ["send-email", "resize"]
    assert settings.jobs_schema == "my_jobs"
    assert settings.hostname == "pod-1"
    assert settings.internal_jobs_callback_port == 12346
    assert settings.internal_gateway_development_map == {"send-email": "http://localhost:9000"}
    conninfo = settings.conninfo()
    assert "host=db.internal" in conninfo and "port=5433" in conninfo
    assert CANARY in conninfo  # handed to libpq ...
    assert CANARY not in redact_url(conninfo)  # ... and never printed
    assert CANARY not in repr(settings) and CANARY not in str(settings.model_dump())


def test_database_url_wins_over_pg_variables() -> None:
    settings = Settings(database_url="postgresql://u:p@h/d", pghost="other")
    assert settings.conninfo() == "postgresql://u:p@h/d"


def test_support_any_means_no_task_filter() -> None:
    assert Settings(jobs_support_any=True, jobs_supported=("a",)).task_filter() is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PGPORT", "not-a-port"),
        ("PGPORT", "70000"),
        ("JOBS_SUPPORT_ANY", "maybe"),
        ("INTERNAL_GATEWAY_DEVELOPMENT_MAP", "{not json"),
        ("LQJOBS_EXECUTOR", "lambda"),
        ("LQJOBS_MAX_IN_FLIGHT", "0"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid {variable}:")
    assert "\n" not in message


def test_a_bad_secret_is_named_but_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LQJOBS_BROKER_URL", "")  # fine: a str
    monkeypatch.setenv("LQJOBS_CALLBACK_KEYS", CANARY)
    monkeypatch.setenv("PGPORT", CANARY)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "invalid PGPORT" in str(caught.value)
    assert CANARY not in str(caught.value)


def test_env_name_maps_fields_to_variables() -> None:
    assert env_name("pgpassword") == "PGPASSWORD"
    assert env_name("max_in_flight") == "LQJOBS_MAX_IN_FLIGHT"


def test_default_timeout_ladder_holds() -> None:
    assert Settings().timeout_ladder_problems() == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"http_timeout": 50.0}, "LQJOBS_TASK_SOFT_TIME_LIMIT"),
        ({"task_soft_time_limit": 70.0, "http_timeout": 10.0}, "LQJOBS_TASK_TIME_LIMIT ("),
        ({"visibility_timeout": 30.0}, "LQJOBS_VISIBILITY_TIMEOUT ("),
        ({"job_expiry": 300.0}, "LQJOBS_JOB_EXPIRY"),
    ],
)
def test_timeout_ladder_violations_are_named(overrides: dict[str, float], named: str) -> None:
    problems = Settings(**overrides).timeout_ladder_problems()
    assert problems and any(named in problem for problem in problems)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        (
            "postgresql://app:s3cret@db:5432/app?sslmode=require",
            "postgresql://app:***@db:5432/app?sslmode=require",
        ),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0?password=***"),
        (
            "rediss://h/0?ssl_cert_reqs=none&password=s3cret",
            "rediss://h/0?ssl_cert_reqs=none&password=***",
        ),
        ("amqp://guest@mq//?auth_token=s3cret", "amqp://guest@mq//?auth_token=***"),
        (
            "postgresql://db/app?user=app&password=s3cret&sslpassword=s3cret",
            "postgresql://db/app?user=app&password=***&sslpassword=***",
        ),
        ("postgresql://app:s3cret@db:bad/app", "<unparsable URL>"),
        ("host=db password=s3cret dbname=app", "dbname=app host=db password=***"),
        ("host=db sslpassword=s3cret", "host=db sslpassword=***"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert sorted(redact_url(url).split()) == sorted(shown.split())
    assert "s3cret" not in redact_url(url)


def test_a_component_that_cannot_listen_polls_every_second_unless_told() -> None:
    base = {"database_url": "postgresql://pgbouncer:6432/app"}
    assert Settings(**base).poll_seconds() == 15.0  # direct: LISTEN wakes it
    pooled = Settings(**base, database_pool_mode="transaction")
    assert pooled.listens_through_pooler() and pooled.poll_seconds() == POLL_WITHOUT_LISTEN
    direct_listen = Settings(
        **base, database_pool_mode="transaction", listen_database_url="postgresql://db/app"
    )
    assert not direct_listen.listens_through_pooler() and direct_listen.poll_seconds() == 15.0
    told = Settings(**base, database_pool_mode="transaction", poll_interval=5)
    assert told.poll_seconds() == 5.0
