"""A Celery shop's project as Celery's tutorial lays it out: a directory with its own
``tasks.py`` (pickle, a Redis result backend, its own time limits) that adds lqjobs
with the README's native-handler example, copied in. Its worker is
``celery -A tasks worker`` run from that directory, so ``tasks`` is the shop's module,
not lqjobs' package of the same name."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from celery import Celery

from lqjobs.ops.example_functions import FunctionServer
from tests import processes

ROOT = Path(__file__).resolve().parents[2]
NATIVE_TASK = "send-email"  # the README example's handler
HTTP_TASK = "resize-avatar"
HOST_TIME_LIMIT = 5
# lqjobs' own limits in this project, both below the host's: a host task that outlives
# them shows lqjobs' limits stayed on lqjobs' task.
LQJOBS_LIMITS = {
    "LQJOBS_HTTP_CONNECT_TIMEOUT": "1",
    "LQJOBS_HTTP_TIMEOUT": "1.5",
    "LQJOBS_TASK_SOFT_TIME_LIMIT": "3",
    "LQJOBS_TASK_TIME_LIMIT": "4",
}
NATIVE_BODY = "    ...  # raise PermanentJobError for no retry\n"

HOST_APP = f'''"""The shop's own Celery app."""

import os
import time
from pathlib import Path

from celery import Celery

app = Celery(
    "tasks", broker=os.environ["HOST_BROKER_URL"], backend=os.environ["HOST_RESULT_BACKEND"]
)
app.conf.update(
    task_serializer="pickle",
    result_serializer="pickle",
    accept_content=["pickle", "json"],
    result_accept_content=["pickle", "json"],
)
CALLS = Path(__file__).with_name("native-calls.txt")


@app.task(time_limit={HOST_TIME_LIMIT})
def work(seconds, value):
    time.sleep(seconds)
    return value


@app.task
def nap(seconds):
    time.sleep(seconds)
    return {{"slept": seconds}}


def record(job):
    with CALLS.open("a") as calls:
        calls.write(f"{{job.job_id}}\\n")

'''


def readme_example() -> str:
    """The README's native-handler example, as a shop would paste it."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    (example,) = [block for block in blocks if "register(my_celery_app" in block]
    return example


def tasks_py() -> str:
    """The shop's tasks.py: its app, then the README example with its handler's body
    (``...``) recording each call."""
    example = readme_example()
    assert NATIVE_BODY in example and f'@job_handler("{NATIVE_TASK}")' in example
    example = example.replace("my_celery_app", "app").replace(NATIVE_BODY, "    record(job)\n")
    return HOST_APP + example


def write(project: Path) -> Path:
    project.mkdir(parents=True, exist_ok=True)
    (project / "tasks.py").write_text(tasks_py())
    return project


def redis_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def environment(
    db_url: str, redis_url: str, functions: FunctionServer, **variables: str
) -> dict[str, str]:
    """The lqjobs processes' environment (the bridge's): HTTP jobs go to ``functions``
    as Knative services, the README's task runs natively."""
    return processes.environment(
        db_url,
        redis_url,
        **LQJOBS_LIMITS,
        LQJOBS_EXECUTOR="knative",
        LQJOBS_KNATIVE_INGRESS_URL=functions.url,
        LQJOBS_TASK_EXECUTORS=f'{{"{NATIVE_TASK}": "native"}}',
        HOST_BROKER_URL=redis_url,
        HOST_RESULT_BACKEND=redis_db(redis_url, 2),
        **variables,
    )


def worker_environment(env: dict[str, str]) -> dict[str, str]:
    """The shop's worker: LQJOBS_BROKER_URL unset, so lqjobs uses the app's broker.
    Celery refuses to run a worker that accepts pickle as root, as the suite runs in CI,
    unless told to."""
    own = {k: v for k, v in env.items() if k != "LQJOBS_BROKER_URL"}
    return own | {"C_FORCE_ROOT": "1"}


def worker(
    env: dict[str, str], project: Path, logs: Path, *options: str, name: str = "host-worker"
) -> processes.Process:
    """One ``celery -A tasks worker`` for both kinds of task, from the project directory.
    Prefork: Celery enforces a hard time limit only there."""
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "celery,lqjobs"]
    argv += ["--pool", "prefork", "--concurrency", "3", "--loglevel", "INFO"]
    argv += ["--hostname", f"{name}@%h", "--without-heartbeat", "--without-mingle"]
    argv += ["--without-gossip", *options]
    return processes.Process(name, argv, worker_environment(env), logs, cwd=project)


@contextlib.contextmanager
def client(env: dict[str, str]) -> Iterator[Celery]:
    """What the shop's web process would use to send its own tasks and read results;
    its broker and result-backend connections closed at the end."""
    app = _client_app(env)
    try:
        yield app
    finally:
        backend = app.backend
        backend.result_consumer.stop()  # the pub/sub connection results arrive on
        backend.client.connection_pool.disconnect()
        app.close()


def _client_app(env: dict[str, str]) -> Celery:
    app = Celery(
        "client",
        broker=env["HOST_BROKER_URL"],
        backend=env["HOST_RESULT_BACKEND"],
        set_as_current=False,
    )
    app.conf.update(
        task_serializer="pickle",
        result_serializer="pickle",
        accept_content=["pickle", "json"],
        result_accept_content=["pickle", "json"],
    )
    return app
