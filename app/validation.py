"""Turning what a client sent into domain values, or a Problem that says why not."""

from __future__ import annotations

import json
import re
import unicodedata
import zoneinfo
from datetime import date, datetime, timezone, tzinfo
from functools import lru_cache

import regex

from app.domain import USERNAME_MAX_LENGTH
from app.errors import Problem
from app.limits import MAX_BODY_BYTES

# NFC composes at most 4 code points into 1: the longest canonical
# decomposition (U+1F82, U+1FAF, ...) is 4 long. A raw name longer than this
# cannot normalise to USERNAME_MAX_LENGTH letters, so it is refused before
# paying for normalisation (a path can be 65 kB).
MAX_RAW_USERNAME_LENGTH = USERNAME_MAX_LENGTH * 4
_DATE_FORM = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


# Code points that render as nothing (soft hyphen, zero-width characters,
# variation selectors, the Hangul fillers): a name of them looks empty.
# Unicode's Default_Ignorable_Code_Point, from the `regex` module: the standard
# library's unicodedata has no such property.
_INVISIBLE = regex.compile(r"\p{Default_Ignorable_Code_Point}")


def _written_as_a_name(name: str) -> bool:
    """A letter (Unicode category L), then letters and combining marks (M: the
    vowel signs and viramas of Devanagari and Tamil, Arabic harakat). Read
    from the same Unicode database as the NFC normalisation, so a code point
    that database does not know (category Cn) is no letter."""
    category = unicodedata.category
    return category(name[0])[0] == "L" and all(category(c)[0] in "LM" for c in name[1:])


def parse_username(raw: str) -> str:
    """NFC-normalise and check a username taken from the percent-decoded path."""
    if len(raw) > MAX_RAW_USERNAME_LENGTH:
        raise _username_problem(f"is longer than {USERNAME_MAX_LENGTH} characters")
    name = unicodedata.normalize("NFC", raw)
    if not name:
        raise _username_problem("is empty")
    if len(name) > USERNAME_MAX_LENGTH:
        raise _username_problem(f"is longer than {USERNAME_MAX_LENGTH} characters")
    if not _written_as_a_name(name):
        raise _username_problem(
            "must start with a letter and hold only letters and combining marks")
    if _INVISIBLE.search(name):
        raise _username_problem("contains a character that renders as nothing")
    return name


def _username_problem(reason: str) -> Problem:
    return Problem(
        "invalid-username",
        f"The username {reason}; use 1 to {USERNAME_MAX_LENGTH} letters as names are written "
        "in any script (no digits, spaces, punctuation or invisible characters).",
    )


# Names that depend on the machine rather than naming an IANA zone.
_NOT_IANA = frozenset({"localtime", "posixrules"})


@lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - _NOT_IANA


@lru_cache(maxsize=512)
def _zone(name: str) -> tzinfo:
    return zoneinfo.ZoneInfo(name)


def parse_timezone(values: list[str]) -> tzinfo:
    """The zone that defines *today*: UTC unless ``?tz=`` names an IANA zone."""
    if not values:
        return timezone.utc
    if len(values) > 1:
        raise Problem("repeated-time-zone",
                      "The tz parameter is given more than once; give it once.")
    raw = values[0]
    if raw not in _known_zones():
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        raise Problem(
            "unknown-time-zone",
            f"The tz parameter {shown!r} is not an IANA time zone name such as "
            "'Europe/Paris' or 'UTC'.",
        )
    return _zone(raw)


def today_in(zone: tzinfo, now: datetime) -> date:
    return now.astimezone(zone).date()


def check_content_type(value: str | None) -> None:
    media_type = (value or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Problem(
            "unsupported-media-type",
            "Send the body as JSON with the header 'Content-Type: application/json'.",
        )


def body_too_large() -> Problem:
    return Problem(
        "body-too-large",
        f"The request body is larger than {MAX_BODY_BYTES} bytes; send only "
        '{"dateOfBirth": "YYYY-MM-DD"}.',
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


class _DuplicateMember(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document = dict(pairs)
    if len(document) != len(pairs):
        # Otherwise the last one wins, and a check could read another value
        # than the one stored.
        raise _DuplicateMember
    return document


# Built once: json.loads with these hooks builds a decoder for every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_members)


def parse_date_of_birth(body: bytes, today: date) -> date:
    """The ``dateOfBirth`` of a PUT body: a real date, strictly before ``today``."""
    try:
        # Decoded here, strictly: json.loads(bytes) would guess UTF-16 or -32.
        document = _DECODER.decode(body.decode("utf-8"))
    except _DuplicateMember:
        raise Problem(
            "invalid-json",
            "The request body names the same member twice; send each member once.",
        ) from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise Problem(
            "invalid-json",
            'The request body is not valid UTF-8 JSON; send {"dateOfBirth": "YYYY-MM-DD"}.',
        ) from None
    if not isinstance(document, dict):
        raise Problem(
            "invalid-json",
            'The request body must be a JSON object such as {"dateOfBirth": "YYYY-MM-DD"}.',
        )
    if "dateOfBirth" not in document:
        raise _unprocessable('The body has no "dateOfBirth" member.')
    value = document["dateOfBirth"]
    if not isinstance(value, str):
        raise _unprocessable('"dateOfBirth" must be a string in YYYY-MM-DD form.')
    if not _DATE_FORM.fullmatch(value):
        raise _unprocessable('"dateOfBirth" must be in YYYY-MM-DD form, e.g. "1990-04-23".')
    try:
        parsed = date.fromisoformat(value)
    except ValueError:
        raise _unprocessable(f'"dateOfBirth" {value!r} is not a real calendar date.') from None
    if parsed >= today:
        raise _unprocessable(
            f'"dateOfBirth" must be before today ({today.isoformat()}); got {value!r}.'
        )
    return parsed


def _unprocessable(detail: str) -> Problem:
    return Problem("invalid-date-of-birth", detail)


def is_whole_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() alone also takes '²' and '٣', which int() may refuse."""
    return text.isascii() and text.isdigit()
