"""Every row of the HTTP contract (docs/api.md), on PostgreSQL and on SQLite."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

PUT_HEADERS = {"Content-Type": "application/json"}


def put(client, username: str, date_of_birth, *, tz: str | None = None, headers=None):
    params = {"tz": tz} if tz is not None else None
    return client.put(
        f"/hello/{username}",
        content=json.dumps({"dateOfBirth": date_of_birth}),
        headers=headers or PUT_HEADERS,
        params=params,
    )


def assert_problem(response, status: int, type_suffix: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    assert body["detail"]
    if type_suffix:
        assert body["type"].endswith(type_suffix)
    for leak in ("Traceback", "sqlalchemy", "psycopg", "/app/", ".py", "SELECT", "INSERT"):
        assert leak not in response.text
    return body


# --- PUT / GET / DELETE -------------------------------------------------------------------

def test_put_saves_and_get_greets_with_days_left(client):
    response = put(client, "alice", "1990-06-20")
    assert response.status_code == 204
    assert response.content == b""
    greeting = client.get("/hello/alice")
    assert greeting.status_code == 200
    assert greeting.headers["content-type"] == "application/json"
    assert greeting.json() == {"message": "Hello, alice! Your birthday is in 5 day(s)"}


def test_one_day_left_still_says_day_s(client):
    put(client, "bob", "2000-06-16")
    assert client.get("/hello/bob").json()["message"] == "Hello, bob! Your birthday is in 1 day(s)"


def test_birthday_today_is_happy_birthday(client):
    put(client, "carol", "1985-06-15")
    assert client.get("/hello/carol").json() == {"message": "Hello, carol! Happy birthday!"}


def test_birthday_passed_this_year_counts_to_next_year(client):
    put(client, "dave", "1985-06-14")
    assert client.get("/hello/dave").json()["message"].endswith("in 364 day(s)")


def test_put_again_replaces_the_date(client):
    put(client, "erin", "1990-06-20")
    assert put(client, "erin", "1990-06-25").status_code == 204
    assert client.get("/hello/erin").json()["message"].endswith("in 10 day(s)")


def test_delete_erases_the_user(client):
    put(client, "frank", "1990-01-01")
    response = client.delete("/hello/frank")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(client.get("/hello/frank"), 404, "user-not-found")
    assert_problem(client.delete("/hello/frank"), 404, "user-not-found")


def test_unknown_user_is_404(client):
    assert_problem(client.get("/hello/nobody"), 404, "user-not-found")
    assert_problem(client.delete("/hello/nobody"), 404, "user-not-found")


def test_case_is_kept_and_significant(client):
    put(client, "Alice", "1990-06-20")
    put(client, "alice", "1990-06-25")
    assert client.get("/hello/Alice").json()["message"] == (
        "Hello, Alice! Your birthday is in 5 day(s)"
    )
    assert client.get("/hello/alice").json()["message"].endswith("in 10 day(s)")
    assert_problem(client.get("/hello/ALICE"), 404)


def test_unicode_letters_are_usernames(client):
    assert put(client, "Zoë", "1990-06-20").status_code == 204
    assert put(client, "%E5%A4%AA%E9%83%8E", "1990-06-20").status_code == 204  # 太郎
    assert client.get("/hello/Zo%C3%AB").json()["message"].startswith("Hello, Zoë!")
    assert client.get("/hello/太郎").json()["message"].startswith("Hello, 太郎!")


def test_username_is_nfc_normalised_before_storing_and_comparing(client):
    decomposed = "Zoe\u0308"  # e + combining diaeresis
    assert put(client, decomposed, "1990-06-20").status_code == 204
    greeting = client.get("/hello/Zo\u00eb").json()["message"]
    assert greeting == "Hello, Zo\u00eb! Your birthday is in 5 day(s)"  # echoes the NFC form
    assert client.delete("/hello/Zoe\u0308").status_code == 204


def test_sixty_four_letters_is_the_longest_username(client):
    assert put(client, "a" * 64, "1990-06-20").status_code == 204
    assert_problem(put(client, "a" * 65, "1990-06-20"), 400, "invalid-username")
    assert_problem(client.get("/hello/" + "a" * 65), 400)


@pytest.mark.parametrize(
    "username",
    ["", "al1ce", "al ice", "al-ice", "al_ice", "al%2Fice", "al.ice", "%F0%9F%8E%82", "%FF%FE",
     "a%00b", "a%0Ab", "a%0D%0Ab", "al/ice"],
)
def test_username_with_a_non_letter_is_400(client, username):
    assert_problem(put(client, username, "1990-06-20"), 400, "invalid-username")
    assert_problem(client.get(f"/hello/{username}"), 400, "invalid-username")
    assert_problem(client.delete(f"/hello/{username}"), 400, "invalid-username")


# --- the tz parameter ---------------------------------------------------------------------

def test_tz_moves_today_for_get(client, clock):
    # 2026-06-15 20:00 UTC is already 16 June in Tokyo.
    clock.set(datetime(2026, 6, 15, 20, 0, tzinfo=timezone.utc))
    put(client, "hana", "1990-06-16")
    assert client.get("/hello/hana").json()["message"].endswith("in 1 day(s)")
    assert client.get("/hello/hana", params={"tz": "Asia/Tokyo"}).json() == {
        "message": "Hello, hana! Happy birthday!"
    }
    assert client.get("/hello/hana", params={"tz": "America/Los_Angeles"}).json()[
        "message"
    ].endswith("in 1 day(s)")


def test_tz_moves_today_for_put(client, clock):
    # 16 June is still in the future in UTC, but already today in Tokyo: not *before* today.
    clock.set(datetime(2026, 6, 15, 20, 0, tzinfo=timezone.utc))
    assert put(client, "kenji", "2026-06-15", tz="Asia/Tokyo").status_code == 204
    assert_problem(put(client, "kenji", "2026-06-16", tz="Asia/Tokyo"), 422)
    assert_problem(put(client, "kenji", "2026-06-15"), 422)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "utc+1", "../../etc/passwd", "Europe/"])
def test_unknown_tz_is_400(client, tz):
    put(client, "ivan", "1990-01-01")
    assert_problem(client.get("/hello/ivan", params={"tz": tz}), 400, "unknown-time-zone")
    assert_problem(put(client, "ivan", "1990-01-01", tz=tz), 400, "unknown-time-zone")


# --- bodies -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "body", [b"", b"{", b"not json", b"\xff\xfe", b'{"dateOfBirth": NaN}', b"[]",
             b'"1990-01-01"', b"null", b"42"],
)
def test_body_that_is_not_a_json_object_is_400(client, body):
    response = client.put("/hello/judy", content=body, headers=PUT_HEADERS)
    assert_problem(response, 400, "invalid-json")
    assert_problem(client.get("/hello/judy"), 404)  # nothing was saved


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                     "application/jsonx", "multipart/form-data"],
)
def test_put_without_json_content_type_is_415(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.put("/hello/kim", content=b'{"dateOfBirth": "1990-01-01"}', headers=headers)
    assert_problem(response, 415, "unsupported-media-type")


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/json;"],
)
def test_json_content_type_with_parameters_is_accepted(client, content_type):
    response = put(client, "leo", "1990-01-01", headers={"Content-Type": content_type})
    assert response.status_code == 204


def test_body_over_one_kib_is_413_and_saves_nothing(client):
    body = json.dumps({"dateOfBirth": "1990-01-01", "pad": "x" * 1100}).encode()
    assert_problem(client.put("/hello/mia", content=body, headers=PUT_HEADERS), 413)
    assert_problem(client.get("/hello/mia"), 404)


def test_body_of_exactly_one_kib_is_accepted(client):
    prefix = b'{"dateOfBirth": "1990-01-01", "pad": "'
    body = prefix + b"x" * (1024 - len(prefix) - 2) + b'"}'
    assert len(body) == 1024
    assert client.put("/hello/mia", content=body, headers=PUT_HEADERS).status_code == 204


def test_streamed_body_over_one_kib_without_length_is_413(client):
    def chunks():
        yield b'{"dateOfBirth": "1990-01-01", "pad": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    response = client.put("/hello/nia", content=chunks(), headers=PUT_HEADERS)
    assert_problem(response, 413)


@pytest.mark.parametrize(
    "document",
    [{}, {"dob": "1990-01-01"}, {"dateOfBirth": None}, {"dateOfBirth": 19900101},
     {"dateOfBirth": ["1990-01-01"]}, {"dateOfBirth": "1990-1-1"}, {"dateOfBirth": "90-01-01"},
     {"dateOfBirth": "1990/01/01"}, {"dateOfBirth": "1990-01-01T00:00:00"},
     {"dateOfBirth": " 1990-01-01"}, {"dateOfBirth": "1990-01-01\n"},
     {"dateOfBirth": "١٩٩٠-٠١-٠١"}, {"dateOfBirth": "19900101"},
     {"dateOfBirth": "1990-02-30"}, {"dateOfBirth": "1990-13-01"}, {"dateOfBirth": "2023-02-29"},
     {"dateOfBirth": "0000-01-01"}, {"dateOfBirth": "2026-06-15"}, {"dateOfBirth": "2026-06-16"},
     {"dateOfBirth": "9999-12-31"}],
)
def test_bad_date_of_birth_is_422_and_loses_nothing(client, document):
    put(client, "olga", "1990-06-20")
    response = client.put("/hello/olga", content=json.dumps(document), headers=PUT_HEADERS)
    assert_problem(response, 422, "invalid-date-of-birth")
    assert client.get("/hello/olga").json()["message"].endswith("in 5 day(s)")


def test_yesterday_is_a_valid_date_of_birth(client):
    assert put(client, "paul", "2026-06-14").status_code == 204


def test_leap_day_birth_is_accepted(client):
    assert put(client, "quinn", "2000-02-29").status_code == 204


def test_unknown_members_are_ignored(client):
    body = {"dateOfBirth": "1990-06-20", "nickname": "r"}
    response = client.put("/hello/rita", content=json.dumps(body), headers=PUT_HEADERS)
    assert response.status_code == 204


# --- routing ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("POST", "/hello/sam", "DELETE, GET, HEAD, PUT"),
     ("PATCH", "/hello/sam", "DELETE, GET, HEAD, PUT"),
     ("POST", "/healthz", "GET, HEAD"),
     ("DELETE", "/readyz", "GET, HEAD"),
     ("PUT", "/openapi.json", "GET, HEAD")],
)
def test_method_not_allowed_is_405_with_allow(client, method, path, allow):
    response = client.request(method, path)
    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == allow


@pytest.mark.parametrize("path", ["/", "/hello", "/hellos/sam", "/users/sam", "/healthz/x"])
def test_unknown_path_is_404(client, path):
    assert_problem(client.get(path), 404, "not-found")


# --- operational endpoints ----------------------------------------------------------------

def test_healthz_is_200(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_when_the_schema_is_at_head(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_openapi_document_is_served(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json()["openapi"].startswith("3.1")


def test_an_unexpected_failure_is_a_problem_500_without_internals(sqlite_url):
    from starlette.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    def broken_clock():
        raise RuntimeError("clock exploded at /srv/app/secret.py")

    with TestClient(create_app(make_settings(sqlite_url), clock=broken_clock),
                    raise_server_exceptions=False) as client:
        response = client.get("/hello/anyone")
    body = assert_problem(response, 500, "internal-error")
    assert "exploded" not in response.text and "RuntimeError" not in response.text
    assert body["detail"]


@pytest.mark.parametrize("name", ["नमस्ते", "தமிழ்", "مُحَمَّد"])
def test_names_with_vowel_signs_viramas_and_harakat_are_stored_and_greeted(client, name):
    from urllib.parse import quote

    path = "/hello/" + quote(name)
    assert client.put(path, json={"dateOfBirth": "1990-06-16"}).status_code == 204
    assert client.get(path).json() == {"message": f"Hello, {name}! Your birthday is in 1 day(s)"}
    assert client.delete(path).status_code == 204


@pytest.mark.parametrize("name", ["\u3164", "\u1160", "a\u200bb", "\u0301a"])
def test_invisible_names_and_names_that_start_with_a_mark_are_400(client, name):
    from urllib.parse import quote

    response = client.put("/hello/" + quote(name), json={"dateOfBirth": "1990-06-16"})
    assert_problem(response, 400, "invalid-username")
