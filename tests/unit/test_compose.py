"""docker-compose.yml, .env.example and the Dockerfile agree with each other and with
the code, checked without Docker: commands name real subcommands, environment names
are ones lqjobs (or the third-party image) reads, and the services are wired to each
other the way their settings say."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import pytest
from celery import Celery
from celery.app.utils import find_app
from celery.bin.celery import celery as celery_cli
from psycopg.conninfo import conninfo_to_dict

from lqjobs.executors import UnavailableExecutor, build_router
from lqjobs.lease import TASK_NAME
from lqjobs.ops import migrate
from lqjobs.ops.cli import main as lqjobs_cli
from lqjobs.settings import Settings, load_settings
from tests.yaml_subset import load_yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = load_yaml(COMPOSE_TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]

# definitions.service / definitions.healthcheck of the Compose specification's schema
# (compose-spec/compose-spec, schema/compose-spec.json); jsonschema is not installed.
_SERVICE_KEYS = """
annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command
configs container_name cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period
cpu_rt_runtime cpu_shares cpus cpuset credential_spec depends_on deploy develop
device_cgroup_rules devices dns dns_opt dns_search domainname entrypoint env_file
environment expose extends external_links extra_hosts gpus group_add healthcheck
hostname image init ipc isolation label_file labels links logging mac_address mem_limit
mem_reservation mem_swappiness memswap_limit models network_mode networks
oom_kill_disable oom_score_adj pid pids_limit platform ports post_start pre_stop
privileged profiles provider pull_policy pull_refresh_after read_only restart runtime
scale secrets security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt
sysctls tmpfs tty ulimits use_api_socket user userns_mode uts volumes volumes_from
working_dir
"""
SERVICE_KEYS = frozenset(_SERVICE_KEYS.split())
TOP_LEVEL_KEYS = frozenset(
    {"version", "name", "include", "services", "networks", "volumes", "configs", "secrets"}
)
HEALTHCHECK_KEYS = frozenset(
    {"disable", "interval", "retries", "start_interval", "start_period", "test", "timeout"}
)
CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})
RESTART_POLICIES = re.compile(r"no|always|unless-stopped|on-failure(:[0-9]+)?")
# Variables the official postgres and redis images (and Flower) read themselves.
THIRD_PARTY_ENV = re.compile(r"(POSTGRES|REDISCLI|FLOWER)_[A-Z0-9_]+")
SETTINGS_ENV = frozenset(
    field.validation_alias
    for field in Settings.model_fields.values()
    if isinstance(field.validation_alias, str)
)
# What the tests put in .env for the secrets .env.example leaves empty.
TEST_SECRETS = {
    "POSTGRES_PASSWORD": "pg-test-secret",
    "REDIS_PASSWORD": "0123456789abcdef",
    "LQJOBS_CALLBACK_KEYS": "k1:" + "ab" * 32,
    "FLOWER_BASIC_AUTH": "admin:test-secret",
}
WORKER = ["celery", "-A", "lqjobs.app", "worker"]
SECRET_NAMES = re.compile(r".*(PASSWORD|_KEYS|_AUTH|BROKER_URL)$")
_VARIABLE = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}$]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


# -- helpers ---------------------------------------------------------------------------


class MissingVariable(LookupError):
    """A ``${VAR:?message}`` whose variable is unset (or empty)."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``, over any
    value (keys are left alone, as Compose does)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        name = match["name"] or match["bare"]
        op, current = match["op"], env.get(name)
        absent = (not current) if op and op.startswith(":") else current is None
        if op in (":-", "-") and absent:
            return str(match["arg"])
        if op in (":?", "?") and absent:
            raise MissingVariable(f"{name}: {match['arg']}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def env_example() -> tuple[dict[str, str], set[str]]:
    """.env.example as (variables set, names only mentioned in ``# NAME=value`` lines)."""
    given: dict[str, str] = {}
    mentioned: set[str] = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        found = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if found and found[1]:
            mentioned.add(found[2])
        elif found:
            given[found[2]] = found[3]
    return given, mentioned


def dot_env() -> dict[str, str]:
    """The .env a user writes: .env.example with its empty secrets filled in."""
    given, _ = env_example()
    return {name: value or TEST_SECRETS[name] for name, value in given.items()}


def stack() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = interpolate(SERVICES, dot_env())
    return services


def argv_of(command: Any) -> list[str]:
    assert isinstance(command, list) and all(isinstance(part, str) for part in command), (
        f"commands are written as exec-form lists of strings, got {command!r}"
    )
    return command


def commands() -> Iterator[tuple[str, str, list[str]]]:
    """(service, where, argv) for every command and exec-form health check."""
    for name, service in SERVICES.items():
        if "command" in service:
            yield name, "command", argv_of(service["command"])
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[:1] == ["CMD"]:
            yield name, "healthcheck", argv_of(test[1:])
        elif isinstance(test, list) and test[:1] == ["CMD-SHELL"]:
            yield name, "healthcheck", test[1].split()


def lqjobs_services() -> list[str]:
    return [name for name, service in SERVICES.items() if service.get("image") == "lqjobs:local"]


def service_running(prefix: list[str]) -> str:
    matches = [
        name
        for name, service in SERVICES.items()
        if service.get("command", [])[: len(prefix)] == prefix
    ]
    assert len(matches) == 1, f"expected one service running {prefix}, found {matches}"
    return matches[0]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# -- the file itself -------------------------------------------------------------------


def test_only_keys_of_the_compose_specification_are_used() -> None:
    unknown = {key for key in COMPOSE if key not in TOP_LEVEL_KEYS and not key.startswith("x-")}
    assert not unknown
    for name, service in SERVICES.items():
        assert set(service) <= SERVICE_KEYS, (name, set(service) - SERVICE_KEYS)
        healthcheck = service.get("healthcheck", {})
        assert set(healthcheck) <= HEALTHCHECK_KEYS, (name, healthcheck)
        if healthcheck:
            assert healthcheck["test"][0] in ("CMD", "CMD-SHELL"), name
        assert RESTART_POLICIES.fullmatch(service.get("restart", "no")), name
        for key, value in service.get("environment", {}).items():
            assert isinstance(value, str | int | float | bool | type(None)), (name, key)


def test_named_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, (name, source)


def test_depends_on_targets_exist_and_their_conditions_can_hold() -> None:
    for name, service in SERVICES.items():
        for target, spec in service.get("depends_on", {}).items():
            assert target in SERVICES, f"{name} depends on unknown service {target}"
            assert spec["condition"] in CONDITIONS, (name, target)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{target} has no health check"
            if spec["condition"] == "service_completed_successfully":
                # a one-shot that restarts would never count as completed
                assert SERVICES[target].get("restart", "no") == "no", target
    _assert_acyclic()


def _assert_acyclic() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for target in SERVICES[name].get("depends_on", {}):
                visit(target, (*path, name))
            done.add(name)

    for name in SERVICES:
        visit(name, ())


def test_the_schema_is_installed_before_anything_uses_the_database() -> None:
    migrate_service = service_running(["lqjobs", "migrate"])
    assert SERVICES[migrate_service]["depends_on"]["postgres"]["condition"] == "service_healthy"
    database_users = [
        name
        for name in lqjobs_services()
        if "PGHOST" in SERVICES[name].get("environment", {}) and name != migrate_service
    ]
    assert {"bridge", "worker", "callback", "scheduler"} <= set(database_users)
    for name in database_users:
        wait = SERVICES[name]["depends_on"][migrate_service]["condition"]
        assert wait == "service_completed_successfully", name


def test_long_running_services_have_health_checks() -> None:
    one_shot = service_running(["lqjobs", "migrate"])
    unchecked = [name for name in SERVICES if "healthcheck" not in SERVICES[name]]
    assert unchecked == [one_shot]


# -- commands against the code ---------------------------------------------------------


LQJOBS_COMMANDS = [
    pytest.param(argv, id=f"{service}-{where}")
    for service, where, argv in commands()
    if argv[0] == "lqjobs"
]
CELERY_COMMANDS = [
    pytest.param(argv, id=f"{service}-{where}")
    for service, where, argv in commands()
    if argv[0] == "celery"
]


@pytest.mark.parametrize("argv", LQJOBS_COMMANDS)
def test_lqjobs_commands_name_real_subcommands(argv: list[str]) -> None:
    assert isinstance(lqjobs_cli, click.Group)
    name, args = argv[1], argv[2:]
    assert name in lqjobs_cli.commands, (
        f"`lqjobs {name}` does not exist; lqjobs has {sorted(lqjobs_cli.commands)}"
    )
    lqjobs_cli.commands[name].make_context(name, list(args))  # options parse


@pytest.mark.parametrize("argv", CELERY_COMMANDS)
def test_celery_commands_load_the_lqjobs_app(argv: list[str]) -> None:
    assert argv[1] == "-A"
    app = find_app(argv[2])
    assert isinstance(app, Celery)
    assert TASK_NAME in app.tasks
    assert argv[3] in celery_cli.commands, f"`celery {argv[3]}` is not a celery command"


def test_the_function_server_command_is_an_entry_point() -> None:
    argv = argv_of(SERVICES["functions"]["command"])
    assert argv[:3] == ["python", "-m", "lqjobs.ops.example_functions"]
    shown = subprocess.run(
        [sys.executable, "-m", "lqjobs.ops.example_functions", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert shown.returncode == 0, shown.stderr
    for flag in argv[3::2]:
        assert flag in shown.stdout, f"python -m lqjobs.ops.example_functions has no {flag}"


# -- environment -------------------------------------------------------------------------


def test_environment_names_are_lqjobs_settings_or_the_images_own() -> None:
    for name, service in SERVICES.items():
        for variable in service.get("environment", {}):
            assert variable in SETTINGS_ENV or THIRD_PARTY_ENV.fullmatch(variable), (
                f"{name}: {variable} is neither a lqjobs setting nor read by the image"
            )


def strings(value: Any) -> Iterator[str]:
    """Every string value in the parsed file (comments are gone, as for Compose)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def test_secrets_come_from_required_variables_and_are_documented() -> None:
    found = [m for text in strings(COMPOSE) for m in _VARIABLE.finditer(text) if not m["dollar"]]
    used = {m["name"] or m["bare"] for m in found}
    given, mentioned = env_example()
    assert used <= set(given) | mentioned, used - set(given) - mentioned
    required = {m["name"] for m in found if m["op"] == ":?"}
    assert required == set(TEST_SECRETS)
    assert all(given[name] == "" for name in required), ".env.example must not carry secrets"
    for name, service in SERVICES.items():
        for variable, value in service.get("environment", {}).items():
            if SECRET_NAMES.fullmatch(variable):
                assert re.search(r"\$\{[A-Z_]+:\?", str(value)), f"{name}: {variable} hard-coded"


def test_interpolation_refuses_an_unfilled_env_file() -> None:
    given, _ = env_example()
    with pytest.raises(MissingVariable):
        interpolate(SERVICES, given)


@pytest.mark.parametrize(
    "service",
    [name for name in lqjobs_services() if SERVICES[name].get("environment")],
)
def test_each_lqjobs_service_gets_valid_settings(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings_for(stack()[service], monkeypatch)
    assert settings.timeout_ladder_problems() == []


def test_the_worker_can_build_every_executor_it_is_configured_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings_for(stack()[service_running(WORKER)], monkeypatch)
    assert settings.route_of("any-task") == {"knative": 1}
    with httpx.Client() as client:
        router = build_router(settings, client)
        unavailable = {
            name: getattr(executor, "reason", "")
            for name, executor in router.executors.items()
            if isinstance(executor, UnavailableExecutor)
        }
    assert unavailable == {}


def _settings_for(service: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in service.get("environment", {}).items():
        monkeypatch.setenv(name, str(value))
    return load_settings()


def test_services_find_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    services, env = stack(), dot_env()
    worker = services[service_running(WORKER)]
    settings = _settings_for(worker, monkeypatch)
    postgres = services["postgres"]["environment"]
    conninfo = conninfo_to_dict(settings.conninfo())
    assert conninfo["host"] in services and str(conninfo["port"]) == "5432"
    assert conninfo["user"] == postgres["POSTGRES_USER"]
    assert conninfo["dbname"] == postgres["POSTGRES_DB"]
    assert conninfo["password"] == postgres["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]

    broker = urlsplit(settings.broker_url.get_secret_value())
    redis = services[str(broker.hostname)]
    assert broker.port == 6379 and redis["image"].startswith("redis:")
    assert broker.password == option(redis["command"], "--requirepass")
    assert option(redis["command"], "--maxmemory-policy") == "noeviction"

    callback = urlsplit(str(settings.internal_jobs_callback_url))
    assert callback.hostname == service_running(["lqjobs", "callback"])
    assert callback.port == settings.internal_jobs_callback_port
    assert callback.path == "/callback"
    assert str(callback.port) in services[str(callback.hostname)]["expose"]

    functions_argv = services["functions"]["command"]
    for url in (
        settings.internal_gateway_url,
        settings.knative_ingress_url,
        *settings.internal_gateway_development_map.values(),
    ):
        parts = urlsplit(str(url))
        assert parts.hostname == "functions", url
        assert str(parts.port) == option(functions_argv, "--port"), url
    for task in settings.jobs_supported:
        assert set(settings.route_of(task)) <= {"knative", "openfaas", "openfaas-async", "devmap"}


def test_health_checks_probe_the_ports_their_service_listens_on() -> None:
    for name, service in SERVICES.items():
        test = " ".join(service.get("healthcheck", {}).get("test", []))
        for port in re.findall(r"127\.0\.0\.1'?[:,] ?(\d+)", test):
            listening = {str(p) for p in service.get("expose", [])}
            listening |= {str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])}
            if "--port" in service.get("command", []):
                listening.add(option(service["command"], "--port"))
            assert port in listening, (name, port, listening)


def test_only_flower_is_published_and_only_on_loopback() -> None:
    published = {name for name, service in SERVICES.items() if "ports" in service}
    assert published == {"flower"}
    assert SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert SERVICES["flower"]["command"][:4] == ["celery", "-A", "lqjobs.app", "flower"]
    assert "FLOWER_BASIC_AUTH" in SERVICES["flower"]["environment"]
    assert all("network_mode" not in service for service in SERVICES.values())


# -- the Dockerfile ------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, args = line.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def copies() -> dict[str, str]:
    return {
        args.split()[0]: args.split()[-1]
        for keyword, args in dockerfile()
        if keyword == "COPY" and not args.startswith("--from")
    }


def test_the_image_is_python_311_slim_and_not_root() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert instructions[-1] == ("CMD", '["lqjobs", "--help"]')


def test_the_image_copies_every_package_and_installs_it_without_extras() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    top_level = {pattern.rstrip("*") for pattern in find["packages"]["find"]["include"]}
    copied = {source.rstrip("/") for source in copies()}
    assert top_level == {"lqjobs"}
    assert top_level <= copied
    assert {"pyproject.toml", "README.md", "sql"} <= copied
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    }
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source not in ignored, f"{source} is copied but .dockerignore drops it"
    assert ".env" in ignored


def test_dependencies_are_a_layer_of_their_own_and_the_package_has_no_extras() -> None:
    instructions = dockerfile()
    build_dir = copies()["lqjobs/"].rstrip("/").rsplit("/", 1)[0]
    runs = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "RUN"]
    deps = [i for i, args in runs if "pip install -r" in args]
    package = [i for i, args in runs if "pip install" in args and build_dir in args.split()]
    first_code_copy = min(
        i
        for i, (keyword, args) in enumerate(instructions)
        if keyword == "COPY"
        and "/" in args
        and args.split()[0].rstrip("/") in ("lqjobs", "bridge", "tasks")
    )
    assert deps and package and deps[0] < first_code_copy < package[0]
    assert not any("embedded" in args for _, args in runs)


def test_migrate_finds_the_sql_the_image_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = copies()["sql/"].rstrip("/")
    prefix = "/usr/local"  # sys.prefix of the python:3.11-slim interpreter
    assert destination.startswith(prefix + "/")
    installed = tmp_path / destination.removeprefix(prefix + "/")
    installed.mkdir(parents=True)
    for source in (ROOT / "sql").glob("*.sql"):
        (installed / source.name).write_text(source.read_text())
    # as installed: no checkout beside the package, sys.prefix is the image's
    monkeypatch.setattr(migrate, "__file__", str(tmp_path / "site-packages/lqjobs/ops/migrate.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert migrate.sql_dir() == installed
    assert [f.name for f in migrate.sql_files()] == sorted(
        f.name for f in (ROOT / "sql").glob("*.sql")
    )
