"""Input rules that the HTTP tests do not reach cheaply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.errors import Problem
from app.validation import parse_timezone, parse_username


@given(st.text(alphabet=st.characters(categories=["Lu", "Ll", "Lt", "Lm", "Lo"]), min_size=1,
               max_size=20))
def test_any_letters_are_a_username(name):
    import unicodedata

    normalised = unicodedata.normalize("NFC", name)
    if normalised.isalpha() and len(normalised) <= 64:
        assert parse_username(name) == normalised


@given(st.text(min_size=1, max_size=80))
def test_parse_username_accepts_only_letters_up_to_64(name):
    import unicodedata

    normalised = unicodedata.normalize("NFC", name)
    try:
        parsed = parse_username(name)
    except Problem as problem:
        assert problem.status == 400
        assert not (normalised.isalpha() and len(normalised) <= 64)
    else:
        assert parsed == normalised and parsed.isalpha() and 1 <= len(parsed) <= 64


def test_a_huge_username_is_refused_before_normalising(monkeypatch):
    import unicodedata

    from app import validation

    normalised = []
    real = unicodedata.normalize
    monkeypatch.setattr(validation.unicodedata, "normalize",
                        lambda form, text: normalised.append(len(text)) or real(form, text))
    with pytest.raises(Problem):
        parse_username("a" * 100_000)
    assert normalised == []  # the work is bounded before NFC runs


def test_the_bound_before_normalising_allows_the_most_a_name_can_shrink():
    """NFC composes at most 4:1: 64 letters typed fully decomposed are 256
    code points and still a valid name; one more code point cannot be."""
    import unicodedata

    letter = "\u1faf"  # 4 code points decomposed, the most there is
    typed = unicodedata.normalize("NFD", letter * 64)
    assert len(typed) == 256
    assert parse_username(typed) == letter * 64
    with pytest.raises(Problem):
        parse_username(typed + "\u0345")  # 257: over the bound (and 65 letters' worth)


def test_utc_is_the_default_zone_and_names_are_iana():
    assert parse_timezone([]).utcoffset(None).total_seconds() == 0
    assert str(parse_timezone(["Asia/Tokyo"])) == "Asia/Tokyo"
    with pytest.raises(Problem):
        parse_timezone(["localtime"])
