"""Hostile and unusual input (docs/api.md, Rules and Errors): a clear 400
or 404, nothing stored, nothing unbounded echoed or logged. Both backends."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import settings as search_settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.testclient import TestClient

from app.logging import configure_logging
from app.main import create_app
from app.proxy import client_address
from app.routes import read_body
from tests.conftest import make_settings
from tests.test_api import PUT_HEADERS, assert_problem
from tests.test_logging import lines, log_stream  # noqa: F401  (fixture)

DOCUMENT = '{"dateOfBirth": "1990-03-03"}'


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be", "latin-1"])
def test_a_body_in_another_encoding_is_invalid_json(client, encoding):
    body = '{"dateOfBirth": "1990-03-03", "note": "Zoë"}'.encode(encoding)
    response = client.put("/hello/enc", content=body, headers=PUT_HEADERS)
    assert_problem(response, 400, "invalid-json")
    assert client.get("/hello/enc").status_code == 404


def test_a_utf8_body_with_non_ascii_is_accepted(client):
    body = '{"dateOfBirth": "1990-03-03", "note": "Zoë"}'.encode()
    assert client.put("/hello/enc", content=body, headers=PUT_HEADERS).status_code == 204


@pytest.mark.parametrize("body", [
    '{"dateOfBirth": "2999-01-01", "dateOfBirth": "1990-03-03"}',
    '{"dateOfBirth": "1990-03-03", "dateOfBirth": "1990-03-03"}',
    '{"dateOfBirth": "1990-03-03", "x": {"a": 1, "a": 2}}',
])
def test_a_member_named_twice_is_400_and_nothing_is_stored(client, body):
    response = client.put("/hello/dup", content=body.encode(), headers=PUT_HEADERS)
    detail = assert_problem(response, 400, "invalid-json")["detail"]
    assert "twice" in detail
    assert client.get("/hello/dup").status_code == 404


def test_tz_given_twice_is_400(client):
    client.put("/hello/zed", content=DOCUMENT.encode(), headers=PUT_HEADERS)
    response = client.get("/hello/zed?tz=UTC&tz=Asia/Tokyo")
    assert_problem(response, 400, "repeated-time-zone")
    put = client.put("/hello/zod?tz=UTC&tz=UTC", content=DOCUMENT.encode(), headers=PUT_HEADERS)
    assert_problem(put, 400, "repeated-time-zone")
    assert client.get("/hello/zod").status_code == 404


def test_a_greeting_is_not_stored_by_caches(client):
    client.put("/hello/priv", content=DOCUMENT.encode(), headers=PUT_HEADERS)
    assert client.get("/hello/priv").headers["cache-control"] == "no-store"


@pytest.mark.parametrize("path", ["/hello/alice/", "/hello/alice//", "/healthz/", "/readyz/",
                                  "/openapi.json/"])
def test_a_trailing_slash_is_404_on_every_path(client, path):
    client.put("/hello/alice", content=DOCUMENT.encode(), headers=PUT_HEADERS)
    for method in ("GET", "PUT", "DELETE"):
        if method != "GET" and not path.startswith("/hello/"):
            continue
        response = client.request(method, path, content=DOCUMENT.encode(),
                                  headers=PUT_HEADERS)
        assert_problem(response, 404, "not-found")
    assert client.get("/hello/alice").status_code == 200  # the DELETE above touched nothing


def test_an_empty_username_is_still_400(client):
    assert_problem(client.get("/hello/"), 400, "invalid-username")


def test_a_huge_username_is_neither_echoed_nor_logged_whole(
        sqlite_url, clock, log_stream):  # noqa: F811
    settings = make_settings(sqlite_url, log_format="json")
    configure_logging(settings, log_stream)
    name = "a" * 65_000
    with TestClient(create_app(settings, clock=clock)) as client:
        log_stream.truncate(0), log_stream.seek(0)
        response = client.get(f"/hello/{name}")
    body = assert_problem(response, 400, "invalid-username")
    assert "instance" not in body and len(response.content) < 1000
    # The service's own lines (the test client's HTTP library logs too).
    ours = [line for line in log_stream.getvalue().splitlines() if '"logger":"app' in line]
    access = [line for line in ours if "httpRequest" in line]
    assert len(access) == 1 and "(65007 characters)" in access[0]
    assert max(len(line) for line in ours) < 2000


def test_a_usual_path_is_echoed_as_instance(client):
    assert assert_problem(client.get("/hello/nobody"), 404)["instance"] == "/hello/nobody"


# --- the client address behind the platform's proxies -------------------------------------

@pytest.mark.parametrize("header, hops, expected", [
    (None, 2, "10.0.0.9"),                                  # not through the platform
    ("198.51.100.7, 203.0.113.1", 2, "198.51.100.7"),       # Google LB: client, LB
    ("6.6.6.6, 198.51.100.7, 203.0.113.1", 2, "198.51.100.7"),  # forged entry ignored
    ("6.6.6.6, 198.51.100.7", 0, "10.0.0.9"),               # trust nothing
    ("198.51.100.7", 2, "10.0.0.9"),                        # fewer entries than hops
    ("6.6.6.6, 198.51.100.7", 1, "198.51.100.7"),
    ("::1%\x85{\"severity\":\"CRITICAL\"}" + "A" * 60_000, 1, "10.0.0.9"),  # a scope id
    ("fe80::1%eth0", 1, "10.0.0.9"),
    ("not-an-address", 1, "10.0.0.9"),
])
def test_client_address_is_taken_from_the_right(header, hops, expected):
    assert client_address(header, "10.0.0.9", hops) == expected


def test_the_access_log_never_trusts_a_forged_left_most_entry(sqlite_url, clock, log_stream):  # noqa: F811,E501
    settings = make_settings(sqlite_url, log_format="json", forwarded_hops=2)
    configure_logging(settings, log_stream)
    with TestClient(create_app(settings, clock=clock)) as client:
        log_stream.truncate(0), log_stream.seek(0)
        client.get("/healthz", headers={"x-forwarded-for": "6.6.6.6, 198.51.100.7, 203.0.113.1"})
    access = [line for line in lines(log_stream) if "httpRequest" in line]
    assert access[0]["httpRequest"]["remoteIp"] == "198.51.100.7"


def test_bodies_are_still_json_objects(client):
    response = client.put("/hello/arr", content=json.dumps([1]).encode(), headers=PUT_HEADERS)
    assert_problem(response, 400, "invalid-json")


# --- the body deadline (app.routes.read_body) ----------------------------------------------

async def _stalled_receive():
    await asyncio.Event().wait()  # the client sent headers, then nothing


def _read_body(receive, timeout: float = 5, headers=()):
    """read_body on a request with these headers, as Starlette builds it."""
    scope = {"type": "http", "method": "PUT", "path": "/hello/alice", "query_string": b"",
             "headers": list(headers), "state": {"body_read_timeout": timeout}}
    return read_body(Request(scope, receive))


def _scripted_receive(*messages):
    """ASGI receive handing out ``messages`` in order, then stalling."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()

    return receive


def test_a_body_in_chunks_is_joined():

    receive = _scripted_receive(
        {"type": "http.request", "body": b'{"dateOfBirth":', "more_body": True},
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": b'"1990-04-23"}', "more_body": False},
    )
    body = asyncio.run(_read_body(receive))
    assert body == b'{"dateOfBirth":"1990-04-23"}'


def test_a_client_gone_mid_body_is_a_400_not_an_error():
    from app.errors import Problem

    receive = _scripted_receive(
        {"type": "http.request", "body": b'{"dateOf', "more_body": True},
        {"type": "http.disconnect"},
    )
    with pytest.raises(Problem) as raised:
        asyncio.run(_read_body(receive))
    assert (raised.value.status_code, raised.value.type) == (
        400, "urn:hello-birthday:problem:client-disconnected")


def test_an_undeclared_body_is_refused_at_the_chunk_that_passes_the_limit():
    """413 as soon as the limit is passed: the rest is never waited for."""
    from app.errors import Problem
    from app.limits import MAX_BODY_BYTES

    receive = _scripted_receive(
        {"type": "http.request", "body": b"x" * MAX_BODY_BYTES, "more_body": True},
        {"type": "http.request", "body": b"x", "more_body": True},
    )  # then it stalls: reading on would hang until the 60 s deadline
    with pytest.raises(Problem) as raised:
        asyncio.run(asyncio.wait_for(_read_body(receive, 60), 5))
    assert raised.value.status_code == 413


def test_a_stalled_body_is_a_408_once_the_deadline_passes():
    from app.errors import Problem

    async def read():
        with pytest.raises(Problem) as raised:
            await _read_body(_stalled_receive, 0.05)
        assert raised.value.status_code == 408
        assert asyncio.current_task().cancelling() == 0  # the timeout's cancel is spent

    async def scenario():
        await asyncio.wait_for(read(), 5)  # without the deadline: TimeoutError here

    asyncio.run(scenario())


@pytest.mark.parametrize("declared", [[b""], [b"12x"], [b"-1"], ["²".encode()], [b"28, 29"],
                                      [b"28", b"29"], [b"", b"28"]])
def test_a_content_length_that_is_not_one_whole_number_is_400(declared):
    """uvicorn's parser refuses most of these before the app; behind another
    server the endpoint does. Lines sent twice are one list (RFC 9110, 5.3)."""
    from app.errors import Problem

    headers = [(b"content-length", value) for value in declared]
    with pytest.raises(Problem) as raised:
        asyncio.run(_read_body(_stalled_receive, headers=headers))
    assert (raised.value.status_code, raised.value.type) == (
        400, "urn:hello-birthday:problem:invalid-content-length")


@pytest.mark.parametrize("declared", [[b"28 "], [b" 28"], [b"28", b"28"], [b"28, 28"]])
def test_a_content_length_is_read_as_rfc_9110_reads_it(declared):
    """Whitespace around the value is not part of it; one value repeated is that value."""
    body = b'{"dateOfBirth":"1990-04-23"}'
    receive = _scripted_receive({"type": "http.request", "body": body, "more_body": False})
    headers = [(b"content-length", value) for value in declared]
    assert asyncio.run(_read_body(receive, headers=headers)) == body


def test_a_cancel_from_outside_stays_a_cancel_while_reading_a_body():
    """Shutdown cancels a request's task: that must not turn into a 408 answer."""

    async def scenario():
        task = asyncio.create_task(_read_body(_stalled_receive, 60))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


# --- what a client controls, in-process (the server's own bounds: tests/test_hostile.py) --

def test_more_header_lines_than_the_bound_is_431_under_any_server(client):
    """The server refuses such a head before parsing it; behind another server
    the application does."""
    from app.limits import MAX_HEADER_LINES

    headers = [(f"x-{number}", "v") for number in range(MAX_HEADER_LINES + 1)]
    response = client.get("/healthz", headers=headers)
    assert_problem(response, 431, "headers-too-large")


def test_x_forwarded_for_on_several_lines_is_one_list(sqlite_url, clock, log_stream):  # noqa: F811,E501
    """RFC 9110, 5.3: the platform's entry is the last of all the lines, not of the first."""
    settings = make_settings(sqlite_url, log_format="json", forwarded_hops=1)
    configure_logging(settings, log_stream)
    with TestClient(create_app(settings, clock=clock)) as client:
        log_stream.truncate(0), log_stream.seek(0)
        client.get("/healthz", headers=[("x-forwarded-for", "6.6.6.6"),
                                        ("x-forwarded-for", "198.51.100.7")])
        client.get("/healthz", headers={"x-forwarded-for": "6.6.6.6, not-an-address"})
    first, second = [line["httpRequest"]["remoteIp"] for line in lines(log_stream)
                     if "httpRequest" in line]
    assert first == "198.51.100.7"
    assert second == "testclient"  # not an address: the TCP peer is logged


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_client_byte_starts_a_log_line(sqlite_url, clock, log_format):
    """A username with %0A used to write a forged line in LOG_FORMAT=text."""
    import io

    stream = io.StringIO()
    settings = make_settings(sqlite_url, log_format=log_format)
    configure_logging(settings, stream)
    forged = "fake 200 0.1ms\r\nERROR app: forged"
    with TestClient(create_app(settings, clock=clock)) as client:
        stream.truncate(0), stream.seek(0)
        client.get("/hello/a%C2%85%0A" + forged.replace("\r\n", "%0D%0A").replace(" ", "%20"),
                   headers={"user-agent": "ua\x0bx\x7fy"})
    written = [line for line in stream.getvalue().splitlines() if "app.access" in line]
    assert len(written) == 1
    assert not any(line.startswith(("fake", "ERROR app"))
                   for line in stream.getvalue().splitlines())
    message = json.loads(written[0])["message"] if log_format == "json" else written[0]
    assert "/hello/a\\u0085\\u000afake" in message
    if log_format == "json":
        agent = json.loads(written[0])["httpRequest"]["userAgent"]
        assert agent == "ua\\u000bx\\u007fy"


def test_a_long_user_agent_is_cut_in_the_log(sqlite_url, clock, log_stream):  # noqa: F811
    from app.limits import MAX_LOGGED_USER_AGENT

    settings = make_settings(sqlite_url, log_format="json")
    configure_logging(settings, log_stream)
    with TestClient(create_app(settings, clock=clock)) as client:
        log_stream.truncate(0), log_stream.seek(0)
        client.get("/healthz", headers={"user-agent": "u" * 60_000})
    (line,) = [entry for entry in lines(log_stream) if "httpRequest" in entry]
    agent = line["httpRequest"]["userAgent"]
    assert agent.startswith("u" * MAX_LOGGED_USER_AGENT) and agent.endswith("(60000 characters)")
    assert len(log_stream.getvalue()) < 2000


@pytest.mark.parametrize("path, instance", [
    ("/hello/a%0Ab", "/hello/a%0Ab"), ("/hello/a%09b", "/hello/a%09b"),
    ("/hello/a%20b", "/hello/a%20b"), ("/hello/a%E2%80%AEb", "/hello/a%E2%80%AEb"),
    ("/hello/Zo%C3%AB1", "/hello/Zo%C3%AB1"),
])
def test_instance_is_the_path_requested_as_a_uri_reference(client, path, instance):
    """Never another valid username (a%0Ab was echoed as ab), never a raw space or U+202E."""
    assert assert_problem(client.get(path), 400)["instance"] == instance


@pytest.mark.parametrize("span", ["1" * 4301, "0" * 5000 + "1", "2" * 21])
def test_a_trace_span_id_too_long_for_a_number_is_dropped_not_a_500(span):
    from app import tracing

    trace = tracing.parse(None, "4bf92f3577b34da6a3ce929d0e0e4736/" + span)
    assert trace is not None and trace.span_id is None


@search_settings(max_examples=500, deadline=None)
@given(traceparent=st.one_of(st.none(), st.text(max_size=80)),
       cloud=st.one_of(st.none(), st.text(max_size=80), st.from_regex(
           r"[0-9a-f]{32}/[0-9\u00b2\u0663]{0,40}(;o=[0-9])?", fullmatch=True)))
def test_parsing_a_trace_header_never_raises(traceparent, cloud):
    from app import tracing

    tracing.parse(traceparent, cloud)
