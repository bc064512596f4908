"""A Celery shop's own app with lqjobs registered on it (``celery -A
tests.integration.host_app worker``), as test_worker_logs.py runs it: the host's
log format is its own, and lqjobs' only when ``HOST_OPTS_IN`` is set."""

from __future__ import annotations

import os

from celery import Celery

from lqjobs.celery import install_log_format, register
from lqjobs.settings import load_settings

app = Celery("host", set_as_current=False)
app.conf.broker_url = os.environ["LQJOBS_BROKER_URL"]  # the shop's own broker: the same Redis
app.conf.worker_log_format = "HOST %(levelname)s %(name)s | %(message)s"
register(app, load_settings())
if os.environ.get("HOST_OPTS_IN"):
    install_log_format("lqjobs")
