"""Fire times of lqjobs.scheduler.rules against node-schedule's semantics.

The expected series in these tables were also produced by node-schedule 2.1.1
(cron-parser 4.9.0, TZ=UTC) driven with a faked clock, ``job.nextInvocation()`` and
``job.cancelNext(true)``, except RANGE_CASES (node never schedules those) and the
stop after the last year of "year-then-stop" (node loops forever there). The
differences kept on purpose are listed in lqjobs/scheduler/rules.py. Sources cited as:
  README       https://github.com/node-schedule/node-schedule/blob/master/README.md
  Invocation   node-schedule lib/Invocation.js (Range, RecurrenceRule, nextInvocationDate)
  Job          node-schedule lib/Job.js (Job.prototype.schedule)
  cron-parser  https://github.com/harrisiirak/cron-parser lib/expression.js (4.x)
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from lqjobs.errors import ConfigurationError
from lqjobs.scheduler.rules import InvalidSchedule, Schedule, parse_schedule

Info = dict[str, Any] | str


def at(text: str) -> datetime:
    """An aware UTC datetime from ISO text ("2024-01-01T00:00:00Z")."""
    return datetime.fromisoformat(text).astimezone(UTC)


END = "END"  # in an expected series: next_after returns None here


def series(schedule: Schedule, after: datetime, count: int) -> list[str]:
    """Up to ``count`` fire times, each computed from the previous one, as ISO text."""
    out: list[str] = []
    current: datetime | None = after
    while current is not None and len(out) < count:
        current = schedule.next_after(current)
        out.append(END if current is None else current.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return out


# (id, schedule_info, after, the fire times that follow; END where it stops)
CRON_CASES: list[tuple[str, Info, str, list[str]]] = [
    # README "Set StartTime and EndTime" uses '*/1 * * * * *'; 6 fields = seconds first.
    # Strictly after `after`, on whole seconds (cron-parser adds a second when
    # `currentDate` already matches; ms are dropped by CronDate.addSecond).
    (
        "every-second",
        "*/1 * * * * *",
        "2024-01-01T00:00:00.500Z",
        ["2024-01-01T00:00:01Z", "2024-01-01T00:00:02Z", "2024-01-01T00:00:03Z"],
    ),
    # README: "Execute a cron job every 5 Minutes = */5 * * * *"; 5 fields: second is 0.
    (
        "every-5-minutes",
        "*/5 * * * *",
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:05:00Z", "2024-01-01T00:10:00Z", "2024-01-01T00:15:00Z"],
    ),
    # README: '42 * * * *' fires when the minute is 42.
    ("minute-42", "42 * * * *", "2024-01-01T10:42:00Z", ["2024-01-01T11:42:00Z"]),
    # Weekdays at 9: Friday evening -> Monday, Tuesday.
    (
        "weekdays-9am",
        "0 9 * * 1-5",
        "2024-01-05T10:00:00Z",
        ["2024-01-08T09:00:00Z", "2024-01-09T09:00:00Z"],
    ),
    (
        "lists",
        "0 0,30 8,17 * * *",
        "2024-01-01T08:10:00Z",
        ["2024-01-01T08:30:00Z", "2024-01-01T17:00:00Z", "2024-01-01T17:30:00Z"],
    ),
    # Range with step, and 'N/step' meaning N-max/step (cron-parser parseRepeat).
    (
        "range-step",
        "10-40/15 * * * *",
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:10:00Z", "2024-01-01T00:25:00Z", "2024-01-01T00:40:00Z"],
    ),
    (
        "start-step",
        "5/20 * * * *",
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:05:00Z", "2024-01-01T00:25:00Z", "2024-01-01T00:45:00Z"],
    ),
    # Names (cron-parser aliases, case-insensitive); day of month '*' so only Mondays count.
    (
        "names",
        "0 12 * jan,JUL MON",
        "2024-01-24T00:00:00Z",
        ["2024-01-29T12:00:00Z", "2024-07-01T12:00:00Z"],
    ),
    # Both day fields restricted: either matches (cron-parser cites crontab(5)).
    (
        "dom-or-dow",
        "0 0 13 * 5",
        "2024-01-01T00:00:00Z",
        [
            "2024-01-05T00:00:00Z",
            "2024-01-12T00:00:00Z",
            "2024-01-13T00:00:00Z",
            "2024-01-19T00:00:00Z",
        ],
    ),
    # README: day of week 0 or 7 is Sunday.
    ("sunday-as-7", "0 0 * * 7", "2024-01-01T00:00:00Z", ["2024-01-07T00:00:00Z"]),
    # cron-parser: a day-of-week range ending on 7 also yields 0, whatever the step.
    (
        "dow-range-to-7",
        "0 0 * * 2-7/2",
        "2024-01-01T00:00:00Z",
        [
            "2024-01-02T00:00:00Z",
            "2024-01-04T00:00:00Z",
            "2024-01-06T00:00:00Z",
            "2024-01-07T00:00:00Z",
        ],
    ),
    # cron-parser calls day of month a wildcard when it lists as many days as the
    # month has: 1-30 in April means "Mondays only"; in May (31 days) it is OR again.
    (
        "dom-count-wildcard",
        "0 0 1-30 * 1",
        "2024-04-01T00:00:00Z",
        [
            "2024-04-08T00:00:00Z",
            "2024-04-15T00:00:00Z",
            "2024-04-22T00:00:00Z",
            "2024-04-29T00:00:00Z",
            "2024-05-01T00:00:00Z",
        ],
    ),
    # README: '?' as in '0 17 ? * 0,4-6'.
    (
        "question-mark",
        "0 17 ? * 0,4-6",
        "2024-01-01T00:00:00Z",
        ["2024-01-04T17:00:00Z", "2024-01-05T17:00:00Z", "2024-01-06T17:00:00Z"],
    ),
    # L and # (cron-parser 4.x implements both, whatever the README says).
    (
        "last-day",
        "0 0 L * *",
        "2024-01-01T00:00:00Z",
        ["2024-01-31T00:00:00Z", "2024-02-29T00:00:00Z", "2024-03-31T00:00:00Z"],
    ),
    (
        "last-friday",
        "0 0 * * 5L",
        "2024-01-01T00:00:00Z",
        ["2024-01-26T00:00:00Z", "2024-02-23T00:00:00Z", "2024-03-29T00:00:00Z"],
    ),
    (
        "second-monday",
        "0 0 * * MON#2",
        "2024-01-01T00:00:00Z",
        ["2024-01-08T00:00:00Z", "2024-02-12T00:00:00Z", "2024-03-11T00:00:00Z"],
    ),
    ("predefined", "@daily", "2024-01-01T00:00:00Z", ["2024-01-02T00:00:00Z"]),
    # Leap day: only leap years.
    (
        "feb-29",
        "0 0 29 2 *",
        "2024-03-01T00:00:00Z",
        ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"],
    ),
]

RECURRENCE_CASES: list[tuple[str, Info, str, list[str]]] = [
    # '{}' is the column's default. RecurrenceRule's second defaults to 0, every
    # other field to null = any (Invocation: RecurrenceRule; README note): every minute.
    (
        "empty-object",
        {},
        "2024-01-01T00:00:30Z",
        ["2024-01-01T00:01:00Z", "2024-01-01T00:02:00Z", "2024-01-01T00:03:00Z"],
    ),
    # README "Object Literal Syntax": Sunday (dayOfWeek 0) at 14:30.
    (
        "tea-time",
        {"hour": 14, "minute": 30, "dayOfWeek": 0},
        "2024-01-01T00:00:00Z",
        ["2024-01-07T14:30:00Z", "2024-01-14T14:30:00Z"],
    ),
    # README: minute 42 only -> hourly at :42 (second 0).
    (
        "minute-42",
        {"minute": 42},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:42:00Z", "2024-01-01T01:42:00Z"],
    ),
    # second: null is a wildcard: every second of minute 5.
    (
        "second-null",
        {"second": None, "minute": 5},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:05:00Z", "2024-01-01T00:05:01Z", "2024-01-01T00:05:02Z"],
    ),
    # month is 0-11 (README "Remember - in JavaScript - 0 - January, 11 - December").
    (
        "month-0-is-january",
        {"month": 0, "date": 1, "hour": 0, "minute": 0},
        "2024-06-01T00:00:00Z",
        ["2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"],
    ),
    (
        "month-11-is-december",
        {"month": 11, "date": 25, "hour": 8, "minute": 0},
        "2024-01-01T00:00:00Z",
        ["2024-12-25T08:00:00Z"],
    ),
    # date and dayOfWeek must BOTH match (nextInvocationDate checks each in turn),
    # unlike cron's OR: Friday the 13th.
    (
        "friday-13th",
        {"date": 13, "dayOfWeek": 5, "hour": 0, "minute": 0},
        "2024-01-01T00:00:00Z",
        ["2024-09-13T00:00:00Z", "2024-12-13T00:00:00Z", "2025-06-13T00:00:00Z"],
    ),
    # Feb 29 on a Monday: decades apart; the search skips by field, not by second.
    (
        "feb-29-monday",
        {"month": 1, "date": 29, "dayOfWeek": 1, "hour": 0, "minute": 0},
        "2024-03-01T00:00:00Z",
        ["2044-02-29T00:00:00Z", "2072-02-29T00:00:00Z"],
    ),
    # recurMatch compares strings through Number(); a null inside a list matches anything.
    (
        "numeric-strings",
        {"minute": "5", "hour": ["1", 2]},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T01:05:00Z", "2024-01-01T02:05:00Z", "2024-01-02T01:05:00Z"],
    ),
    (
        "null-in-list",
        {"minute": [None, 5], "hour": 1},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T01:00:00Z", "2024-01-01T01:01:00Z"],
    ),
    # A year list stops after its last year (node fires 2025-01-01 too, then loops
    # forever: only a numeric year ends its search); a past year never fires.
    (
        "year-then-stop",
        {"year": [2024, 2025], "month": 0, "date": 1, "hour": 0, "minute": 0},
        "2024-06-01T00:00:00Z",
        ["2025-01-01T00:00:00Z", END],
    ),
    ("past-year", {"year": 2020}, "2024-01-01T00:00:00Z", [END]),
    # A JSON.stringify'd RecurrenceRule carries "recurs" and nulls; node ignores "recurs".
    (
        "stringified-rule",
        {"recurs": True, "year": None, "month": None, "date": None, "hour": 6, "minute": 0},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T06:00:00Z", "2024-01-02T06:00:00Z"],
    ),
]

# JSON range objects. node-schedule itself never schedules these: JSON gives plain
# objects, not Range instances, so RecurrenceRule.isValid fails. We read them with
# Range's own semantics (Invocation: Range, Range.prototype.contains).
RANGE_CASES: list[tuple[str, Info, str, list[str]]] = [
    # Range.contains: with step 1 the end is inclusive ...
    (
        "range-inclusive",
        {"minute": {"start": 58, "end": 59}},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:58:00Z", "2024-01-01T00:59:00Z", "2024-01-01T01:58:00Z"],
    ),
    # ... with a step it stops below the end: 0 and 15, never 30.
    (
        "range-step-excludes-end",
        {"minute": {"start": 0, "end": 30, "step": 15}},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:15:00Z", "2024-01-01T01:00:00Z", "2024-01-01T01:15:00Z"],
    ),
    # README: dayOfWeek [0, Range(4, 6)] at 17:00 -> Thursday to Sunday.
    (
        "list-with-range",
        {"dayOfWeek": [0, {"start": 4, "end": 6}], "hour": 17, "minute": 0},
        "2024-01-01T00:00:00Z",
        [
            "2024-01-04T17:00:00Z",
            "2024-01-05T17:00:00Z",
            "2024-01-06T17:00:00Z",
            "2024-01-07T17:00:00Z",
            "2024-01-11T17:00:00Z",
        ],
    ),
]

BOUND_CASES: list[tuple[str, Info, str, list[str]]] = [
    # README "Set StartTime and EndTime". Job: `start` in the future becomes the
    # parser's currentDate, so the first fire is strictly after it; `end` is
    # compared with `>` (scheduleNextRecurrence), so a fire exactly at end happens.
    (
        "cron-start-end",
        {"start": "2024-01-01T00:10:00Z", "end": "2024-01-01T00:30:00Z", "rule": "*/10 * * * *"},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:20:00Z", "2024-01-01T00:30:00Z", END],
    ),
    (
        "recurrence-start",
        {"start": "2024-01-01T00:10:00Z", "rule": {"minute": [10, 20]}},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:20:00Z", "2024-01-01T01:10:00Z", "2024-01-01T01:20:00Z"],
    ),
    # A start already past changes nothing (Job drops it when < Date.now()).
    (
        "start-in-past",
        {"start": "2023-01-01T00:00:00Z", "rule": "0 0 * * *"},
        "2024-01-01T12:00:00Z",
        ["2024-01-02T00:00:00Z"],
    ),
    ("end-in-past", {"end": "2023-01-01T00:30:00Z", "rule": "*/10 * * * *"}, "2024-01-01", [END]),
    # new Date(number) is epoch milliseconds: 1704153600000 = 2024-01-02T00:00Z.
    (
        "epoch-ms-start",
        {"start": 1704153600000, "rule": "0 0 * * *"},
        "2024-01-01T00:00:00Z",
        ["2024-01-03T00:00:00Z", "2024-01-04T00:00:00Z"],
    ),
    # Postgres' JSON form of a timestamptz, microseconds and all.
    (
        "postgres-timestamp",
        {"start": "2024-01-01T00:00:30.123456+00:00", "rule": "* * * * *"},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:01:00Z"],
    ),
    # Job reads start/end only next to `rule`; in a bare object they are ignored.
    (
        "bounds-without-rule-ignored",
        {"minute": 5, "start": "2024-05-01T00:00:00Z", "end": "2024-01-01T00:30:00Z"},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T00:05:00Z", "2024-01-01T01:05:00Z"],
    ),
]

TZ_CASES: list[tuple[str, Info, str, list[str]]] = [
    # README: rule.tz. Job copies the outer `tz` onto the rule (EST = UTC-5 in January) ...
    (
        "outer-tz",
        {"rule": {"hour": 9, "minute": 0}, "tz": "America/New_York"},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T14:00:00Z", "2024-01-02T14:00:00Z"],
    ),
    # ... and overwrites one inside a nested rule, even with nothing.
    (
        "nested-tz-ignored",
        {"rule": {"hour": 9, "minute": 0, "tz": "America/New_York"}},
        "2024-01-01T00:00:00Z",
        ["2024-01-01T09:00:00Z"],
    ),
    ("cron-tz", {"rule": "0 0 * * *", "tz": "Etc/GMT-3"}, "2024-01-01", ["2024-01-01T21:00:00Z"]),
    # luxon zone names: "UTC-03:30" is a fixed offset; null is the default (UTC here).
    (
        "luxon-offset",
        {"hour": 1, "minute": 0, "tz": "utc-03:30"},
        "2024-01-01",
        ["2024-01-01T04:30:00Z"],
    ),
    ("null-tz", {"hour": 1, "minute": 0, "tz": None}, "2024-01-01", ["2024-01-01T01:00:00Z"]),
    # America/New_York falls back on 2024-11-03: 01:00-01:59 happens twice.
    # A recurrence rule walks real instants (nextInvocationDate), so 01:30 fires twice ...
    (
        "fall-back-recurrence-twice",
        {"hour": 1, "minute": 30, "tz": "America/New_York"},
        "2024-11-02T12:00:00Z",
        ["2024-11-03T05:30:00Z", "2024-11-03T06:30:00Z", "2024-11-04T06:30:00Z"],
    ),
    # ... cron-parser, with a restricted hour field, skips the repeat (its _dstEnd) ...
    (
        "fall-back-cron-once",
        {"rule": "30 1 * * *", "tz": "America/New_York"},
        "2024-11-02T12:00:00Z",
        ["2024-11-03T05:30:00Z", "2024-11-04T06:30:00Z"],
    ),
    # ... but with hour '*' fires every real hour, both 1 o'clocks included.
    (
        "fall-back-hourly",
        {"rule": "0 * * * *", "tz": "America/New_York"},
        "2024-11-03T04:30:00Z",
        [
            "2024-11-03T05:00:00Z",
            "2024-11-03T06:00:00Z",
            "2024-11-03T07:00:00Z",
            "2024-11-03T08:00:00Z",
        ],
    ),
    # Spring forward on 2024-03-10: 02:00-02:59 does not exist. cron-parser fires a
    # skipped 02:30 at 03:30 EDT (07:30Z; its _dstStart) ...
    (
        "spring-forward-cron-shifted",
        {"rule": "30 2 * * *", "tz": "America/New_York"},
        "2024-03-09T12:00:00Z",
        ["2024-03-10T07:30:00Z", "2024-03-11T06:30:00Z"],
    ),
    # Both skipped times fire, 02:00 at 03:00 EDT and 02:30 at 03:30 EDT, even though
    # the second is computed from the first, whose wall time (03:00) is past 02:30.
    (
        "spring-forward-cron-series",
        {"rule": "0,30 2 * * *", "tz": "America/New_York"},
        "2024-03-10T06:00:00Z",
        [
            "2024-03-10T07:00:00Z",
            "2024-03-10T07:30:00Z",
            "2024-03-11T06:00:00Z",
            "2024-03-11T06:30:00Z",
        ],
    ),
    # ... a recurrence rule never sees hour 2 that day and skips it.
    (
        "spring-forward-recurrence-skipped",
        {"hour": 2, "minute": 30, "tz": "America/New_York"},
        "2024-03-09T12:00:00Z",
        ["2024-03-11T06:30:00Z", "2024-03-12T06:30:00Z"],
    ),
]


def _ids(cases: list[tuple[str, Info, str, list[str]]]) -> list[str]:
    return [case[0] for case in cases]


ALL_CASES = CRON_CASES + RECURRENCE_CASES + RANGE_CASES + BOUND_CASES + TZ_CASES


@pytest.mark.parametrize(("name", "info", "after", "expected"), ALL_CASES, ids=_ids(ALL_CASES))
def test_fire_times(name: str, info: Info, after: str, expected: list[str]) -> None:
    assert series(parse_schedule(info), at(after), len(expected)) == expected


# --- whole series -------------------------------------------------------------


def test_brief_example_series_skips_saturday() -> None:
    info = {"hour": [0, 1, 2], "minute": [0, 15, 30, 45], "dayOfWeek": [0, 1, 2, 3, 4, 5]}
    # Friday 2024-01-05 23:00 UTC: Friday's hours 0-2 are gone, Saturday is excluded.
    assert series(parse_schedule(info), at("2024-01-05T23:00:00Z"), 14) == [
        "2024-01-07T00:00:00Z",
        "2024-01-07T00:15:00Z",
        "2024-01-07T00:30:00Z",
        "2024-01-07T00:45:00Z",
        "2024-01-07T01:00:00Z",
        "2024-01-07T01:15:00Z",
        "2024-01-07T01:30:00Z",
        "2024-01-07T01:45:00Z",
        "2024-01-07T02:00:00Z",
        "2024-01-07T02:15:00Z",
        "2024-01-07T02:30:00Z",
        "2024-01-07T02:45:00Z",
        "2024-01-08T00:00:00Z",
        "2024-01-08T00:15:00Z",
    ]


def test_weekday_series_over_two_weekends() -> None:
    got = series(parse_schedule("0 9 * * 1-5"), at("2024-01-04T12:00:00Z"), 10)
    assert got == [
        "2024-01-05T09:00:00Z",
        "2024-01-08T09:00:00Z",
        "2024-01-09T09:00:00Z",
        "2024-01-10T09:00:00Z",
        "2024-01-11T09:00:00Z",
        "2024-01-12T09:00:00Z",
        "2024-01-15T09:00:00Z",
        "2024-01-16T09:00:00Z",
        "2024-01-17T09:00:00Z",
        "2024-01-18T09:00:00Z",
    ]


def test_quarter_hour_series_across_fall_back() -> None:
    # Every 15 minutes by the New York clock, hour '*': real time never jumps,
    # so the series stays 15 minutes apart through the repeated hour.
    schedule = parse_schedule({"rule": "*/15 * * * *", "tz": "America/New_York"})
    got = [at(t) for t in series(schedule, at("2024-11-03T05:00:00Z"), 10)]
    assert [b - a for a, b in pairwise(got)] == [timedelta(minutes=15)] * 9
    local = [t.astimezone(ZoneInfo("America/New_York")).strftime("%H:%M%z") for t in got]
    assert local[:6] == [
        "01:15-0400",
        "01:30-0400",
        "01:45-0400",
        "01:00-0500",
        "01:15-0500",
        "01:30-0500",
    ]


def test_iter_after_matches_next_after() -> None:
    schedule = parse_schedule(
        {"start": "2024-01-01T00:00:00Z", "end": "2024-01-01T00:00:09Z", "rule": "*/3 * * * * *"}
    )
    got = [t.strftime("%S") for t in schedule.iter_after(at("2023-12-31T00:00:00Z"))]
    assert got == ["03", "06", "09"]


# --- API details ---------------------------------------------------------------


def test_results_are_aware_utc_and_after_may_be_in_any_zone() -> None:
    schedule = parse_schedule({"hour": 9, "minute": 0, "tz": "Europe/Paris"})
    after = datetime(2024, 7, 1, 12, 0, tzinfo=timezone(timedelta(hours=-7)))  # 19:00Z
    got = schedule.next_after(after)
    assert got == datetime(2024, 7, 2, 7, 0, tzinfo=UTC)  # 09:00 CEST
    assert got is not None and got.tzinfo is UTC


def test_naive_after_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_schedule("* * * * *").next_after(datetime(2024, 1, 1))


@pytest.mark.parametrize(
    "text",
    ['{"rule": "*/5 * * * *"}', '"*/5 * * * *"', "*/5 * * * *", "  */5 * * * *  "],
)
def test_text_forms(text: str) -> None:
    schedule = parse_schedule(text)
    assert schedule.kind == "cron"
    assert schedule.next_after(at("2024-01-01T00:01:00Z")) == at("2024-01-01T00:05:00Z")


def test_describe_names_rule_zone_and_bounds() -> None:
    text = parse_schedule(
        {"rule": "0 9 * * 1-5", "tz": "America/New_York", "end": "2030-01-01T00:00:00Z"}
    ).describe()
    assert "'0 9 * * 1-5'" in text and "America/New_York" in text and "2030-01-01" in text


def test_never_again_is_fast() -> None:
    # No Feb 29 in 2025-2027: the year list bounds the search; no year field: 400 years.
    started = time.perf_counter()
    limited = parse_schedule({"year": [2025, 2026, 2027], "month": 1, "date": 29})
    assert limited.next_after(at("2024-03-01T00:00:00Z")) is None
    assert parse_schedule({"year": 2020}).next_after(at("2024-01-01T00:00:00Z")) is None
    assert time.perf_counter() - started < 1.0


def test_far_future_after_returns_none() -> None:
    assert parse_schedule("* * * * *").next_after(datetime(9999, 12, 31, tzinfo=UTC)) is None


# --- invalid input -------------------------------------------------------------

INVALID: list[tuple[Info, str]] = [
    # Recurrence objects: node's RecurrenceRule.isValid refuses these (never scheduled) ...
    ({"minute": 75}, "minute: 75 is out of range 0-59"),
    ({"hour": 24}, "hour: 24 is out of range 0-23"),
    ({"month": 12}, "month: 12 is out of range 0-11"),
    ({"dayOfWeek": 7}, "dayOfWeek: 7 is out of range 0-6"),
    ({"date": 0}, "date: 0 is out of range 1-31"),
    ({"month": 1, "date": 30}, "date: day 30 never occurs in month Feb"),
    ({"minute": "abc"}, 'minute: expected an integer, got "abc"'),
    # ... these would loop forever in nextInvocationDate ...
    ({"minute": 1.5}, "minute: expected an integer, got 1.5"),
    ({"minute": True}, "minute: expected an integer, got true"),
    ({"second": []}, "second: an empty list never matches"),
    ({"month": [1], "date": [30, 31]}, "date: day 30,31 never occurs in month Feb"),
    # ... and these node tolerates, but they are surely mistakes (see module doc).
    ({"minute": [0, 75]}, "minute: 75 is out of range 0-59"),
    ({"minutes": 5}, "schedule_info: unknown field(s) minutes"),
    ({"minute": {"start": 0, "end": 30, "stop": 2}}, "minute: unknown range field(s) stop"),
    ({"minute": {"start": 70}}, "minute.start: 70 is out of range 0-59"),
    ({"minute": {"step": 0}}, "minute.step: 0 is out of range"),
    ({"minute": {"start": 5, "end": 5, "step": 2}}, "minute: range"),
    ({"hour": 1, "rule": "0 0 * * *"}, "schedule_info: unknown field(s) hour"),
    # Time zones and bounds: an unknown zone makes CronDate throw.
    ({"tz": "Mars/Base"}, "tz: unknown time zone 'Mars/Base'"),
    ({"rule": "* * * * *", "tz": 5}, "tz: expected a time zone name"),
    ({"rule": "* * * * *", "start": "garbage"}, 'start: cannot read "garbage" as a timestamp'),
    ({"rule": "* * * * *", "end": "garbage"}, 'end: cannot read "garbage" as a timestamp'),
    # JavaScript's Date does not read ISO's basic format either.
    ({"rule": "* * * * *", "start": "20240101"}, 'start: cannot read "20240101"'),
    ({"rule": None}, "rule: expected a cron string or a recurrence object, got null"),
    ({"rule": 5}, "rule: expected a cron string or a recurrence object, got 5"),
    ({"rule": {"rule": "* * * * *"}}, "rule: unknown field(s) rule"),
    # Cron strings: cron-parser throws on these, so node never schedules them.
    ("* * * *", "rule: expected 5 or 6 cron fields, got 4"),
    ("* * * * * * *", "rule: expected 5 or 6 cron fields, got 7"),
    ("", "rule: expected 5 or 6 cron fields, got an empty expression"),
    ("75 * * * *", "rule: minute: 75 is out of range 0-59"),
    ("0 0 * * 8", "rule: day-of-week: 8 is out of range 0-7"),
    ("0 0 32 * *", "rule: day-of-month: 32 is out of range 1-31"),
    ("0 0 * 13 *", "rule: month: 13 is out of range 1-12"),
    ("0 0 * FOO *", "rule: month: unknown name 'FOO'"),
    ("0 0 * * MONDAY", "rule: day-of-week: unknown name 'DAY'"),
    ("*/0 * * * *", "rule: minute: step must be a positive integer"),
    ("5-1 * * * *", "rule: minute: invalid range '5-1'"),
    ("1,,2 * * * *", "rule: minute: empty item"),
    ("0 0 ? ? *", "rule: month: invalid characters"),
    ("0 0 * * L", "rule: day-of-week: invalid value 'L'"),
    ("0 0 * * 1#6", "rule: day-of-week: occurrence after '#' must be 1-5"),
    ("0 0 * * 1-5#2", "rule: day-of-week: '#' takes a single weekday"),
    # cron-parser's _handleMaxDaysInMonth; and its loop limit for a day that never comes.
    ("0 0 30 2 *", "rule: day-of-month: day 30 never occurs in month 2"),
    ("0 0 31 4,6 *", "rule: day-of-month: day 31 never occurs in month 4,6"),
    # Text that is neither.
    ("{bad json", "schedule_info: invalid JSON"),
    ("[1, 2]", "schedule_info: expected an object or a cron string, got list"),
]


@pytest.mark.parametrize(("info", "message"), INVALID, ids=[json.dumps(i) for i, _ in INVALID])
def test_invalid_input(info: Info, message: str) -> None:
    with pytest.raises(InvalidSchedule) as caught:
        parse_schedule(info)
    assert message in str(caught.value)


def test_invalid_schedule_is_a_configuration_error() -> None:
    assert issubclass(InvalidSchedule, ConfigurationError)


def test_non_mapping_non_string_is_rejected() -> None:
    with pytest.raises(InvalidSchedule, match="got int"):
        parse_schedule(5)  # type: ignore[arg-type]


def test_fresh_start_inside_repeated_hour_is_a_continuation() -> None:
    # Node, started inside New York's repeated 1 o'clock hour, would still fire the
    # second 01:30; as a continuation (what next_after models) it skips it.
    once = parse_schedule({"rule": "30 1 * * *", "tz": "America/New_York"})
    assert once.next_after(at("2024-11-03T06:10:00Z")) == at("2024-11-04T06:30:00Z")
