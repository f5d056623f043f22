"""Slot arithmetic for pipeline schedules: a cron expression read on the wall clock of an
IANA time zone, turned into UTC instants.

A slot is an instant. Matching is on the wall clock of the schedule's zone:

1. Outside DST transitions every instant whose local wall time matches the cron is a slot.
2. Hourly schedules (the hour field covers all 24 hours: "*", "*/1", "0-23") follow real
   elapsed time: every instant whose local wall time matches is a slot, nothing else. On
   fall-back day in America/New_York "0 * * * *" fires at 00:00 EDT, 01:00 EDT, 01:00 EST,
   02:00 EST (04:00Z, 05:00Z, 06:00Z, 07:00Z); on spring-forward day at 01:00 EST (06:00Z)
   and then 03:00 EDT (07:00Z): the missing 02:00 has no slot.
3. Other schedules fire once per matching wall time:
   - spring-forward: a matching wall time inside the gap (it does not exist) fires once at
     the first instant after it, the transition instant (New York 2026-03-08 "30 2 * * *"
     fires at 07:00Z, which is 03:00 EDT). Several matches in one gap, or matches in the
     gap plus a real match at the transition instant, give ONE slot;
   - fall-back: a matching wall time in the repeated range fires at its first occurrence
     only (New York 2026-11-01 "30 1 * * *" fires at 05:30Z, not again at 06:30Z).
4. Days are croniter's (version 7): a restricted day of month and a restricted day of week
   match either (the classic OR rule); "0 0 31 * *" fires only in months with 31 days and
   "0 0 29 2 *" only in leap years. "L" (last day of month), "W" (nearest weekday), "#"
   (nth weekday) and "L<weekday>" (last such weekday) are croniter's; "?" means "*"; a
   range whose end is below its start wraps ("22-2" is 22, 23, 0, 1, 2).

`Cron.parse` refuses what croniter would read surprisingly or what cannot fire: aliases
("@daily"), seconds or year fields, hashed/random values ("H", "R"), an equal range such
as "5-5" (croniter reads it as the whole cycle, not 5), "W", "#" or "L<weekday>" next to
a restricted other day field (croniter then intersects instead of taking the union, or
fails), and an expression with no slot within `MAX_LOOKAHEAD_YEARS` ("0 0 30 2 *").

Cron resolution is a minute: instants are whole UTC minutes, and a zone's UTC offset is
read at whole UTC minutes and rounded down to a whole minute (exact for every zone since
1972; only local mean time before that has seconds). Offset changes are found by reading
the offset every 6 hours and bisecting to the minute, cached per zone and year: no zone
in the tz database changes its offset and back within 6 hours. Instants are considered
from 1900 to 9000.
"""

from __future__ import annotations

import bisect
import functools
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo, available_timezones

from croniter import CroniterBadDateError, CroniterError, croniter
from croniter.croniter import DOW_ALPHAS, M_ALPHAS

from convergence_server.errors import echo

__all__ = ["MAX_LOOKAHEAD_YEARS", "Cron", "CronError"]

MAX_LOOKAHEAD_YEARS = 5  # an expression with no slot within this many years is refused

MAX_EXPRESSION_LENGTH = 256
MAX_TIME_ZONE_LENGTH = 64

_FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")
_MINUTE = timedelta(minutes=1)
_EARLIEST = datetime(1900, 1, 1)
_LATEST = datetime(9000, 1, 1)
# How far croniter searches before giving up; searches past it continue window by window.
_SEARCH_YEARS = MAX_LOOKAHEAD_YEARS + 1
_OFFSET_SAMPLE = timedelta(hours=6)
# A fall-back repeats at most this much wall time, so an older transition cannot matter.
_LONGEST_REPEAT = timedelta(days=2)

_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_HASHED = re.compile(r"[hr](\(.*\))?(/.*)?")
_RANGE = re.compile(r"([a-z0-9]+)-([a-z0-9]+)(/.*)?")
_NAMED_VALUES: tuple[dict[str, int], ...] = ({}, {}, {}, M_ALPHAS, DOW_ALPHAS)


class CronError(ValueError):
    """A bad expression or zone: `field` is "cron" or "time_zone", `issue` a short phrase
    that completes "<field> <issue>", e.g. "cron must have 5 fields (...)"."""

    def __init__(self, field: str, issue: str) -> None:
        super().__init__(f"{field} {issue}")
        self.field = field
        self.issue = issue


class _Transition(NamedTuple):
    """The zone's UTC offset changes from `before` to `after` at the UTC instant `at`."""

    at: datetime  # naive UTC, a whole minute
    before: timedelta
    after: timedelta


@dataclass(frozen=True)
class Cron:
    """A parsed schedule; make one with `Cron.parse`. Safe to share between threads."""

    expression: str  # as given, stripped
    time_zone: str  # IANA name as given
    hourly: bool  # the hour field matches all 24 hours
    _zone: ZoneInfo = field(repr=False, compare=False)
    _matcher: croniter[datetime] = field(repr=False, compare=False)
    # croniter keeps its position in the object; one search at a time.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def parse(cls, expression: str, time_zone: str = "UTC") -> Cron:
        """Exactly 5 space-separated fields, each valid for croniter, at most 256 printable
        ASCII characters; `time_zone` one of `zoneinfo.available_timezones()` (bar the
        host-dependent "localtime"), at most 64 characters. An expression with no slot
        within `MAX_LOOKAHEAD_YEARS` from now is refused. Raises CronError."""
        if not isinstance(expression, str) or not isinstance(time_zone, str):
            raise TypeError("expression and time_zone must be strings")
        return _parse(expression, time_zone)

    def next_after(self, moment: datetime) -> datetime | None:
        """The first slot strictly after `moment` (aware, any zone), as an aware UTC
        datetime; None if there is none within `MAX_LOOKAHEAD_YEARS`."""
        start = _to_utc_minute(moment, "moment")
        slot = self._next(start, min(_add_years(start, MAX_LOOKAHEAD_YEARS), _LATEST))
        return None if slot is None else slot.replace(tzinfo=UTC)

    def slots(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """The first `limit` slots in (after, until], ascending, aware UTC."""
        cursor, end = _to_utc_minute(after, "after"), _to_utc_minute(until, "until")
        _check_count(limit, "limit")
        found: list[datetime] = []
        while len(found) < limit:
            slot = self._next(cursor, end)
            if slot is None:
                break
            found.append(slot.replace(tzinfo=UTC))
            cursor = slot
        return found

    def newest(self, after: datetime, until: datetime, count: int) -> list[datetime]:
        """The newest `count` slots in (after, until], ascending, aware UTC. Walks back from
        `until`, so the cost is `count` steps however long the range is."""
        start, cursor = _to_utc_minute(after, "after"), _to_utc_minute(until, "until")
        _check_count(count, "count")
        found: list[datetime] = []
        cursor += _MINUTE  # _prev looks strictly before its argument
        while len(found) < count:
            slot = self._prev(cursor, start)
            if slot is None:
                break
            found.append(slot.replace(tzinfo=UTC))
            cursor = slot
        found.reverse()
        return found

    # Everything below works on naive UTC datetimes that are whole minutes.

    def _next(self, moment: datetime, limit: datetime) -> datetime | None:
        """The first slot in (moment, limit]."""
        offset = _offset(self._zone, moment)
        lowest_wall = moment + offset + _MINUTE
        fall_back = self._fall_back_at_or_before(moment)
        if fall_back is not None:
            lowest_wall = max(lowest_wall, fall_back.at + fall_back.before)
        segment_start = moment
        while True:
            wall = self._wall_next(lowest_wall, limit + offset)
            candidate = limit if wall is None else wall - offset
            change = _first_transition(self.time_zone, segment_start, candidate)
            if change is None:
                return None if wall is None else candidate
            # The candidate lies past an offset change: the next segment decides.
            if self._fires_in_gap(change):
                return change.at
            offset, segment_start = change.after, change.at
            lowest_wall = change.at + change.after
            if not self.hourly and change.after < change.before:
                lowest_wall = change.at + change.before  # skip the repeated wall times

    def _prev(self, moment: datetime, limit: datetime) -> datetime | None:
        """The last slot in (limit, moment)."""
        latest = moment - _MINUTE
        offset = _offset(self._zone, latest)
        while latest > limit:
            wall = self._wall_prev(latest + offset, limit + offset + _MINUTE)
            candidate = limit if wall is None else wall - offset
            change = _last_transition(self.time_zone, candidate, latest)
            if change is None:
                if wall is None:
                    return None
                fall_back = self._fall_back_at_or_before(candidate)
                if fall_back is None or wall >= fall_back.at + fall_back.before:
                    return candidate
                change = fall_back  # a second occurrence of a repeated wall time
            elif self._fires_in_gap(change):
                return change.at
            latest, offset = change.at - _MINUTE, change.before
        return None

    def _fall_back_at_or_before(self, moment: datetime) -> _Transition | None:
        """For a non-hourly schedule, the latest offset change at or before `moment` if it
        turns the clock back: wall times below `at + before` after it are repeats."""
        if self.hourly:
            return None
        change = _last_transition(self.time_zone, moment - _LONGEST_REPEAT, moment)
        if change is None or change.after >= change.before:
            return None
        return change

    def _fires_in_gap(self, change: _Transition) -> bool:
        """A non-hourly schedule fires at a spring-forward if a wall time in the gap matches."""
        if self.hourly or change.after <= change.before:
            return False
        gap_start, gap_end = change.at + change.before, change.at + change.after
        return self._wall_next(gap_start, gap_end - _MINUTE) is not None

    def _wall_next(self, lowest: datetime, highest: datetime) -> datetime | None:
        """The first matching wall time in [lowest, highest]."""
        cursor = lowest - _MINUTE
        while cursor < highest and cursor < _LATEST:
            try:
                with self._lock:
                    found = self._matcher.get_next(datetime, start_time=cursor)
            except CroniterBadDateError:
                # croniter searched up to the end of the year _SEARCH_YEARS after its start.
                cursor = datetime((cursor + _MINUTE).year + _SEARCH_YEARS + 1, 1, 1) - _MINUTE
                continue
            return found if found <= highest else None
        return None

    def _wall_prev(self, highest: datetime, lowest: datetime) -> datetime | None:
        """The last matching wall time in [lowest, highest]."""
        cursor = highest + _MINUTE
        while cursor > lowest and cursor > _EARLIEST:
            try:
                with self._lock:
                    found = self._matcher.get_prev(datetime, start_time=cursor)
            except CroniterBadDateError:
                # croniter searched back to the start of the year _SEARCH_YEARS before.
                cursor = datetime((cursor - _MINUTE).year - _SEARCH_YEARS, 1, 1)
                continue
            return found if found >= lowest else None
        return None


@functools.lru_cache(maxsize=4096)
def _parse(expression: str, time_zone: str) -> Cron:
    fields = _check_expression(expression)
    zone = _check_time_zone(time_zone)
    matcher = _matcher(fields)
    cron = Cron(
        expression=expression.strip(" "),
        time_zone=time_zone,
        hourly=matcher.expanded[1] == ["*"],
        _zone=zone,
        _matcher=matcher,
    )
    now = datetime.now(UTC).replace(tzinfo=None, second=0, microsecond=0)
    if cron._wall_next(now, _add_years(now, MAX_LOOKAHEAD_YEARS)) is None:
        raise CronError("cron", f"matches no date in the next {MAX_LOOKAHEAD_YEARS} years")
    return cron


def _check_expression(expression: str) -> list[str]:
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise CronError("cron", f"must be at most {MAX_EXPRESSION_LENGTH} characters")
    if not _PRINTABLE.fullmatch(expression):
        raise CronError("cron", "must contain only printable ASCII characters and spaces")
    if not expression.strip(" "):
        raise CronError("cron", "must not be empty")
    if expression.strip(" ").startswith("@"):
        raise CronError("cron", "must have 5 fields; aliases such as @daily are not supported")
    fields = expression.split()
    if len(fields) != 5:
        raise CronError("cron", "must have 5 fields (minute hour day month weekday)")
    for index, text in enumerate(fields):
        if _HASHED.fullmatch(text.lower()):
            raise CronError("cron", f"{_FIELD_NAMES[index]} field: H and R are not supported")
        for part in text.lower().split(","):
            bounds = _RANGE.fullmatch(part)
            low = None if bounds is None else _value(index, bounds[1])
            high = None if bounds is None else _value(index, bounds[2])
            # Both ends the same day ("7-0": Sunday to Sunday) is read as the whole cycle too.
            same = low == high or (index == 4 and (low, high) == (7, 0))
            if low is not None and same:
                raise CronError(
                    "cron",
                    f"{_FIELD_NAMES[index]} field: range {echo(part)!r} is ambiguous; "
                    "write the single value",
                )
    day_of_month, day_of_week = fields[2].lower(), fields[4].lower()
    special_day = "w" in day_of_month or "#" in day_of_week or "l" in day_of_week
    if special_day and day_of_month not in ("*", "?") and day_of_week not in ("*", "?"):
        raise CronError("cron", "cannot combine W, # or L<weekday> with both day fields restricted")
    return fields


def _value(index: int, text: str) -> int | None:
    """The number a range bound is written as ("0-7", all week, keeps its two ends)."""
    return int(text) if text.isdigit() else _NAMED_VALUES[index].get(text)


def _matcher(fields: list[str]) -> croniter[datetime]:
    try:
        return _new_croniter(" ".join(fields))
    except (CroniterError, ValueError):
        pass
    for index, text in enumerate(fields):
        probe = ["*"] * 5
        probe[index] = text
        try:
            _new_croniter(" ".join(probe))
        except (CroniterError, ValueError):
            raise CronError(
                "cron", f"{_FIELD_NAMES[index]} field {echo(text)!r} is not valid"
            ) from None
    raise CronError("cron", "is not a valid cron expression")


def _new_croniter(expression: str) -> croniter[datetime]:
    return croniter(
        expression, _EARLIEST, ret_type=datetime, max_years_between_matches=_SEARCH_YEARS
    )


def _check_time_zone(time_zone: str) -> ZoneInfo:
    if not time_zone:
        raise CronError("time_zone", "must not be empty")
    if len(time_zone) > MAX_TIME_ZONE_LENGTH:
        raise CronError("time_zone", f"must be at most {MAX_TIME_ZONE_LENGTH} characters")
    if time_zone not in _zone_names():
        raise CronError(
            "time_zone", f"{echo(time_zone)!r} is not an IANA time zone (e.g. Europe/Berlin)"
        )
    return ZoneInfo(time_zone)


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones() - {"localtime"})


def _offset(zone: ZoneInfo, moment: datetime) -> timedelta:
    """The zone's UTC offset at the UTC instant `moment`, rounded down to a whole minute."""
    offset = zone.fromutc(moment.replace(tzinfo=zone)).utcoffset()
    assert offset is not None
    return (offset // _MINUTE) * _MINUTE


@functools.lru_cache(maxsize=8192)
def _transitions(time_zone: str, year: int) -> tuple[_Transition, ...]:
    """The zone's offset changes in [year-01-01, year+1-01-01) UTC, ascending."""
    zone = ZoneInfo(time_zone)
    end = datetime(year + 1, 1, 1)
    found: list[_Transition] = []
    low = datetime(year, 1, 1) - _MINUTE  # a change at exactly 00:00Z belongs to `year`
    low_offset = _offset(zone, low)
    while low < end:
        high = min(low + _OFFSET_SAMPLE, end)
        high_offset = _offset(zone, high)
        while high_offset != low_offset:  # one or more changes in (low, high]
            change = _bisect_change(zone, low, low_offset, high)
            if change.at < end:
                found.append(change)
            low, low_offset = change.at, change.after
        low = high
    return tuple(found)


def _bisect_change(
    zone: ZoneInfo, low: datetime, low_offset: timedelta, high: datetime
) -> _Transition:
    """The first minute in (low, high] whose offset is not `low_offset`."""
    while high - low > _MINUTE:
        middle = low + (high - low) // 2 // _MINUTE * _MINUTE
        if _offset(zone, middle) == low_offset:
            low = middle
        else:
            high = middle
    return _Transition(high, low_offset, _offset(zone, high))


def _first_transition(time_zone: str, after: datetime, until: datetime) -> _Transition | None:
    """The earliest offset change in (after, until]."""
    for year in range(after.year, until.year + 1):
        changes = _transitions(time_zone, year)
        index = bisect.bisect_right(changes, after, key=_at)
        if index < len(changes):
            change = changes[index]
            return change if change.at <= until else None
    return None


def _last_transition(time_zone: str, after: datetime, until: datetime) -> _Transition | None:
    """The latest offset change in (after, until]."""
    for year in range(until.year, after.year - 1, -1):
        changes = _transitions(time_zone, year)
        index = bisect.bisect_right(changes, until, key=_at) - 1
        if index >= 0:
            change = changes[index]
            return change if change.at > after else None
    return None


def _at(change: _Transition) -> datetime:
    return change.at


def _to_utc_minute(value: datetime, name: str) -> datetime:
    """`value` as a naive UTC datetime, rounded down to its minute, within 1900-9000."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    try:
        utc = value.astimezone(UTC).replace(tzinfo=None, second=0, microsecond=0)
    except OverflowError:  # within a day of datetime.min or datetime.max
        return _EARLIEST if value.year < _EARLIEST.year else _LATEST
    return min(max(utc, _EARLIEST), _LATEST)


def _check_count(count: int, name: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{name} must be a non-negative integer")


def _add_years(moment: datetime, years: int) -> datetime:
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:  # 29 February
        return moment.replace(year=moment.year + years, day=28)
