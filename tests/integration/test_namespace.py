"""lqjobs installs one package, ``lqjobs``: a project with its own ``tasks.py`` and
``bridge.py`` (Celery's tutorial layout) runs the bridge and a worker from its own
directory, and nothing lqjobs imports resolves to the project's modules."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests import processes
from tests.stack import add_jobs, count, flush_broker

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]

HOSTILE = "raise ImportError('lqjobs imported the project module {name}')\n"
LQJOBS_MODULES = "lqjobs.app, lqjobs.celery, lqjobs.bridge.loop, lqjobs.ops.cli, lqjobs.worker"


def hostile_project(directory: Path) -> Path:
    directory.mkdir()
    for name in ("tasks", "bridge"):
        (directory / f"{name}.py").write_text(HOSTILE.format(name=name))
    return directory


def python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = processes.environment("postgresql://unused/db", "redis://unused/0")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_only_the_lqjobs_package_is_installed(tmp_path: Path) -> None:
    code = "import importlib.util as u; print([u.find_spec(n) for n in ('tasks', 'bridge')])"
    run = python(code, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[None, None]"


def test_lqjobs_imports_next_to_a_project_s_tasks_and_bridge(tmp_path: Path) -> None:
    project = hostile_project(tmp_path / "shop")
    run = python(f"import sys; sys.path.insert(0, ''); import {LQJOBS_MODULES}", project)
    assert run.returncode == 0, run.stderr
    # Negative control: the project's modules are the ones Python finds from there.
    shadowed = python("import sys; sys.path.insert(0, ''); import tasks", project)
    assert "lqjobs imported the project module tasks" in shadowed.stderr


def test_bridge_and_worker_run_from_a_project_with_its_own_tasks_py(
    db_url: str, redis_url: str, functions: FunctionServer, tmp_path: Path
) -> None:
    project = hostile_project(tmp_path / "shop")
    flush_broker(redis_url)
    env = processes.environment(
        db_url,
        redis_url,
        LQJOBS_EXECUTOR="knative",
        LQJOBS_KNATIVE_INGRESS_URL=functions.url,
        PYTHONPATH=str(project),
    )
    job_ids = add_jobs(db_url, "noop", 5)
    with processes.running(
        processes.bridge(env, tmp_path, cwd=project),
        processes.worker(env, tmp_path, concurrency=2, cwd=project),
    ) as running:
        wait_until(lambda: count(db_url) == 0, 60, "every job to complete")
    per_job = Counter(call.job_id for call in functions.calls.all() if call.status == 200)
    assert set(per_job) == set(job_ids) and max(per_job.values()) == 1
    for process in running:
        assert "lqjobs imported the project module" not in process.output()
