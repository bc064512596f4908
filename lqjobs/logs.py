"""Structured log lines: ``message key=value ...`` from each record's ``extra`` fields.

Call sites log a stable ``action`` plus ids (``job_id``, ``task``, ``database_id``,
``worker_id``); never payloads or secrets.
"""

from __future__ import annotations

import logging
import re

# LogRecord attributes that are not extras.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# The one set of characters lqjobs never lets into a log line, a header or a message
# (CWE-117): C0 controls, DEL, C1 controls (NEL among them) and the Unicode line and
# paragraph separators, all of which some reader takes for a line break.
_CONTROLS = r"[\x00-\x1f\x7f-\x9f\u2028\u2029]"
_CONTROL = re.compile(_CONTROLS)
_CONTROL_RUN = re.compile(_CONTROLS + "+")


def clean_text(text: str, limit: int = 4096) -> str:
    """Each control character as a space (no log or header injection), truncated."""
    return _truncate(_CONTROL.sub(" ", text), limit)


def one_line(text: str, limit: int = 200) -> str:
    """A short excerpt: each run of control characters one space, stripped, truncated."""
    return _truncate(_CONTROL_RUN.sub(" ", text).strip(), limit)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extras:
            line += " " + " ".join(f"{k}={clean_text(str(v), 200)}" for k, v in extras.items())
        return line


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
