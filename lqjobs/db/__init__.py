"""The typed DB boundary: the only package in lqjobs that holds SQL.

One module per role, each a class over one jobs schema:

- :mod:`~lqjobs.db.queue` — the upstream job functions (``get_job``, ``complete_job``, ...);
- :mod:`~lqjobs.db.scheduled` — the upstream scheduled-job functions;
- :mod:`~lqjobs.db.fence` — every lease-checked statement (preflight, fenced writes);
- :mod:`~lqjobs.db.reads` — read-only views (in-flight, wake timer, gauges, status);
- :mod:`~lqjobs.db.admin` — the operator's job views and admin writes (``lqjobs jobs``);
- :mod:`~lqjobs.db.schema` — installing the schema;
- :mod:`~lqjobs.db.server` — the server's version and settings, a NOTIFY round trip;
- :mod:`~lqjobs.db.base` — connections, LISTEN, error translation, shared columns.

A component imports the role classes it calls and nothing else; :class:`JobsDB`
bundles them all for the operator's commands and the tests.
"""

from __future__ import annotations

from lqjobs.db.admin import Admin
from lqjobs.db.base import (
    INSERT_CHANNEL,
    SCHEDULED_INSERT_CHANNEL,
    WAKE_CHANNEL,
    Connection,
    PoolMode,
    RawJson,
    connect,
    listen,
    ping,
    session_options,
    translated_errors,
)
from lqjobs.db.fence import Fence
from lqjobs.db.queue import Queue
from lqjobs.db.reads import Reads
from lqjobs.db.scheduled import Scheduled


class JobsDB:
    """Every role's statements over one jobs schema."""

    def __init__(self, schema: str = "app_jobs") -> None:
        self.schema = schema
        self.queue = Queue(schema)
        self.scheduled = Scheduled(schema)
        self.fence = Fence(schema)
        self.reads = Reads(schema)
        self.admin = Admin(schema)


__all__ = [
    "INSERT_CHANNEL",
    "SCHEDULED_INSERT_CHANNEL",
    "WAKE_CHANNEL",
    "Admin",
    "Connection",
    "Fence",
    "JobsDB",
    "PoolMode",
    "Queue",
    "RawJson",
    "Reads",
    "Scheduled",
    "connect",
    "listen",
    "ping",
    "session_options",
    "translated_errors",
]
