"""Birthday arithmetic, against an independent day-by-day oracle."""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.birthday import days_until_birthday, greeting
from app.validation import today_in


def oracle_days(date_of_birth: date, today: date) -> int:
    """Walk forward one day at a time until a day that is the birthday."""
    day, steps = today, 0
    while True:
        if (day.month, day.day) == (date_of_birth.month, date_of_birth.day):
            return steps
        leap_day_birth = (date_of_birth.month, date_of_birth.day) == (2, 29)
        if leap_day_birth and (day.month, day.day) == (2, 28) and not calendar.isleap(day.year):
            return steps
        day += timedelta(days=1)
        steps += 1


dates = st.dates(min_value=date(1900, 1, 1), max_value=date(2400, 12, 31))


@given(date_of_birth=dates, today=dates)
def test_days_until_birthday_matches_the_oracle(date_of_birth, today):
    assert days_until_birthday(date_of_birth, today) == oracle_days(date_of_birth, today)


@given(date_of_birth=dates, today=dates)
def test_days_until_birthday_is_never_negative_nor_a_year_or_more(date_of_birth, today):
    assert 0 <= days_until_birthday(date_of_birth, today) <= 365


@pytest.mark.parametrize(
    ("date_of_birth", "today", "days"),
    [
        # around 31 December
        (date(1990, 1, 1), date(2026, 12, 31), 1),
        (date(1990, 12, 31), date(2026, 12, 31), 0),
        (date(1990, 12, 31), date(2027, 1, 1), 364),
        (date(1990, 12, 31), date(2027, 12, 30), 1),
        (date(1990, 12, 31), date(2028, 1, 1), 365),  # 2028 is leap: 366-day year ahead
        # 29 February births
        (date(2000, 2, 29), date(2027, 2, 27), 1),  # common year: 28 Feb
        (date(2000, 2, 29), date(2027, 2, 28), 0),
        (date(2000, 2, 29), date(2027, 3, 1), 365),  # next is 29 Feb 2028
        (date(2000, 2, 29), date(2028, 2, 28), 1),  # leap year: 29 Feb itself
        (date(2000, 2, 29), date(2028, 2, 29), 0),
        (date(2000, 2, 29), date(2028, 3, 1), 364),  # next is 28 Feb 2029
        (date(2000, 2, 29), date(2100, 2, 28), 0),  # 2100 is not leap
        (date(2000, 2, 29), date(2000, 3, 1), 364),  # next is 28 Feb 2001
        # 28 February and 1 March births
        (date(1999, 2, 28), date(2028, 2, 28), 0),
        (date(1999, 2, 28), date(2028, 2, 29), 365),
        (date(1999, 3, 1), date(2028, 2, 28), 2),
        (date(1999, 3, 1), date(2027, 2, 28), 1),
        (date(1999, 3, 1), date(2028, 3, 1), 0),
    ],
)
def test_days_until_birthday_at_frozen_dates(date_of_birth, today, days):
    assert days_until_birthday(date_of_birth, today) == days == oracle_days(date_of_birth, today)


@pytest.mark.parametrize(
    ("instant", "zone", "expected_today"),
    [
        (datetime(2026, 12, 31, 23, 30, tzinfo=timezone.utc), "UTC", date(2026, 12, 31)),
        (datetime(2026, 12, 31, 23, 30, tzinfo=timezone.utc), "Asia/Tokyo", date(2027, 1, 1)),
        (datetime(2027, 1, 1, 3, 0, tzinfo=timezone.utc), "America/New_York", date(2026, 12, 31)),
        (datetime(2028, 2, 28, 20, 0, tzinfo=timezone.utc), "Pacific/Kiritimati",
         date(2028, 2, 29)),
        (datetime(2028, 3, 1, 5, 0, tzinfo=timezone.utc), "Pacific/Pago_Pago", date(2028, 2, 29)),
        (datetime(2027, 2, 28, 23, 0, tzinfo=timezone.utc), "Europe/Berlin", date(2027, 3, 1)),
    ],
)
def test_today_follows_the_time_zone(instant, zone, expected_today):
    assert today_in(ZoneInfo(zone), instant) == expected_today


def test_leap_day_birthday_in_kiritimati_is_celebrated_before_utc():
    instant = datetime(2027, 2, 27, 11, 0, tzinfo=timezone.utc)  # 28 Feb 01:00 in UTC+14
    today = today_in(ZoneInfo("Pacific/Kiritimati"), instant)
    assert greeting("Leap", date(2000, 2, 29), today) == "Hello, Leap! Happy birthday!"
    assert greeting("Leap", date(2000, 2, 29), instant.date()) == (
        "Hello, Leap! Your birthday is in 1 day(s)"
    )


def test_greeting_texts():
    assert greeting("ann", date(1990, 5, 2), date(2026, 5, 1)) == (
        "Hello, ann! Your birthday is in 1 day(s)"
    )
    assert greeting("ann", date(1990, 5, 1), date(2026, 5, 1)) == "Hello, ann! Happy birthday!"
