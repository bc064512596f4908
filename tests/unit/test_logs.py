"""lqjobs' log format: one line per record whatever its message and fields hold
(docs/design.md, S3), and a traceback that no reader can take for records."""

from __future__ import annotations

import logging
import re
import sys

from lqjobs.logs import KeyValueFormatter, escaped, field_value

FORGED = "\n2026-01-01 00:00:00,000 ERROR lqjobs.worker: forged"
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord(
        {"name": "lqjobs.test", "levelno": 20, "levelname": "INFO", "msg": msg, "args": args}
    )
    made.__dict__.update(extra)
    if exc:
        made.exc_info = sys.exc_info()
    return made


def test_escaped_shows_every_control_character_and_breaks_no_line() -> None:
    hostile = "a\nb\r\tc\x1b[31md\x00e\x7f\x85f\u2028g\u2029"
    assert escaped(hostile) == "a\\nb\\r\\tc\\x1b[31md\\x00e\\x7f\\x85f\\u2028g\\u2029"
    assert escaped("send-email") == "send-email"
    assert escaped("x" * 300, 10) == "x" * 9 + "…"


def test_a_field_value_is_quoted_when_it_could_forge_a_field() -> None:
    assert field_value(7) == "7"
    assert field_value("send-email") == "send-email"
    assert field_value("x job_id=1") == '"x job_id=1"'
    assert field_value('say "hi"\n') == '"say \\"hi\\"\\\\n"'
    assert field_value("") == '""'


def test_a_record_is_one_line_whatever_its_message_and_fields_hold() -> None:
    formatter = KeyValueFormatter()
    line = formatter.format(record("Task %s received", FORGED, task=FORGED, job_id=3))
    assert "\n" not in line and RECORD.match(line)
    assert line.endswith(" job_id=3") and 'task="\\\\n2026-01-01' in line
    assert "Task \\n2026-01-01 00:00:00,000 ERROR lqjobs.worker: forged received" in line


def test_a_traceback_follows_indented_and_escaped() -> None:
    try:
        raise ValueError(f"bad{FORGED}\x1b[2J")
    except ValueError:
        line = KeyValueFormatter().format(record("call failed", exc=True, job_id=3))
    first, *rest = line.split("\n")
    assert first.endswith("call failed job_id=3")  # the fields stay on the record's line
    assert rest[0] == "  Traceback (most recent call last):"
    assert all(part.startswith("  ") for part in rest)
    assert "  2026-01-01 00:00:00,000 ERROR lqjobs.worker: forged\\x1b[2J" in rest


def test_omitted_extras_are_not_shown() -> None:
    line = KeyValueFormatter(omit=["data"]).format(record("m", data={"id": 1}, job_id=2))
    assert line.endswith("lqjobs.test: m job_id=2")
