"""Logs in the shape Google Cloud Logging reads, one JSON object per line on stdout.

Why not google-cloud-logging's StructuredLogHandler: it pulls in the cloud
client stack (grpc, protobuf, google-auth) at import, which costs start-up
time on a scale-from-zero service; the format it writes is small and public
(https://cloud.google.com/logging/docs/structured-logging), so this module
writes the same fields directly. In a terminal the lines are plain text.

Request bodies are never logged, so a date of birth never reaches a log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import datetime, timezone
from typing import TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.errors import Problem, internal_error, problem_response
from app.headers import header
from app.limits import MAX_ECHOED_CHARS, MAX_HEADER_LINES, MAX_LOGGED_USER_AGENT
from app.metrics import RequestMetrics
from app.proxy import client_address
from app.settings import Settings

TRACE_KEY = "logging.googleapis.com/trace"
SPAN_KEY = "logging.googleapis.com/spanId"
SAMPLED_KEY = "logging.googleapis.com/trace_sampled"

access_logger = logging.getLogger("app.access")


def trace_fields(trace: tracing.Trace | None, project: str | None) -> dict[str, object] | None:
    """Cloud Logging's trace fields. Without a project the trace is the bare id,
    as google-cloud-logging writes it (tests/test_cloud_logging.py)."""
    if trace is None:
        return None
    fields: dict[str, object] = {
        TRACE_KEY: f"projects/{project}/traces/{trace.trace_id}" if project else trace.trace_id
    }
    if trace.span_id:
        fields[SPAN_KEY] = trace.span_id
    fields[SAMPLED_KEY] = trace.sampled
    return fields


class CloudLoggingFormatter(logging.Formatter):
    """One JSON object per record with the fields Cloud Logging lifts out."""

    def __init__(self, project: str | None = None) -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        return self.encoder.encode(self.entry(record))

    def entry(self, record: logging.LogRecord) -> dict[str, object]:
        """The record as the dictionary Cloud Logging reads."""
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        entry: dict[str, object] = {
            "severity": record.levelname,
            "message": message,
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "logger": record.name,
        }
        http_request = getattr(record, "http_request", None)
        if http_request is not None:
            entry["httpRequest"] = http_request
        trace = trace_fields(tracing.current.get(), self.project)
        if trace:
            entry.update(trace)
        entry["logging.googleapis.com/sourceLocation"] = {
            "file": record.pathname,
            "line": record.lineno,
            "function": record.funcName,
        }
        return entry

    # One encoder for every record: json.dumps with options builds a new one per call.
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


class TerminalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Route every logger (ours, uvicorn's) through one handler on stdout."""
    stream = stream or sys.stdout
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not stream.isatty()
    )
    handler = logging.StreamHandler(stream)
    if use_json:
        handler.setFormatter(CloudLoggingFormatter(settings.google_cloud_project))
    else:
        handler.setFormatter(TerminalFormatter())
    # No record needs the process id, thread or process name (documented
    # switches, in logging's "Optimization" section): each costs a call per record.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # This module writes the access log; uvicorn's would be a second, unstructured line.
    logging.getLogger("uvicorn.access").disabled = True
    return handler


_PROTOCOLS = {version: f"HTTP/{version}" for version in ("1.0", "1.1", "2", "3")}
# The status a request is logged and counted with when its client went away
# before the answer could be sent (nginx's convention): nobody got an answer,
# and it is nothing the service did wrong.
CLIENT_CLOSED_REQUEST = 499


class _ClientGone(Exception):
    """The server could not send the answer: the client's connection is gone."""


# C0 and C1 controls, and the Unicode line and paragraph separators: a client
# must not be able to start a new line in a text log.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(text: str, limit: int) -> str:
    """Client text for a log line: controls escaped, at most ``limit`` characters
    and a note of the length beyond that."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    if _CONTROL.search(text):
        text = _CONTROL.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    return text


class AccessLogMiddleware:
    """Pure ASGI middleware: one log line per request, through logging as
    uvicorn writes its own access log, and the trace for every line logged
    while the request runs.

    It is also the last resort for a bug: an exception that reaches it becomes
    a problem+json 500 and one log entry, this request's line with the
    traceback in it (Starlette's own last resort, ServerErrorMiddleware, would
    re-raise to uvicorn, which logs the same traceback twice more).
    """

    def __init__(self, app: ASGIApp, project: str | None, forwarded_hops: int = 0,
                 metrics: RequestMetrics | None = None) -> None:
        self.app = app
        self.project = project
        self.forwarded_hops = forwarded_hops
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        trace = tracing.parse(header(scope, b"traceparent"),
                              header(scope, b"x-cloud-trace-context"))
        token = tracing.current.set(trace)
        status = 0
        error: Exception | None = None

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            try:
                await send(message)
            except Exception as exc:  # raised by the server: the connection is gone
                raise _ClientGone from exc

        try:
            if len(scope["headers"]) > MAX_HEADER_LINES:
                # The server refuses longer heads before parsing them (app.server);
                # this holds the bound under any other server too.
                await problem_response(Problem(
                    "headers-too-large", f"The request has more than {MAX_HEADER_LINES} "
                    "header lines."), _escape(scope["path"], MAX_ECHOED_CHARS))(
                    scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        except _ClientGone:
            status = CLIENT_CLOSED_REQUEST
        except Exception as exc:
            error = exc
            if not status:
                await problem_response(internal_error())(scope, receive, send)
            status = 500
        finally:
            latency = time.perf_counter() - started
            self._log(scope, status or 500, latency, error)
            if self.metrics is not None:
                self.metrics.observe(scope, status or 500, latency)
            tracing.current.reset(token)

    def _log(self, scope: Scope, status: int, latency: float, error: Exception | None) -> None:
        # A 503 is the service working as designed while the database is away
        # (app.database logs why): a warning. Any other 5xx is an error.
        level = logging.ERROR if status >= 500 and status != 503 else (
            logging.WARNING if status >= 400 else logging.INFO
        )
        if not access_logger.isEnabledFor(level):
            return
        client = scope.get("client")
        remote = client[0] if client else ""
        if self.forwarded_hops:
            remote = client_address(header(scope, b"x-forwarded-for"), remote,
                                    self.forwarded_hops)
        user_agent = _escape(header(scope, b"user-agent") or "", MAX_LOGGED_USER_AGENT)
        method = scope["method"]  # an HTTP token: no space, quote or control (RFC 9110, 5.6.2)
        path = _escape(scope["path"], MAX_ECHOED_CHARS)
        version = scope.get("http_version", "1.1")
        # Logger.makeRecord and Logger.handle, the documented way to log a
        # record built by hand: the caller is known, so logging need not walk
        # the stack to find it for every request (Logger.log would).
        access_logger.handle(access_logger.makeRecord(
            access_logger.name, level, __file__, _LOG_LINE, "%s %s %d %.1fms",
            (method, path, status, latency * 1000),
            (type(error), error, error.__traceback__) if error else None,
            _LOG_FUNCTION, {"http_request": {
                "requestMethod": method, "requestUrl": path, "status": status,
                "latency": f"{latency:.6f}s", "userAgent": user_agent, "remoteIp": remote,
                "protocol": _PROTOCOLS.get(version) or f"HTTP/{version}",
            }},
        ))


# Where an access record says it was made (logging.googleapis.com/sourceLocation).
_LOG_LINE = AccessLogMiddleware._log.__code__.co_firstlineno
_LOG_FUNCTION = AccessLogMiddleware._log.__qualname__
