"""Input rules that the HTTP tests do not reach cheaply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.errors import Problem
from app.validation import parse_timezone, parse_username


def _is_name(text: str) -> bool:
    """The contract's rule, with the standard library's categories as the oracle
    (Default_Ignorable_Code_Point, which it lacks, from the regex module)."""
    import unicodedata

    import regex

    categories = [unicodedata.category(c)[0] for c in text]
    return (1 <= len(text) <= 64 and categories[0] == "L" and set(categories) <= {"L", "M"}
            and not regex.search(r"\p{Default_Ignorable_Code_Point}", text))


# Characters this Python's Unicode database knows (the regex module may know newer ones).
ASSIGNED = st.characters(exclude_categories=["Cn", "Cs"])


@given(st.text(alphabet=st.characters(categories=["Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc",
                                                  "Me"]), min_size=1, max_size=20))
def test_letters_and_combining_marks_after_a_letter_are_a_username(name):
    import unicodedata

    normalised = unicodedata.normalize("NFC", name)
    if _is_name(normalised):
        assert parse_username(name) == normalised
    else:
        with pytest.raises(Problem):
            parse_username(name)


@given(st.text(alphabet=ASSIGNED, min_size=1, max_size=80))
def test_parse_username_accepts_exactly_the_contracts_names(name):
    import unicodedata

    normalised = unicodedata.normalize("NFC", name)
    try:
        parsed = parse_username(name)
    except Problem as problem:
        assert problem.status_code == 400
        assert not _is_name(normalised)
    else:
        assert parsed == normalised and _is_name(parsed)


@pytest.mark.parametrize("name", ["नमस्ते", "தமிழ்", "مُحَمَّد", "Zoë", "太郎", "Ǆemal", "ÅSA"])
def test_names_in_any_script_with_their_vowel_signs_viramas_and_harakat(name):
    assert parse_username(name) == name


@pytest.mark.parametrize("invisible", [
    "\u00ad", "\u034f", "\u115f", "\u1160", "\u17b4", "\u180b", "\u200b", "\u200c",
    "\u200d", "\u200e", "\u2060", "\u3164", "\ufe00", "\ufe0f", "\ufeff", "\uffa0",
    "\U000e0001", "\U000e0100",
])
def test_a_default_ignorable_code_point_is_refused_anywhere(invisible):
    """Unicode's DerivedCoreProperties: each renders as nothing. Some are
    letters (the Hangul fillers), some marks (variation selectors), some format
    characters."""
    for name in (invisible, "a" + invisible, invisible + "a", "ab" + invisible + "c"):
        with pytest.raises(Problem):
            parse_username(name)


@pytest.mark.parametrize("name", ["\u0301a", "\u093eक", "a1", "a b", "a-b", "",
                                  # unassigned in this Python's Unicode database (the
                                  # regex module's newer one calls it a letter)
                                  "\U0001e5d0", "a\U0001e5d0"])
def test_a_name_that_starts_with_a_mark_or_holds_anything_else_is_refused(name):
    with pytest.raises(Problem):
        parse_username(name)


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
