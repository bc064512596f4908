"""Structured log lines: ``message key=value ...`` from each record's ``extra`` fields.

Call sites log a stable ``action`` plus ids (``job_id``, ``task``, ``database_id``,
``worker_id``); never payloads or secrets. Whatever reaches a line from outside (a
task name, a library's message) is escaped, so no record can end a line early and
forge the next one (docs/design.md, S3).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import IO

# LogRecord attributes that are not extras.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# The one set of characters lqjobs never lets into a log line, a header or a message
# (CWE-117): C0 controls, DEL, C1 controls (NEL among them) and the Unicode line and
# paragraph separators, all of which some reader takes for a line break.
_CONTROLS = r"[\x00-\x1f\x7f-\x9f\u2028\u2029]"
_CONTROL = re.compile(_CONTROLS)
_CONTROL_RUN = re.compile(_CONTROLS + "+")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A field value a key=value reader would split or misread unless it is quoted.
_NEEDS_QUOTES = re.compile(r'[\s="\\]')

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELD_CHARS = 200  # of one field's value
MESSAGE_CHARS = 2000


def clean_text(text: str, limit: int = 4096) -> str:
    """Each control character as a space (no log or header injection), truncated."""
    return _truncate(_CONTROL.sub(" ", text), limit)


def one_line(text: str, limit: int = 200) -> str:
    """A short excerpt: each run of control characters one space, stripped, truncated."""
    return _truncate(_CONTROL_RUN.sub(" ", text).strip(), limit)


def escaped(text: str, limit: int = FIELD_CHARS) -> str:
    """``text`` on one printable line that still shows what it holds: each control
    character as its escape (``\\n``, ``\\x1b``, ``\\u2028``), truncated. For names
    from outside shown to a person: the task name in Flower and in Celery's lines."""
    return _truncate(_CONTROL.sub(_escape, text), limit)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def field_value(value: object) -> str:
    """One ``key=value`` value: escaped, truncated, and quoted (``"`` and ``\\``
    backslashed inside) when it holds a space, ``=``, a quote or nothing, so that a
    task named ``x job_id=1`` cannot forge a field."""
    text = escaped(str(value), FIELD_CHARS)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class KeyValueFormatter(logging.Formatter):
    """``FORMAT`` plus the record's extras as ``key=value``, all on one line; a
    traceback follows on lines indented by two spaces, so that no line it holds can
    pass for a record. ``omit``: extras never shown (Celery's ``data`` repeats its
    message)."""

    def __init__(self, fmt: str = FORMAT, omit: Collection[str] = ()) -> None:
        super().__init__(fmt)
        self.omit = frozenset(omit)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escaped(record.message, MESSAGE_CHARS)
        line = super().formatMessage(record)
        extras = [
            f"{key}={field_value(value)}"
            for key, value in vars(record).items()
            if key not in _STANDARD and key not in self.omit
        ]
        return " ".join([line, *extras])

    def format(self, record: logging.LogRecord) -> str:
        line, newline, rest = super().format(record).partition("\n")
        if not newline:
            return line
        rest = _CONTROL_BUT_NEWLINE.sub(_escape, rest)
        return line + "".join(f"\n  {part}" for part in rest.split("\n"))


def log_handler(stream: IO[str] | None = None, omit: Collection[str] = ()) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter(omit=omit))
    return handler


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers[:] = [log_handler()]
    root.setLevel(level)
