"""``celery -A tasks worker`` from a checkout of this repository: the same app as
``celery -A lqjobs.app worker``. Not installed: a host project's own ``tasks.py``
never collides with it."""

from __future__ import annotations

from lqjobs.app import app

__all__ = ["app"]
