"""lqjobs' own Celery app, for ``celery -A lqjobs.app worker`` (and ``flower``).

The app is built from the environment here, at the edge, and nowhere else, and
the worker logs in lqjobs' format. Importing any other lqjobs module builds no app;
a host project that has its own app uses :func:`lqjobs.celery.register` instead.
"""

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
