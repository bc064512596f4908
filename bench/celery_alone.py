"""Plain Celery with one no-op task and lqjobs' worker configuration: the ceiling
of any runtime built on a Celery worker on this machine, measured in the same
bench run as lqjobs (``celery -A bench.celery_alone worker -Q bench-noop``)."""

from __future__ import annotations

from celery import Celery

from lqjobs.celery import celery_config
from lqjobs.settings import load_settings

QUEUE = "bench-noop"
TASK = "bench.noop"

app = Celery("bench_noop", set_as_current=False)
app.conf.update(celery_config(load_settings()))


def noop(index: int) -> None:
    """Does nothing: what remains is Celery's own work per message."""


app.task(name=TASK, ignore_result=True)(noop)
