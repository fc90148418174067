"""Birthday arithmetic: pure functions, no I/O, no clock."""

from __future__ import annotations

import calendar
from datetime import date


def birthday_in_year(date_of_birth: date, year: int) -> date:
    """The day the birthday is celebrated in ``year``.

    Someone born on 29 February celebrates on 28 February in common years.
    """
    if date_of_birth.month == 2 and date_of_birth.day == 29 and not calendar.isleap(year):
        return date(year, 2, 28)
    return date(year, date_of_birth.month, date_of_birth.day)


def days_until_birthday(date_of_birth: date, today: date) -> int:
    """Whole days from ``today`` to the next birthday; 0 when it is today."""
    # Month and day decide whether this year's birthday is behind us: one
    # date built, not two (the 29 February case is birthday_in_year's).
    passed = (date_of_birth.month, date_of_birth.day) < (today.month, today.day)
    year = today.year + 1 if passed else today.year
    return (birthday_in_year(date_of_birth, year) - today).days


def greeting(username: str, date_of_birth: date, today: date) -> str:
    days = days_until_birthday(date_of_birth, today)
    if days == 0:
        return f"Hello, {username}! Happy birthday!"
    return f"Hello, {username}! Your birthday is in {days} day(s)"
