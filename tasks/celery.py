"""Entry point for ``celery -A tasks worker``: the app is built from the environment
here, at the edge, and nowhere else, and the worker logs in lqjobs' format."""

from __future__ import annotations

import sys

from lqjobs.celery import create_app, install_log_format
from lqjobs.errors import ConfigurationError

install_log_format()
try:
    app = create_app()
except ConfigurationError as exc:  # one clear line, not a traceback
    print(f"lqjobs: {exc}", file=sys.stderr)
    raise SystemExit(3) from None
