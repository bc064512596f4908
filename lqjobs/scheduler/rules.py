"""Fire times of ``app_jobs.scheduled_jobs.schedule_info``, computed as node-schedule does.

The Node runtime hands ``schedule_info`` to ``node-schedule`` unchanged
(``schedule.scheduleJob(schedule_info, fn)``), so a row holds one of:

* a cron string (5 fields, or 6 with seconds first), parsed the way
  cron-parser 4.x (node-schedule 2.x's parser) parses it;
* ``{"rule": <cron string or recurrence object>, "start": ts, "end": ts, "tz": name}``;
* a recurrence object (node-schedule's ``RecurrenceRule`` "object literal"):
  ``second minute hour date month year dayOfWeek`` (``month`` 0-11 and
  ``dayOfWeek`` 0-6 with Sunday = 0, as in JavaScript) plus ``tz``.

``parse_schedule`` validates and compiles one; ``Schedule.next_after`` gives the
first fire time strictly after an instant. The search skips whole years, months,
days, hours and minutes, so sparse rules cost little, and it gives up after
400 years (the Gregorian calendar's cycle) so a rule that can never fire again
returns ``None``.

Choices where node-schedule leaves room (verified against node-schedule 2.1.1
``lib/Job.js`` / ``lib/Invocation.js`` and cron-parser 4.9.0 ``lib/expression.js``):

* No ``tz`` means UTC. Node uses the process's local zone, which is UTC in the
  containers the Node runtime ships in; naive ``start``/``end`` strings are UTC too.
* Fire times are whole seconds strictly after both ``after`` and ``start``; one
  exactly at ``end`` still fires.
* DST: a cron rule with a restricted hour field follows the wall clock as
  cron-parser does (a time the spring-forward gap skips fires an hour later, a
  time repeated at fall-back fires once). Recurrence objects and cron rules
  whose hour field is ``*`` fire at every real instant whose local time matches
  (a skipped local time never fires, a repeated one fires twice).
* What node-schedule would refuse, throw on or loop forever on raises
  ``InvalidSchedule``. So do some inputs node accepts but are surely mistakes:
  out-of-range values inside lists (node ignores them), unknown keys (node
  ignores them; a typo would mean "every minute"), an unparsable ``end`` (node
  drops the bound), a falsy ``rule`` (node reads the rest as a recurrence
  object), cron strings of fewer than 5 fields (cron-parser right-aligns them)
  and a bare date string (node schedules a single run; not supported here).
* ``{"start", "end", "step"}`` objects are read with ``schedule.Range``'s
  semantics (``end`` inclusive when ``step`` is 1, exclusive otherwise). Node
  itself never matches them: JSON gives plain objects, not ``Range`` instances,
  so ``RecurrenceRule.isValid`` rejects the rule and node never schedules it.
* ``next_after`` is stateless and reads ``after`` as the previous fire time.
  cron-parser keeps DST state between calls, so node started fresh inside a
  repeated fall-back hour fires there once more, and started within an hour
  after a spring-forward gap it skips the gap's shifted times; here neither.
* As in node, ``start``/``end`` count only next to ``rule``, and a ``tz`` inside
  a nested ``rule`` object is ignored (the outer one wins, even when absent).
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lqjobs.errors import ConfigurationError

__all__ = ["InvalidSchedule", "Schedule", "parse_schedule"]


class InvalidSchedule(ConfigurationError):
    """The schedule_info of a scheduled job cannot be scheduled."""


# cron-parser's month lengths: February counts as 29 days everywhere it uses them.
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SEARCH_YEARS = 400
_LAST_SEARCH_YEAR = 9998  # datetime stops at 9999; the search may step one year past its limit
_MAX_DST_SHIFT = timedelta(hours=3)
_MAX_STEPS = 1_000_000  # safety net only; the year limit ends every search long before
_SECOND = timedelta(seconds=1)

_ValueSet = tuple[int, ...]


# ---------------------------------------------------------------------------
# Compiled rules
# ---------------------------------------------------------------------------


class _DayRule(Protocol):
    def __hash__(self) -> int: ...

    def matches(self, year: int, month: int, day: int) -> bool: ...

    def describe(self) -> str: ...


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return _MONTH_DAYS[month - 1]


def _js_weekday(year: int, month: int, day: int) -> int:
    """Day of week as JavaScript's getDay() numbers it: Sunday = 0."""
    return (date(year, month, day).weekday() + 1) % 7


def _fmt(values: frozenset[int] | _ValueSet | None) -> str:
    return "*" if values is None else ",".join(str(v) for v in sorted(values))


@dataclass(frozen=True)
class _RecurrenceDays:
    """RecurrenceRule: ``date`` and ``dayOfWeek`` must both match (Invocation.js)."""

    dates: frozenset[int] | None
    weekdays: frozenset[int] | None

    def matches(self, year: int, month: int, day: int) -> bool:
        if self.dates is not None and day not in self.dates:
            return False
        return self.weekdays is None or _js_weekday(year, month, day) in self.weekdays

    def describe(self) -> str:
        return f"date={_fmt(self.dates)} dayOfWeek={_fmt(self.weekdays)}"


@dataclass(frozen=True)
class _CronDays:
    """cron-parser's day matching, including its counts-based wildcard tests.

    cron-parser calls a field a wildcard by how many values it holds: day of week
    when it has 8 (``*`` expands to 0-7), day of month when it has at least as many
    values as the current month has days (so ``1-30`` is a wildcard in April).
    When both are restricted, either may match (classic cron OR).
    """

    dom: frozenset[int]
    dom_last: bool
    dom_count: int
    dow: frozenset[int]
    dow_last: frozenset[int]
    dow_count: int
    nth: int

    def matches(self, year: int, month: int, day: int) -> bool:
        length = _days_in_month(year, month)
        dom_match = day in self.dom or (self.dom_last and day == length)
        weekday = _js_weekday(year, month, day)
        dow_match = weekday in self.dow or (weekday in self.dow_last and day + 7 > length)
        if not self._day_fields_allow(month, dom_match, dow_match):
            return False
        return self.nth == 0 or (day + 6) // 7 == self.nth

    def _day_fields_allow(self, month: int, dom_match: bool, dow_match: bool) -> bool:
        dom_wild = self.dom_count >= _MONTH_DAYS[month - 1]
        dow_wild = self.dow_count == 8
        if not dom_match:
            return dow_match and not dow_wild
        return dow_match or dow_wild or not dom_wild

    def describe(self) -> str:
        dom = _fmt(self.dom) + (",L" if self.dom_last else "")
        dow = _fmt(self.dow) + "".join(f",{d}L" for d in sorted(self.dow_last))
        return f"day-of-month={dom} day-of-week={dow}" + (f"#{self.nth}" if self.nth else "")


@dataclass(frozen=True)
class _Fields:
    seconds: _ValueSet
    minutes: _ValueSet
    hours: _ValueSet
    months: _ValueSet  # 1-12
    years: _ValueSet | None  # None: any year
    days: _DayRule


@lru_cache(maxsize=4096)
def _matching_days(rule: _DayRule, year: int, month: int) -> _ValueSet:
    return tuple(
        d for d in range(1, _days_in_month(year, month) + 1) if rule.matches(year, month, d)
    )


def _next_value(values: _ValueSet, current: int) -> int | None:
    i = bisect_right(values, current)
    return values[i] if i < len(values) else None


# ---------------------------------------------------------------------------
# The search: walk instants, reading each one's local fields in ``tz``
# ---------------------------------------------------------------------------


def _at(tz: tzinfo, year: int, month: int, day: int, hour: int = 0) -> datetime:
    """The instant of a local wall time; a time in a DST gap moves forward by the gap."""
    return datetime(year, month, day, hour, tzinfo=tz).astimezone(UTC)


def _month_after(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def _year_step(f: _Fields, tz: tzinfo, t: datetime, lt: datetime) -> datetime | None:
    if f.years is None or lt.year in f.years:
        return None
    year = _next_value(f.years, lt.year)
    return _at(tz, _LAST_SEARCH_YEAR + 1 if year is None else year, 1, 1)


def _month_step(f: _Fields, tz: tzinfo, t: datetime, lt: datetime) -> datetime | None:
    if lt.month in f.months:
        return None
    month = _next_value(f.months, lt.month)
    if month is None:
        return _at(tz, lt.year + 1, f.months[0], 1)
    return _at(tz, lt.year, month, 1)


def _day_step(f: _Fields, tz: tzinfo, t: datetime, lt: datetime) -> datetime | None:
    days = _matching_days(f.days, lt.year, lt.month)
    if lt.day in days:
        return None
    day = _next_value(days, lt.day)
    if day is None:
        return _at(tz, *_month_after(lt.year, lt.month), 1)
    return _at(tz, lt.year, lt.month, day)


def _hour_step(f: _Fields, tz: tzinfo, t: datetime, lt: datetime) -> datetime | None:
    if lt.hour in f.hours:
        return None
    hour = _next_value(f.hours, lt.hour)
    if hour is None:
        tomorrow = lt.date() + timedelta(days=1)
        return _at(tz, tomorrow.year, tomorrow.month, tomorrow.day)
    candidate = _at(tz, lt.year, lt.month, lt.day, hour)
    # Never step backwards (possible only around an unusual DST shift): next real hour.
    return candidate if candidate > t else t + timedelta(minutes=60 - lt.minute, seconds=-lt.second)


def _minute_step(f: _Fields, tz: tzinfo, t: datetime, lt: datetime) -> datetime | None:
    if lt.minute in f.minutes:
        return None
    minute = _next_value(f.minutes, lt.minute)
    # Past the last minute: the next real hour, so a repeated fall-back hour is seen twice.
    return t + timedelta(minutes=(60 if minute is None else minute) - lt.minute, seconds=-lt.second)


def _second_step(f: _Fields, tz: tzinfo, t: datetime, lt: datetime) -> datetime | None:
    if lt.second in f.seconds:
        return None
    second = _next_value(f.seconds, lt.second)
    return t + timedelta(seconds=(60 if second is None else second) - lt.second)


_STEPS = (_year_step, _month_step, _day_step, _hour_step, _minute_step, _second_step)


def _search(f: _Fields, tz: tzinfo, t: datetime, last_year: int) -> datetime | None:
    """First whole-second instant at or after ``t`` whose local fields in ``tz`` match."""
    for _ in range(_MAX_STEPS):
        lt = t.astimezone(tz)
        if lt.year > last_year:
            return None
        for step in _STEPS:
            nxt = step(f, tz, t, lt)
            if nxt is not None:
                t = nxt
                break
        else:
            return t
    return None


def _last_year(f: _Fields, from_year: int) -> int:
    limit = f.years[-1] if f.years is not None else from_year + _SEARCH_YEARS
    return min(limit, _LAST_SEARCH_YEAR)


def _next_instant(f: _Fields, tz: tzinfo, base: datetime) -> datetime | None:
    start = base.replace(microsecond=0) + _SECOND
    return _search(f, tz, start, _last_year(f, start.astimezone(tz).year))


def _next_wall_time(f: _Fields, tz: tzinfo, base: datetime) -> datetime | None:
    """cron-parser's wall-clock behaviour: match local times, then map each to an instant.

    The wall-time search runs in UTC as a stand-in for naive local time. It starts
    up to one DST shift early, so a time in a gap just before ``base`` (which maps
    to after it) is still seen; candidates that map to ``base`` or before are skipped.
    """
    offset = min(_utcoffset(tz, base), _utcoffset(tz, base - _MAX_DST_SHIFT))
    wall = (base + offset).replace(microsecond=0)
    last_year = _last_year(f, wall.year)
    for _ in range(_MAX_STEPS):
        found = _search(f, UTC, wall, last_year)
        if found is None:
            return None
        instant = found.replace(tzinfo=tz).astimezone(UTC)
        if instant > base:
            return instant
        wall = found + _SECOND
    return None


def _utcoffset(tz: tzinfo, instant: datetime) -> timedelta:
    return instant.astimezone(tz).utcoffset() or timedelta(0)


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A compiled schedule_info. Build it with ``parse_schedule``."""

    kind: Literal["cron", "recurrence"]
    source: str  # the cron expression, or the recurrence object as JSON
    tz: tzinfo
    start: datetime | None
    end: datetime | None
    fields: _Fields = field(repr=False)
    wall_clock: bool = field(repr=False)

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire time strictly after ``after`` (aware), as an aware UTC datetime.

        ``None`` when the schedule will not fire again: past ``end``, or no match
        within its years (at most 400 years ahead).
        """
        if after.tzinfo is None or after.utcoffset() is None:
            raise ValueError("next_after needs a timezone-aware datetime")
        base = after.astimezone(UTC)
        if self.start is not None and self.start > base:
            base = self.start
        if base.year > _LAST_SEARCH_YEAR or (self.end is not None and base >= self.end):
            return None
        search = _next_wall_time if self.wall_clock else _next_instant
        found = search(self.fields, self.tz, base)
        if found is None or (self.end is not None and found > self.end):
            return None
        return found

    def iter_after(self, after: datetime) -> Iterator[datetime]:
        """Successive fire times after ``after``, each computed from the previous one."""
        current = self.next_after(after)
        while current is not None:
            yield current
            current = self.next_after(current)

    def describe(self) -> str:
        """A one-line summary for logs and the CLI."""
        text = f"cron {self.source!r}" if self.kind == "cron" else f"recurrence {self.source}"
        parts = [text, f"in {self.tz}"]
        if self.start is not None:
            parts.append(f"from {self.start.isoformat()}")
        if self.end is not None:
            parts.append(f"until {self.end.isoformat()}")
        return " ".join(parts)


# ---------------------------------------------------------------------------
# parse_schedule
# ---------------------------------------------------------------------------

_RECURRENCE_FIELDS: dict[str, tuple[int, int, str]] = {
    "second": (0, 59, ""),
    "minute": (0, 59, ""),
    "hour": (0, 23, ""),
    "date": (1, 31, ""),
    "month": (0, 11, " (0 = January)"),
    "year": (1, 9999, ""),
    "dayOfWeek": (0, 6, " (0 = Sunday)"),
}
# "recurs" appears when a RecurrenceRule was JSON.stringify'd; node ignores it.
# "start"/"end" without "rule" are ignored by node too.
_LITERAL_KEYS = frozenset(_RECURRENCE_FIELDS) | {"tz", "recurs", "start", "end"}
_BOUNDED_KEYS = frozenset({"rule", "start", "end", "tz"})
_NESTED_RULE_KEYS = frozenset(_RECURRENCE_FIELDS) | {"tz", "recurs"}
_ISO_DATE = re.compile(r"\d{4}-\d{2}")
_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*", re.ASCII)
_UTC_OFFSET_ZONE = re.compile(r"utc(?:([+-]\d{1,2})(?::(\d{2}))?)?", re.IGNORECASE)


def parse_schedule(info: Mapping[str, Any] | str) -> Schedule:
    """Compile a schedule_info value: a mapping, a cron string, or JSON text of either.

    Raises ``InvalidSchedule`` naming the offending field.
    """
    if isinstance(info, str):
        return _parse_text(info)
    if isinstance(info, Mapping):
        return _parse_mapping(info)
    raise InvalidSchedule(
        f"schedule_info: expected an object or a cron string, got {type(info).__name__}"
    )


def _parse_text(text: str) -> Schedule:
    if not text.lstrip().startswith(("{", "[", '"')):
        return _parse_cron(text, UTC, None, None)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSchedule(f"schedule_info: invalid JSON: {exc}") from None
    if isinstance(value, str | Mapping):
        return parse_schedule(value)
    raise InvalidSchedule(
        f"schedule_info: expected an object or a cron string, got {type(value).__name__}"
    )


def _parse_mapping(info: Mapping[str, Any]) -> Schedule:
    tz = _parse_tz(info.get("tz"))
    if "rule" not in info:
        _check_keys("schedule_info", info, _LITERAL_KEYS)
        return _parse_recurrence(info, tz, None, None)
    _check_keys("schedule_info", info, _BOUNDED_KEYS)
    start = _parse_bound("start", info.get("start"))
    end = _parse_bound("end", info.get("end"))
    rule = info["rule"]
    if isinstance(rule, str) and rule.strip():
        return _parse_cron(rule, tz, start, end)
    if isinstance(rule, Mapping):
        _check_keys("rule", rule, _NESTED_RULE_KEYS)
        return _parse_recurrence(rule, tz, start, end)
    raise InvalidSchedule(
        f"rule: expected a cron string or a recurrence object, got {json.dumps(rule)}"
    )


def _check_keys(where: str, info: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(str(k) for k in info if k not in allowed)
    if unknown:
        raise InvalidSchedule(
            f"{where}: unknown field(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(allowed))}"
        )


def _parse_tz(value: Any) -> tzinfo:
    """A zone as luxon (node-schedule's date library) reads one; None is UTC (see module doc)."""
    if value is None:
        return UTC
    if not isinstance(value, str):
        raise InvalidSchedule(f"tz: expected a time zone name, got {json.dumps(value)}")
    lowered = value.strip().lower()
    if lowered in ("local", "system", "default", "gmt"):
        return UTC
    offset = _UTC_OFFSET_ZONE.fullmatch(value.strip())
    if offset is not None:
        return _fixed_offset(offset.group(1), offset.group(2))
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidSchedule(f"tz: unknown time zone {value!r}") from None


def _fixed_offset(hours_text: str | None, minutes_text: str | None) -> tzinfo:
    """luxon's ``UTC+3`` / ``UTC-03:30`` zones; the minutes take the hours' sign."""
    hours, minutes = int(hours_text or 0), int(minutes_text or 0)
    sign = -1 if (hours_text or "").startswith("-") else 1
    offset = sign * timedelta(hours=abs(hours), minutes=minutes)
    return timezone(offset) if offset else UTC


def _parse_bound(name: str, value: Any) -> datetime | None:
    """``start``/``end`` as JavaScript's ``new Date(value)`` reads them: ISO text or epoch ms."""
    if value is None or value == "" or value == 0:
        return None  # node: `spec.start || undefined`
    if isinstance(value, bool):
        raise InvalidSchedule(f"{name}: expected a timestamp, got {json.dumps(value)}")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            pass
    if isinstance(value, str):
        parsed = _parse_timestamp(value.strip())
        if parsed is not None:
            return parsed
    raise InvalidSchedule(f"{name}: cannot read {json.dumps(value)} as a timestamp")


def _parse_timestamp(text: str) -> datetime | None:
    try:
        if not _ISO_DATE.match(text):
            raise ValueError(text)  # JavaScript's Date rejects ISO's basic form (20240101)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        try:
            parsed = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    # Naive times are the Node process's local time, which is UTC (module doc).
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# --- recurrence objects -----------------------------------------------------


def _parse_recurrence(
    rule: Mapping[str, Any], tz: tzinfo, start: datetime | None, end: datetime | None
) -> Schedule:
    values = {name: _recurrence_field(name, rule) for name in _RECURRENCE_FIELDS}
    months = _months_of(values["month"])
    days = _RecurrenceDays(dates=values["date"], weekdays=values["dayOfWeek"])
    _check_dates_exist(values["date"], months)
    fields = _Fields(
        seconds=_all_or(values["second"], 0, 59),
        minutes=_all_or(values["minute"], 0, 59),
        hours=_all_or(values["hour"], 0, 23),
        months=months,
        years=None if values["year"] is None else tuple(sorted(values["year"])),
        days=days,
    )
    shown = {k: rule[k] for k in _RECURRENCE_FIELDS if k in rule}
    source = json.dumps(shown, sort_keys=True, default=str)
    return Schedule("recurrence", source, tz, start, end, fields, wall_clock=False)


def _all_or(values: frozenset[int] | None, lo: int, hi: int) -> _ValueSet:
    return tuple(range(lo, hi + 1)) if values is None else tuple(sorted(values))


def _months_of(values: frozenset[int] | None) -> _ValueSet:
    return tuple(range(1, 13)) if values is None else tuple(sorted(m + 1 for m in values))


def _check_dates_exist(dates: frozenset[int] | None, months: _ValueSet) -> None:
    # node rejects a lone date past a lone month's length (isValid) and loops
    # forever on the list forms of the same mistake; both are errors here.
    if dates is None or any(d <= _MONTH_DAYS[m - 1] for m in months for d in dates):
        return
    names = ",".join(_MONTH_NAMES[m - 1] for m in months)
    raise InvalidSchedule(f"date: day {_fmt(dates)} never occurs in month {names}")


def _recurrence_field(name: str, rule: Mapping[str, Any]) -> frozenset[int] | None:
    """The set of values a field allows, or None for any value."""
    if name not in rule:
        return frozenset({0}) if name == "second" else None  # RecurrenceRule's defaults
    lo, hi, hint = _RECURRENCE_FIELDS[name]
    allowed: set[int] = set()
    for leaf in _leaves(name, rule[name]):
        if leaf is None:
            return None  # recurMatch: a null matcher matches anything, inside a list too
        if isinstance(leaf, Mapping):
            allowed |= _range_values(name, leaf, lo, hi)
        else:
            allowed.add(_checked_int(name, leaf, lo, hi, hint))
    return frozenset(allowed)


def _leaves(name: str, value: Any) -> Iterator[Any]:
    if not isinstance(value, list):
        yield value
        return
    if not value:
        raise InvalidSchedule(f"{name}: an empty list never matches")
    for item in value:
        yield from _leaves(name, item)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)  # recurMatch compares strings through Number()
    return None


def _checked_int(name: str, value: Any, lo: int, hi: int, hint: str = "") -> int:
    number = _as_int(value)
    if number is None:
        raise InvalidSchedule(f"{name}: expected an integer, got {json.dumps(value)}")
    if not lo <= number <= hi:
        raise InvalidSchedule(f"{name}: {number} is out of range {lo}-{hi}{hint}")
    return number


def _range_values(name: str, spec: Mapping[str, Any], lo: int, hi: int) -> set[int]:
    """``schedule.Range(start = 0, end = 60, step = 1)`` over the field's values.

    Range.contains: with step 1 the end is inclusive; with a larger step it
    counts start, start+step, ... while below end (the end itself is excluded).
    """
    unknown = sorted(str(k) for k in spec if k not in ("start", "end", "step"))
    if unknown:
        raise InvalidSchedule(f"{name}: unknown range field(s) {', '.join(unknown)}")
    first = _range_part(name, spec, "start", 0, lo, hi)
    last = _range_part(name, spec, "end", 60, first, max(hi, 60))
    step = _range_part(name, spec, "step", 1, 1, max(hi, 60))
    numbers = range(first, last + 1) if step == 1 else range(first, last, step)
    found = {n for n in numbers if lo <= n <= hi}
    if not found:
        raise InvalidSchedule(f"{name}: range {json.dumps(dict(spec))} matches no value")
    return found


def _range_part(
    name: str, spec: Mapping[str, Any], key: str, default: int, lo: int, hi: int
) -> int:
    value = spec.get(key)
    if value is None:
        return default
    return _checked_int(f"{name}.{key}", value, lo, hi)


# --- cron strings -----------------------------------------------------------

_CRON_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)
_PREDEFINED = {
    "@yearly": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_ALIASES = {
    "month": {n.lower(): i + 1 for i, n in enumerate(_MONTH_NAMES)},
    "day-of-week": {n: i for i, n in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
}
_CHARS = {
    "day-of-month": re.compile(r"[?,*\dL/-]+", re.ASCII),
    "day-of-week": re.compile(r"[?,*\dL#/-]+", re.ASCII),
}
_STANDARD_CHARS = re.compile(r"[,*\d/-]+", re.ASCII)
_THREE_LETTERS = re.compile(r"[a-z]{3}", re.IGNORECASE)

_CronValue = int | str  # str: an "L" item (last day / last weekday)


class _CronError(Exception):
    """A problem in one cron field; turned into InvalidSchedule with context."""


def _parse_cron(
    expression: str, tz: tzinfo, start: datetime | None, end: datetime | None
) -> Schedule:
    text = expression.strip()
    atoms = _PREDEFINED.get(text, text).split()
    if len(atoms) not in (5, 6):
        found = "an empty expression" if not atoms else str(len(atoms))
        raise InvalidSchedule(f"rule: expected 5 or 6 cron fields, got {found} in {text!r}")
    if len(atoms) == 5:
        atoms.insert(0, "0")
    nth, atoms[5] = _split_nth(text, atoms[5])
    parsed = [
        _cron_field(text, name, lo, hi, atom)
        for (name, lo, hi), atom in zip(_CRON_FIELDS, atoms, strict=True)
    ]
    seconds, minutes, hours, dom, months, dow = parsed
    dom = _fit_days_to_month(text, dom, months)
    days = _cron_days(text, dom, dow, nth)
    _check_cron_days_exist(text, days, months)
    fields = _Fields(
        seconds=_numbers(seconds),
        minutes=_numbers(minutes),
        hours=_numbers(hours),
        months=_numbers(months),
        years=None,
        days=days,
    )
    # cron-parser's DST handling only kicks in when the hour field is not all 24 hours.
    return Schedule("cron", text, tz, start, end, fields, wall_clock=len(hours) != 24)


def _numbers(values: list[_CronValue]) -> _ValueSet:
    return tuple(sorted({v for v in values if isinstance(v, int)}))


def _cron_error(expression: str, name: str, problem: str) -> InvalidSchedule:
    return InvalidSchedule(f"rule: {name}: {problem} in {expression!r}")


def _split_nth(expression: str, value: str) -> tuple[int, str]:
    """Day of week ``D#N``: the N-th such weekday of the month (cron-parser parseNthDay)."""
    if "#" not in value:
        return 0, value
    weekday, _, nth = value.partition("#")
    if any(c in value for c in ",/-") or "#" in nth:
        raise _cron_error(expression, "day-of-week", f"'#' takes a single weekday, got {value!r}")
    if not nth.isdigit() or not 1 <= int(nth) <= 5:
        raise _cron_error(
            expression, "day-of-week", f"occurrence after '#' must be 1-5 ({value!r})"
        )
    return int(nth), weekday


def _cron_field(expression: str, name: str, lo: int, hi: int, value: str) -> list[_CronValue]:
    try:
        return _cron_values(name, lo, hi, value)
    except _CronError as exc:
        raise _cron_error(expression, name, str(exc)) from None


def _cron_values(name: str, lo: int, hi: int, value: str) -> list[_CronValue]:
    if name in _ALIASES:
        value = _THREE_LETTERS.sub(lambda m: _alias(name, m.group()), value)
    if not _CHARS.get(name, _STANDARD_CHARS).fullmatch(value):
        raise _CronError(f"invalid characters in {value!r}")
    wildcard = "*" if "*" in value else "?"
    value = value.replace(wildcard, f"{lo}-{hi}")
    items = value.split(",")
    if not all(items):
        raise _CronError(f"empty item in list {value!r}")
    values: list[_CronValue] = []
    for item in items:
        values.extend(_cron_item(name, lo, hi, item))
    return values


def _alias(name: str, word: str) -> str:
    number = _ALIASES[name].get(word.lower())
    if number is None:
        raise _CronError(f"unknown name {word!r}")
    return str(number)


def _cron_item(name: str, lo: int, hi: int, item: str) -> list[_CronValue]:
    base, slash, step = item.partition("/")
    if "/" in step:
        raise _CronError(f"invalid step {item!r}")
    if slash and base.isdigit():
        base = f"{base}-{hi}"  # "5/15" means 5-max/15
    if "-" in base:
        return _cron_range(name, lo, hi, base, step if slash else "1")
    if base.isdigit():
        number = int(base)
        if not lo <= number <= hi:
            raise _CronError(f"{number} is out of range {lo}-{hi}")
        return [number % 7 if name == "day-of-week" else number]
    return [_cron_last(name, base)]


def _cron_range(name: str, lo: int, hi: int, text: str, step_text: str) -> list[_CronValue]:
    first_text, _, last_text = text.partition("-")
    if not (first_text.isdigit() and last_text.isdigit()):
        raise _CronError(f"invalid range {text!r}")
    first, last = int(first_text), int(last_text)
    if first < lo or last > hi:
        raise _CronError(f"range {first}-{last} is out of range {lo}-{hi}")
    if first > last:
        raise _CronError(f"invalid range {text!r}: start is after end")
    if not step_text.isdigit() or int(step_text) == 0:
        raise _CronError(f"step must be a positive integer, got {step_text!r}")
    return list(_expand_range(name, first, last, int(step_text)))


def _expand_range(name: str, first: int, last: int, step: int) -> list[int]:
    # As cron-parser: a day-of-week range ending on 7 (or 0) also yields 0 (Sunday) up
    # front, and that pre-filled 0 is skipped without advancing the step counter.
    values = [0] if name == "day-of-week" and last % 7 == 0 else []
    counter = step
    for value in range(first, last + 1):
        if value not in values and counter % step == 0:
            values.append(value)
            counter = 1
        else:
            counter += 1
    return values


def _cron_last(name: str, text: str) -> str:
    if name == "day-of-month" and text == "L":
        return text
    if name == "day-of-week" and re.fullmatch(r"[0-7]L", text):
        return text
    raise _CronError(f"invalid value {text!r}")


def _fit_days_to_month(
    expression: str, dom: list[_CronValue], months: list[_CronValue]
) -> list[_CronValue]:
    """cron-parser's _handleMaxDaysInMonth: with one month, drop days it cannot have."""
    if len(months) != 1:
        return dom
    length = _MONTH_DAYS[int(months[0]) - 1]
    numbers = [d for d in dom if isinstance(d, int)]
    if numbers and min(numbers) > length:
        raise _cron_error(
            expression, "day-of-month", f"day {min(numbers)} never occurs in month {months[0]}"
        )
    return [d for d in dom if not isinstance(d, int) or d <= length]


def _cron_days(
    expression: str, dom: list[_CronValue], dow: list[_CronValue], nth: int
) -> _CronDays:
    return _CronDays(
        dom=frozenset(d for d in dom if isinstance(d, int)),
        dom_last="L" in dom,
        dom_count=len(dom),
        dow=frozenset(d for d in dow if isinstance(d, int)),
        dow_last=frozenset(int(d[0]) % 7 for d in dow if isinstance(d, str)),
        dow_count=len(dow),
        nth=nth,
    )


def _check_cron_days_exist(expression: str, days: _CronDays, months: list[_CronValue]) -> None:
    # With day of week '*' only the day of month decides; cron-parser then gives up
    # after its loop limit and node never schedules the job.
    if days.dow_count != 8 or days.dom_last or days.nth:
        return
    if any(d <= _MONTH_DAYS[int(m) - 1] for m in months for d in days.dom):
        return
    raise _cron_error(
        expression,
        "day-of-month",
        f"day {_fmt(days.dom)} never occurs in month {_fmt(_numbers(months))}",
    )
