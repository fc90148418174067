"""app/logging.py against google-cloud-logging, the oracle for Cloud Logging's format.

The same records go to our formatter and to the library's StructuredLogHandler,
and the fields Cloud Logging reads must agree: severity, message, trace, spanId,
trace_sampled, sourceLocation, httpRequest. The request's trace reaches the
library the way its own request integrations do: its header parsers
(_parse_trace_parent, then _parse_xcloud_trace) and its filter's rule for the
project prefix. Ours comes from app.tracing through the access middleware.

Normalised before comparing, as Cloud Logging reads them: the library writes
every field always, "" and {} for absent ones and false for an unsampled
trace; those equal a missing field.
"""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
from google.cloud.logging_v2.handlers import StructuredLogHandler
from google.cloud.logging_v2.handlers._helpers import _parse_trace_parent, _parse_xcloud_trace

from app import tracing
from app.logging import CloudLoggingFormatter

FIELDS = ("severity", "message", "logging.googleapis.com/trace",
          "logging.googleapis.com/spanId", "logging.googleapis.com/trace_sampled",
          "logging.googleapis.com/sourceLocation", "httpRequest")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
HEADERS = [
    {},
    {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
    {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-00"},
    {"x-cloud-trace-context": f"{TRACE_ID}/123456789;o=1"},
    {"x-cloud-trace-context": f"{TRACE_ID}/1;o=0"},
    {"x-cloud-trace-context": TRACE_ID},
    # Both: traceparent wins in each.
    {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
     "x-cloud-trace-context": "0af7651916cd43dd8448eb211c80319c/5;o=0"},
]
HTTP_REQUEST = {"requestMethod": "GET", "requestUrl": "/hello/Zoë", "status": 200,
                "latency": "0.001234s", "userAgent": "curl/8", "remoteIp": "203.0.113.9",
                "protocol": "HTTP/1.1"}


def normalised(entry: dict) -> dict:
    picked = {key: entry[key] for key in FIELDS if key in entry}
    return {key: value for key, value in picked.items() if value not in ("", {}, False, None)}


def library_entry(record: logging.LogRecord, headers: dict, project: str | None) -> dict:
    trace_id, span_id, sampled = _parse_trace_parent(headers.get("traceparent"))
    if trace_id is None:
        trace_id, span_id, sampled = _parse_xcloud_trace(headers.get("x-cloud-trace-context"))
    if trace_id is not None and project is not None:  # CloudLoggingFilter.filter's rule
        trace_id = f"projects/{project}/traces/{trace_id}"
    record.trace, record.span_id, record.trace_sampled = trace_id, span_id, sampled
    stream = io.StringIO()
    handler = StructuredLogHandler(project_id=project, stream=stream)
    handler.filter(record)
    return json.loads(handler.format(record))


def our_entry(record: logging.LogRecord, headers: dict, project: str | None) -> dict:
    token = tracing.current.set(
        tracing.parse(headers.get("traceparent"), headers.get("x-cloud-trace-context")))
    try:
        return json.loads(CloudLoggingFormatter(project).format(record))
    finally:
        tracing.current.reset(token)


def records() -> list[logging.LogRecord]:
    made = []
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        made.append(logging.LogRecord("app", level, "/srv/app/x.py", 12, "day %s of %d",
                                      ("Zoë", 3), None, func="greet"))
    try:
        raise ValueError("bad \"input\"\nsecond line")
    except ValueError:
        made.append(logging.LogRecord("app.database", logging.ERROR, "/srv/app/database.py",
                                      40, "failed", (), sys.exc_info(), func="run"))
    access = logging.LogRecord("app.access", logging.INFO, "/srv/app/logging.py", 99,
                               "GET /hello/Zoë 200 1.2ms", (), None, func="_log")
    access.http_request = dict(HTTP_REQUEST)
    made.append(access)
    return made


@pytest.mark.parametrize("project", [None, "my-project"])
@pytest.mark.parametrize("headers", HEADERS)
def test_the_fields_cloud_logging_reads_agree_with_google_cloud_logging(headers, project):
    for make in range(len(records())):
        ours = normalised(our_entry(records()[make], headers, project))
        theirs = normalised(library_entry(records()[make], headers, project))
        assert ours == theirs


def test_the_oracle_sees_the_trace_and_the_request():
    """Guards the comparison above: the library did emit what it is compared on."""
    record = records()[-1]
    entry = normalised(library_entry(record, HEADERS[3], "p"))
    assert entry["logging.googleapis.com/trace"] == f"projects/p/traces/{TRACE_ID}"
    assert entry["logging.googleapis.com/spanId"] == f"{123456789:016x}"
    assert entry["logging.googleapis.com/trace_sampled"] is True
    assert entry["httpRequest"] == HTTP_REQUEST
    assert entry["logging.googleapis.com/sourceLocation"]["line"] == 99
