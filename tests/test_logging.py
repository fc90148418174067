"""Cloud Logging lines: one JSON object per request, trace correlation, no dates of birth."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from starlette.testclient import TestClient

from app import tracing
from app.logging import (AccessLogMiddleware, CloudLoggingFormatter, configure_logging,
                         trace_fields)
from app.main import create_app
from tests.conftest import make_settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_one_json_line_per_request_with_http_request_and_trace(sqlite_url, clock, log_stream):
    settings = make_settings(sqlite_url, google_cloud_project="my-proj", log_format="json")
    configure_logging(settings, log_stream)
    with TestClient(create_app(settings, clock=clock)) as client:
        log_stream.truncate(0), log_stream.seek(0)
        client.put("/hello/ann", json={"dateOfBirth": "1987-03-14"},
                   headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
                            "user-agent": "probe/1.0"})
        client.get("/hello/ann?tz=Asia/Tokyo",
                   headers={"x-cloud-trace-context": f"{TRACE_ID}/1;o=0"})
        client.get("/hello/nobody")
    access = [line for line in lines(log_stream) if "httpRequest" in line]
    assert len(access) == 3
    put, get, missing = access
    assert put["severity"] == "INFO"
    assert put["httpRequest"]["requestMethod"] == "PUT"
    assert put["httpRequest"]["requestUrl"] == "/hello/ann"
    assert put["httpRequest"]["status"] == 204
    assert put["httpRequest"]["userAgent"] == "probe/1.0"
    assert put["httpRequest"]["latency"].endswith("s")
    assert put["logging.googleapis.com/trace"] == f"projects/my-proj/traces/{TRACE_ID}"
    assert put["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert put["logging.googleapis.com/trace_sampled"] is True
    assert get["logging.googleapis.com/spanId"] == "0000000000000001"
    assert get["logging.googleapis.com/trace_sampled"] is False
    assert missing["severity"] == "WARNING" and missing["httpRequest"]["status"] == 404
    assert "logging.googleapis.com/trace" not in missing
    everything = log_stream.getvalue()
    assert "1987" not in everything and "03-14" not in everything  # no date of birth


def test_an_access_line_is_out_when_its_request_is(sqlite_url, clock, log_stream):
    """Even on a stdout that buffers (no PYTHONUNBUFFERED): with no other
    request in flight the line is written and flushed at once."""
    raw = io.BytesIO()
    buffered = io.TextIOWrapper(raw, encoding="utf-8", write_through=False)  # 8 kB pending
    settings = make_settings(sqlite_url, log_format="json")
    configure_logging(settings, buffered)
    with TestClient(create_app(settings, clock=clock)) as client:
        raw.truncate(0), raw.seek(0)
        client.get("/hello/nobody")
        assert b'"requestUrl":"/hello/nobody"' in raw.getvalue()


class _Gated:
    """An ASGI app that answers /<name> with 200 once gate(name) is opened."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def __call__(self, scope, receive, send) -> None:
        await self.gate(scope["path"].strip("/")).wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _request(app, name: str) -> asyncio.Task:
    scope = {"type": "http", "method": "GET", "path": f"/{name}", "headers": [],
             "http_version": "1.1", "client": ("127.0.0.1", 1)}

    async def send(message) -> None:
        pass
    return asyncio.ensure_future(app(scope, None, send))


def _written(stream: io.StringIO) -> list[str]:
    return [entry["httpRequest"]["requestUrl"] for entry in lines(stream)
            if "httpRequest" in entry]


def test_a_line_is_written_when_its_request_ends_whatever_else_is_in_flight(
        sqlite_url, log_stream):
    """No line waits for another request: a crash loses none that explain it."""
    configure_logging(make_settings(sqlite_url, log_format="json"), log_stream)

    async def scenario() -> None:
        inner = _Gated()
        app = AccessLogMiddleware(inner, project=None)
        slow, quick = _request(app, "slow"), _request(app, "quick")
        inner.gate("quick").set()
        await quick
        assert _written(log_stream) == ["/quick"]  # /slow is still in flight
        inner.gate("slow").set()
        await slow
        assert _written(log_stream) == ["/quick", "/slow"]

    asyncio.run(scenario())


def test_without_a_project_the_trace_is_the_bare_id():
    trace = tracing.parse(f"00-{TRACE_ID}-00f067aa0ba902b7-01", None)
    assert trace_fields(trace, None)["logging.googleapis.com/trace"] == TRACE_ID


@pytest.mark.parametrize(
    ("traceparent", "cloud"),
    [("00-zz-00f067aa0ba902b7-01", None), (f"00-{TRACE_ID}-0000000000000000-01", None),
     (None, "nothex/1;o=1"), ("garbage", "also garbage"), ("00-" + "0" * 32 + "-1-01", None)],
)
def test_malformed_trace_headers_are_ignored(traceparent, cloud):
    assert tracing.parse(traceparent, cloud) is None


def test_severity_maps_from_the_level_and_errors_carry_source_location():
    formatter = CloudLoggingFormatter()
    record = logging.LogRecord("x", logging.ERROR, "/a.py", 7, "boom %s", ("now",), None)
    entry = json.loads(formatter.format(record))
    assert entry["severity"] == "ERROR" and entry["message"] == "boom now"
    assert entry["logging.googleapis.com/sourceLocation"]["line"] == 7


def test_a_terminal_gets_plain_text(sqlite_url, log_stream):
    stream = FakeTTY()
    configure_logging(make_settings(sqlite_url), stream)
    logging.getLogger("app").info("hello there")
    assert "hello there" in stream.getvalue()
    assert not stream.getvalue().lstrip().startswith("{")


# --- the trace id in problem documents ------------------------------------------------------

@pytest.mark.parametrize(("headers", "expected"), [
    ({"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}, TRACE_ID),
    ({"x-cloud-trace-context": f"{TRACE_ID.upper()}/1;o=1"}, TRACE_ID),
    ({"traceparent": "garbage"}, None),
    ({}, None),
])
def test_problems_carry_the_requests_trace_id(sqlite_url, headers, expected):
    """Support goes from a client's error to its log line; without a project too."""
    def broken_clock():
        raise RuntimeError("boom")

    with TestClient(create_app(make_settings(sqlite_url, max_concurrent_requests=0)),
                    raise_server_exceptions=False) as client:
        answers = [client.get("/hello/Nobody", headers=headers),            # 404, Problem
                   client.get("/no/such/path", headers=headers),            # 404, routing
                   client.put("/hello/Bad", content=b"{", headers={**headers,
                              "content-type": "application/json"})]        # 400
    with TestClient(create_app(make_settings(sqlite_url), clock=broken_clock),
                    raise_server_exceptions=False) as client:
        answers.append(client.get("/hello/Nobody", headers=headers))       # 500, last resort
    for response in answers:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json().get("traceId") == expected, response.text


def test_the_overload_problem_carries_the_trace_id(sqlite_url, clock):
    with TestClient(create_app(make_settings(sqlite_url, max_concurrent_requests=1),
                               clock=clock)) as client:
        client.app_state["admission"].in_flight = 1  # one request is being served
        response = client.get("/hello/x", headers={
            "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["type"].endswith(":overloaded")
    assert response.json()["traceId"] == TRACE_ID


def test_a_header_sent_on_several_lines_is_one_list(sqlite_url, clock, log_stream):
    """RFC 9110, 5.3; a traceparent sent twice is not one trace, so it is ignored."""
    settings = make_settings(sqlite_url, log_format="json", google_cloud_project="p")
    configure_logging(settings, log_stream)
    other = "0af7651916cd43dd8448eb211c80319c"
    with TestClient(create_app(settings, clock=clock)) as client:
        log_stream.truncate(0), log_stream.seek(0)
        response = client.get("/hello/nobody", headers=[
            ("user-agent", "first/1"), ("user-agent", "second/2"),
            ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),
            ("traceparent", f"00-{other}-00f067aa0ba902b7-01")])
    (access,) = [line for line in lines(log_stream) if "httpRequest" in line]
    assert access["httpRequest"]["userAgent"] == "first/1, second/2"
    assert "logging.googleapis.com/trace" not in access
    assert "traceId" not in response.json()
