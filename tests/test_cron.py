"""Slot arithmetic of `domain.cron`: exact UTC instants around DST, month ends, bad input,
and a seeded brute-force comparison over zones with odd transitions."""

from __future__ import annotations

import functools
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from convergence_server.domain.cron import MAX_LOOKAHEAD_YEARS, Cron, CronError

MINUTE = timedelta(minutes=1)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def every(first: str, last: str, step: timedelta) -> list[datetime]:
    """first, first + step, ... last (inclusive), in UTC."""
    out, moment = [], utc(first)
    while moment <= utc(last):
        out.append(moment)
        moment += step
    return out


def local_day(expression: str, zone: str, day: str) -> list[datetime]:
    """The slots of one local calendar day, midnight to midnight."""
    tz = ZoneInfo(zone)
    start = datetime.fromisoformat(day).replace(tzinfo=tz)
    end = (start + timedelta(days=1)).replace(tzinfo=tz)  # wall arithmetic: next midnight
    cron = Cron.parse(expression, zone)
    found = cron.slots(start - MINUTE, end - MINUTE, 1000)
    assert cron.newest(start - MINUTE, end - MINUTE, 1000) == found
    return found


HOUR = timedelta(hours=1)
HALF = timedelta(minutes=30)

# (expression, zone, local day, exact UTC slots)
DST_DAYS = [
    # New York, spring-forward 2026-03-08 07:00Z: 02:00 EST -> 03:00 EDT.
    ("30 2 * * *", "America/New_York", "2026-03-08", [utc("2026-03-08T07:00")]),
    ("30 1 * * *", "America/New_York", "2026-03-08", [utc("2026-03-08T06:30")]),
    ("0 3 * * *", "America/New_York", "2026-03-08", [utc("2026-03-08T07:00")]),
    ("0 2 * * *", "America/New_York", "2026-03-08", [utc("2026-03-08T07:00")]),
    (
        "0 * * * *",
        "America/New_York",
        "2026-03-08",
        every("2026-03-08T05:00", "2026-03-08T06:00", HOUR)
        + every("2026-03-08T07:00", "2026-03-09T03:00", HOUR),
    ),
    (
        "30 * * * *",
        "America/New_York",
        "2026-03-08",
        every("2026-03-08T05:30", "2026-03-08T06:30", HOUR)
        + every("2026-03-08T07:30", "2026-03-09T03:30", HOUR),
    ),
    (
        "*/30 * * * *",
        "America/New_York",
        "2026-03-08",
        every("2026-03-08T05:00", "2026-03-08T06:30", HALF)
        + every("2026-03-08T07:00", "2026-03-09T03:30", HALF),
    ),
    # New York, fall-back 2026-11-01 06:00Z: 02:00 EDT -> 01:00 EST.
    ("30 2 * * *", "America/New_York", "2026-11-01", [utc("2026-11-01T07:30")]),
    ("30 1 * * *", "America/New_York", "2026-11-01", [utc("2026-11-01T05:30")]),
    ("0 3 * * *", "America/New_York", "2026-11-01", [utc("2026-11-01T08:00")]),
    ("0 2 * * *", "America/New_York", "2026-11-01", [utc("2026-11-01T07:00")]),
    (
        "0 * * * *",
        "America/New_York",
        "2026-11-01",
        every("2026-11-01T04:00", "2026-11-02T04:00", HOUR),  # 25 hours
    ),
    (
        "30 * * * *",
        "America/New_York",
        "2026-11-01",
        every("2026-11-01T04:30", "2026-11-02T04:30", HOUR),
    ),
    (
        "*/30 * * * *",
        "America/New_York",
        "2026-11-01",
        every("2026-11-01T04:00", "2026-11-02T04:30", HALF),
    ),
    # Berlin, spring-forward 2026-03-29 01:00Z: 02:00 CET -> 03:00 CEST.
    ("30 2 * * *", "Europe/Berlin", "2026-03-29", [utc("2026-03-29T01:00")]),
    ("30 1 * * *", "Europe/Berlin", "2026-03-29", [utc("2026-03-29T00:30")]),
    ("0 3 * * *", "Europe/Berlin", "2026-03-29", [utc("2026-03-29T01:00")]),
    ("0 2 * * *", "Europe/Berlin", "2026-03-29", [utc("2026-03-29T01:00")]),
    (
        "0 * * * *",
        "Europe/Berlin",
        "2026-03-29",
        every("2026-03-28T23:00", "2026-03-29T00:00", HOUR)
        + every("2026-03-29T01:00", "2026-03-29T21:00", HOUR),
    ),
    (
        "30 * * * *",
        "Europe/Berlin",
        "2026-03-29",
        every("2026-03-28T23:30", "2026-03-29T00:30", HOUR)
        + every("2026-03-29T01:30", "2026-03-29T21:30", HOUR),
    ),
    (
        "*/30 * * * *",
        "Europe/Berlin",
        "2026-03-29",
        every("2026-03-28T23:00", "2026-03-29T00:30", HALF)
        + every("2026-03-29T01:00", "2026-03-29T21:30", HALF),
    ),
    # Berlin, fall-back 2026-10-25 01:00Z: 03:00 CEST -> 02:00 CET.
    ("30 2 * * *", "Europe/Berlin", "2026-10-25", [utc("2026-10-25T00:30")]),
    ("30 1 * * *", "Europe/Berlin", "2026-10-25", [utc("2026-10-24T23:30")]),
    ("0 3 * * *", "Europe/Berlin", "2026-10-25", [utc("2026-10-25T02:00")]),
    ("0 2 * * *", "Europe/Berlin", "2026-10-25", [utc("2026-10-25T00:00")]),
    (
        "0 * * * *",
        "Europe/Berlin",
        "2026-10-25",
        every("2026-10-24T22:00", "2026-10-25T22:00", HOUR),  # 25 hours
    ),
    (
        "30 * * * *",
        "Europe/Berlin",
        "2026-10-25",
        every("2026-10-24T22:30", "2026-10-25T22:30", HOUR),
    ),
    (
        "*/30 * * * *",
        "Europe/Berlin",
        "2026-10-25",
        every("2026-10-24T22:00", "2026-10-25T22:30", HALF),
    ),
    # Several matches in one gap, and a gap match plus a real 03:00: one slot.
    ("*/30 2 * * *", "America/New_York", "2026-03-08", [utc("2026-03-08T07:00")]),
    (
        "0,30 2-3 * * *",
        "America/New_York",
        "2026-03-08",
        [utc("2026-03-08T07:00"), utc("2026-03-08T07:30")],
    ),
    ("*/30 2 * * *", "Europe/Berlin", "2026-03-29", [utc("2026-03-29T01:00")]),
    (
        "0,30 2-3 * * *",
        "Europe/Berlin",
        "2026-03-29",
        [utc("2026-03-29T01:00"), utc("2026-03-29T01:30")],
    ),
    # Repeated wall times fire once, at the first occurrence.
    (
        "*/30 1 * * *",
        "America/New_York",
        "2026-11-01",
        [utc("2026-11-01T05:00"), utc("2026-11-01T05:30")],
    ),
    (
        "0,30 2-3 * * *",
        "Europe/Berlin",
        "2026-10-25",
        every("2026-10-25T00:00", "2026-10-25T00:30", HALF)
        + every("2026-10-25T02:00", "2026-10-25T02:30", HALF),
    ),
]


@pytest.mark.parametrize(("expression", "zone", "day", "expected"), DST_DAYS)
def test_dst_days(expression: str, zone: str, day: str, expected: list[datetime]) -> None:
    assert local_day(expression, zone, day) == expected


def test_hourly_flag() -> None:
    for expression in ("0 * * * *", "*/15 */1 * * *", "0 0-23 * * 1", "0 22-21 * * *"):
        assert Cron.parse(expression).hourly, expression
    for expression in ("0 0-22 * * *", "0 */2 * * *", "30 2 * * *"):
        assert not Cron.parse(expression).hourly, expression


def test_next_after_around_transitions() -> None:
    spring = Cron.parse("30 2 * * *", "America/New_York")
    assert spring.next_after(utc("2026-03-08T06:59")) == utc("2026-03-08T07:00")
    assert spring.next_after(utc("2026-03-08T07:00")) == utc("2026-03-09T06:30")
    fall = Cron.parse("30 1 * * *", "America/New_York")
    assert fall.next_after(utc("2026-11-01T05:29")) == utc("2026-11-01T05:30")
    # 06:10Z is 01:10 EST, inside the repeated hour: 01:30 EST is not a slot.
    assert fall.next_after(utc("2026-11-01T06:10")) == utc("2026-11-02T06:30")
    assert fall.newest(utc("2026-10-01T00:00"), utc("2026-11-01T06:40"), 1) == [
        utc("2026-11-01T05:30")
    ]
    hourly = Cron.parse("30 * * * *", "America/New_York")
    assert hourly.next_after(utc("2026-11-01T06:10")) == utc("2026-11-01T06:30")


def test_next_after_is_strictly_after() -> None:
    cron = Cron.parse("0 * * * *")
    assert cron.next_after(utc("2026-05-04T10:00")) == utc("2026-05-04T11:00")
    assert cron.next_after(utc("2026-05-04T10:00:30")) == utc("2026-05-04T11:00")
    assert cron.next_after(utc("2026-05-04T09:59:59.999999")) == utc("2026-05-04T10:00")
    tokyo = datetime(2026, 5, 4, 19, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # 10:00Z
    assert cron.next_after(tokyo) == utc("2026-05-04T11:00")
    result = cron.next_after(utc("2026-05-04T10:00"))
    assert result is not None and result.tzinfo is UTC


def test_month_ends_and_leap_days() -> None:
    thirty_first = Cron.parse("0 0 31 * *")
    assert thirty_first.slots(utc("2026-01-01T00:00"), utc("2026-12-31T23:59"), 100) == [
        utc(f"2026-{month:02}-31T00:00") for month in (1, 3, 5, 7, 8, 10, 12)
    ]
    leap = Cron.parse("0 0 29 2 *")
    assert leap.next_after(utc("2026-01-01T00:00")) == utc("2028-02-29T00:00")
    # 2100 is not a leap year: 2096 to 2104 is more than MAX_LOOKAHEAD_YEARS.
    assert MAX_LOOKAHEAD_YEARS == 5
    assert leap.next_after(utc("2097-01-01T00:00")) is None
    assert leap.slots(utc("2090-01-01T00:00"), utc("2110-01-01T00:00"), 10) == [
        utc("2092-02-29T00:00"),
        utc("2096-02-29T00:00"),
        utc("2104-02-29T00:00"),
        utc("2108-02-29T00:00"),
    ]
    assert leap.newest(utc("2097-01-01T00:00"), utc("2110-01-01T00:00"), 1) == [
        utc("2108-02-29T00:00")
    ]
    assert leap.newest(utc("2097-01-01T00:00"), utc("2105-01-01T00:00"), 5) == [
        utc("2104-02-29T00:00")
    ]


def test_day_of_month_or_day_of_week() -> None:
    # croniter's OR rule: the 1st of the month or any Monday.
    cron = Cron.parse("0 0 1 * 1")
    assert cron.slots(utc("2026-01-31T00:00"), utc("2026-02-28T00:00"), 10) == [
        utc("2026-02-01T00:00"),
        utc("2026-02-02T00:00"),
        utc("2026-02-09T00:00"),
        utc("2026-02-16T00:00"),
        utc("2026-02-23T00:00"),
    ]


def test_newest_walks_back_over_years() -> None:
    every_minute = Cron.parse("* * * * *", "America/New_York")
    after, until = utc("2020-01-01T00:00"), utc("2026-06-01T12:00:30")
    assert every_minute.newest(after, until, 3) == [
        utc("2026-06-01T11:58"),
        utc("2026-06-01T11:59"),
        utc("2026-06-01T12:00"),
    ]
    assert every_minute.slots(after, until, 2) == [
        utc("2020-01-01T00:01"),
        utc("2020-01-01T00:02"),
    ]


def test_newest_with_fewer_slots_than_count() -> None:
    yearly = Cron.parse("0 0 1 1 *")
    assert yearly.newest(utc("2024-06-01T00:00"), utc("2026-06-01T00:00"), 10) == [
        utc("2025-01-01T00:00"),
        utc("2026-01-01T00:00"),
    ]
    assert yearly.newest(utc("2025-01-01T00:00"), utc("2026-01-01T00:00"), 10) == [
        utc("2026-01-01T00:00")
    ]


def test_slots_limit_and_empty_ranges() -> None:
    cron = Cron.parse("*/15 * * * *")
    after, until = utc("2026-05-04T10:00"), utc("2026-05-04T12:00")
    assert cron.slots(after, until, 3) == [
        utc("2026-05-04T10:15"),
        utc("2026-05-04T10:30"),
        utc("2026-05-04T10:45"),
    ]
    assert len(cron.slots(after, until, 1000)) == 8
    assert cron.slots(after, until, 0) == []
    assert cron.newest(after, until, 0) == []
    assert cron.slots(until, after, 10) == []
    assert cron.newest(until, after, 10) == []
    assert cron.slots(after, after, 10) == []


def test_naive_and_bad_arguments_are_refused() -> None:
    cron = Cron.parse("0 * * * *")
    naive = datetime(2026, 5, 4, 10, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        cron.next_after(naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        cron.slots(naive, utc("2026-05-05T00:00"), 1)
    with pytest.raises(ValueError, match="timezone-aware"):
        cron.newest(utc("2026-05-05T00:00"), naive, 1)
    with pytest.raises(ValueError, match="non-negative"):
        cron.slots(utc("2026-05-04T00:00"), utc("2026-05-05T00:00"), -1)


def test_parse_keeps_expression_and_zone() -> None:
    cron = Cron.parse("  0  6 * * *  ", "America/New_York")
    assert (cron.expression, cron.time_zone, cron.hourly) == (
        "0  6 * * *",
        "America/New_York",
        False,
    )
    assert Cron.parse("0 6 * * *").time_zone == "UTC"
    assert Cron.parse("0 6 * * *") == Cron.parse("0 6 * * *")


@pytest.mark.parametrize(
    ("expression", "zone", "field", "issue"),
    [
        ("0 * * *", "UTC", "cron", "must have 5 fields"),
        ("0 * * * * *", "UTC", "cron", "must have 5 fields"),
        ("0 0 * * * 2026", "UTC", "cron", "must have 5 fields"),
        ("* * * * * *", "UTC", "cron", "must have 5 fields"),
        ("@daily", "UTC", "cron", "@daily"),
        ("", "UTC", "cron", "must not be empty"),
        ("   ", "UTC", "cron", "must not be empty"),
        ("61 * * * *", "UTC", "cron", "minute field"),
        ("0 24 * * *", "UTC", "cron", "hour field"),
        ("0 0 0 * *", "UTC", "cron", "day of month field"),
        ("0 0 * 13 *", "UTC", "cron", "month field"),
        ("0 0 * * 8", "UTC", "cron", "day of week field"),
        ("*/0 * * * *", "UTC", "cron", "minute field"),
        ("0 0 * * 5L", "UTC", "cron", "day of week field"),
        ("x * * * *", "UTC", "cron", "minute field"),
        ("H * * * *", "UTC", "cron", "H and R"),
        ("R * * * *", "UTC", "cron", "H and R"),
        ("5-5 * * * *", "UTC", "cron", "ambiguous"),
        ("0 9 * * mon-mon", "UTC", "cron", "ambiguous"),
        ("0 0 * * 7-0", "UTC", "cron", "ambiguous"),
        ("0 0 1 * 1#2", "UTC", "cron", "cannot combine"),
        ("0 0 15W * 1", "UTC", "cron", "cannot combine"),
        ("0 0 30 2 *", "UTC", "cron", "matches no date"),
        ("0 0 31 4,6,9,11 *", "UTC", "cron", "matches no date"),
        ("0 * * * *\n", "UTC", "cron", "printable"),
        ("0\t* * * *", "UTC", "cron", "printable"),
        ("0 * * * *\x00", "UTC", "cron", "printable"),
        ("0 *\u200b * * *", "UTC", "cron", "printable"),
        ("0\u00a0* * * *", "UTC", "cron", "printable"),
        ("0 " * 150, "UTC", "cron", "at most 256"),
        ("0 * * * *", "Mars/Phobos", "time_zone", "IANA"),
        ("0 * * * *", "../etc/passwd", "time_zone", "IANA"),
        ("0 * * * *", "/etc/localtime", "time_zone", "IANA"),
        ("0 * * * *", "localtime", "time_zone", "IANA"),
        ("0 * * * *", "utc", "time_zone", "IANA"),
        ("0 * * * *", "Europe/Berlin\n", "time_zone", "IANA"),
        ("0 * * * *", "", "time_zone", "must not be empty"),
        ("0 * * * *", "Europe/" + "x" * 100, "time_zone", "at most 64"),
    ],
)
def test_bad_input_is_refused(expression: str, zone: str, field: str, issue: str) -> None:
    with pytest.raises(CronError) as caught:
        Cron.parse(expression, zone)
    assert caught.value.field == field
    assert issue in caught.value.issue
    assert str(caught.value) == f"{field} {caught.value.issue}"


def test_one_cron_shared_by_threads() -> None:
    cron = Cron.parse("*/7 * * * *", "Europe/Berlin")
    moments = [utc("2026-10-24T20:00") + n * timedelta(minutes=11) for n in range(300)]
    expected = [cron.next_after(moment) for moment in moments]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(cron.next_after, moments)) == expected


def test_croniter_syntax_that_is_kept() -> None:
    after = utc("2026-01-01T00:00")
    assert Cron.parse("0 0 L * *").next_after(after) == utc("2026-01-31T00:00")
    assert Cron.parse("0 0 * * L5").next_after(after) == utc("2026-01-30T00:00")
    assert Cron.parse("0 0 * * 1#2").next_after(after) == utc("2026-01-12T00:00")
    assert Cron.parse("0 0 ? * 1").next_after(after) == utc("2026-01-05T00:00")
    assert Cron.parse("0 0 17W * *").next_after(after) == utc("2026-01-16T00:00")
    assert Cron.parse("0 0 * * 0-7").next_after(after) == utc("2026-01-02T00:00")
    assert Cron.parse("0 22-1 * * *").slots(after, utc("2026-01-01T23:00"), 5) == [
        utc("2026-01-01T01:00"),
        utc("2026-01-01T22:00"),
        utc("2026-01-01T23:00"),
    ]


# Brute force: every whole minute of a window decides on its own whether it is a slot,
# from the zone's offsets and croniter run on naive wall times, without domain.cron.

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",  # 30-minute DST
    "Asia/Kolkata",  # +05:30, no DST
    "America/Sao_Paulo",  # DST at midnight until 2019
    "Pacific/Apia",  # skipped 2011-12-30 entirely
    "Pacific/Chatham",  # +12:45 / +13:45
]
EXPRESSIONS = [
    "* * * * *",
    "*/7 * * * *",
    "0 * * * *",
    "30 * * * *",
    "15,45 * * * 1-5",
    "0 0 * * *",
    "0 2 * * *",
    "30 2 * * *",
    "*/30 2 * * *",
    "0,30 2-3 * * *",
    "15 1 * * *",
    "45 1-2 * * *",
    "* 2 * * *",
    "0 0-22 * * *",
    "0 */2 * * *",
    "0 12 * * *",
    "59 23 * * *",
    "0 0 1 * *",
    "0 0 L * *",
    "0 3 * * 0",
    "0 0 29 2 *",
    "10 1,2,3 1-7 * 0",
]
DENSE = ("* * * * *", "*/7 * * * *", "* 2 * * *")
LEAD = timedelta(hours=6)  # longer than any repeated wall range of these zones


def offset(zone: ZoneInfo, moment: datetime) -> timedelta:
    value = moment.astimezone(zone).utcoffset()
    assert value is not None
    return value


@functools.cache
def transitions(zone_name: str) -> list[datetime]:
    """The instants (2008-2030) at which the zone's offset changes, to the minute."""
    zone, found = ZoneInfo(zone_name), []
    moment = utc("2008-01-01T00:00")
    while moment.year <= 2030:
        low, high = moment, moment + timedelta(hours=12)
        if offset(zone, low) != offset(zone, high):
            while high - low > MINUTE:
                middle = low + (high - low) // 2 // MINUTE * MINUTE
                low, high = (
                    (middle, high) if offset(zone, middle) == offset(zone, low) else (low, middle)
                )
            found.append(high)
        moment += timedelta(hours=12)
    return found


@functools.cache
def minute_walls(zone_name: str, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """(instant, naive wall time) for each whole minute from start - LEAD to end."""
    zone, out = ZoneInfo(zone_name), []
    moment = (start - LEAD).replace(second=0, microsecond=0)
    while moment <= end:
        out.append((moment, (moment + offset(zone, moment)).replace(tzinfo=None)))
        moment += MINUTE
    return out


def wall_matches(expression: str, first: datetime, last: datetime) -> set[datetime]:
    walls = croniter(expression, first - MINUTE, ret_type=datetime)
    found: set[datetime] = set()
    while (match := walls.get_next()) <= last:
        found.add(match)
    return found


def brute_force(
    expression: str, zone_name: str, start: datetime, end: datetime
) -> tuple[list[datetime], set[datetime]]:
    """The slots in (start, end] by the rules, and the matching wall times."""
    hourly = Cron.parse(expression, zone_name).hourly
    walls = minute_walls(zone_name, start, end)
    matches = wall_matches(expression, min(w for _, w in walls), max(w for _, w in walls))
    slots, highest_wall, previous_wall = [], datetime.min, walls[0][1] - MINUTE
    for moment, wall in walls:
        is_slot = wall in matches and (hourly or wall > highest_wall)
        if not hourly and wall - previous_wall > MINUTE:  # spring-forward: a gap
            gap = (previous_wall + MINUTE * n for n in range(1, (wall - previous_wall) // MINUTE))
            is_slot = is_slot or any(w in matches for w in gap)
        if is_slot and start < moment <= end:
            slots.append(moment)
        highest_wall, previous_wall = max(highest_wall, wall), wall
    return slots, matches


def windows(zone_name: str, dense: bool) -> list[tuple[datetime, datetime]]:
    """Windows around three offset changes, Apia's missing day and a random moment."""
    rng = random.Random(f"{zone_name}-{dense}")
    anchors = rng.sample(transitions(zone_name), k=min(3, len(transitions(zone_name))))
    anchors.append(utc("2011-12-30T10:00"))
    anchors.append(utc("2008-01-01T00:00") + timedelta(minutes=rng.randrange(22 * 525_600)))
    half = timedelta(hours=3 if dense else 18)
    out = []
    for anchor in anchors:
        start = anchor - half + timedelta(minutes=rng.randrange(-120, 120), seconds=30)
        out.append((start, start + 2 * half))
    return out


@pytest.mark.parametrize("zone_name", ZONES)
def test_rules_against_brute_force(zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    for expression in EXPRESSIONS:
        cron = Cron.parse(expression, zone_name)
        for start, end in windows(zone_name, expression in DENSE):
            expected, matches = brute_force(expression, zone_name, start, end)
            found = cron.slots(start, end, 10_000)
            assert found == expected, (expression, zone_name, start)
            assert found == sorted(set(found))
            assert all(s.tzinfo is UTC and s.second == s.microsecond == 0 for s in found)
            stepped: list[datetime] = []
            step = cron.next_after(start)
            while step is not None and step <= end:
                stepped.append(step)
                step = cron.next_after(step)
            assert stepped == found
            for count in (1, 3, len(found) + 5):
                assert cron.newest(start, end, count) == found[-count:]
            for slot in found:  # a wall time that matches, or the end of a gap
                wall = slot.astimezone(zone).replace(tzinfo=None)
                springs_forward = offset(zone, slot) > offset(zone, slot - MINUTE)
                assert wall in matches or (springs_forward and not cron.hourly), slot
