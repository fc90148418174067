"""Logs in the shape Google Cloud Logging reads, one JSON object per line on stdout.

Why not google-cloud-logging's StructuredLogHandler: it pulls in the cloud
client stack (grpc, protobuf, google-auth) at import, which costs start-up
time on a scale-from-zero service; the format it writes is small and public
(https://cloud.google.com/logging/docs/structured-logging), so this module
writes the same fields directly. In a terminal the lines are plain text.

Request bodies are never logged, so a date of birth never reaches a log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable
from datetime import datetime, timezone
from typing import TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.errors import internal_error, problem_response
from app.metrics import RequestMetrics
from app.proxy import client_address
from app.settings import Settings

TRACE_KEY = "logging.googleapis.com/trace"
SPAN_KEY = "logging.googleapis.com/spanId"
SAMPLED_KEY = "logging.googleapis.com/trace_sampled"

access_logger = logging.getLogger("app.access")


class JsonLineHandler(logging.StreamHandler[TextIO]):
    """The JSON handler, which lets access lines wait a moment to be written together.

    Every write to stdout is a system call: in the server under load, one
    per request was 4-5 us of a GET's ~160 us of CPU (nox -s bench's servers,
    measured per process). Access lines are held, as nginx's ``access_log
    ... buffer= flush=`` holds them, and written in one call:
    - at once when no request is in flight: an idle server holds nothing,
      so no line waits for the next request (nor for CPU that Cloud Run
      throttles between requests);
    - when MAX_HELD lines are held, or MAX_DELAY seconds after the first;
    - before any other record, so stdout keeps the order they were made in;
    - on flush(), which logging.shutdown() calls at exit (close() alone
      writes nothing).
    What a SIGKILL can lose is what is held then: at most MAX_HELD lines, no
    more than MAX_DELAY old.
    """

    MAX_HELD = 32
    MAX_DELAY = 0.01

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.held: list[str] = []

    def hold(self, line: str, in_flight: int) -> None:
        """Called on the event loop by the access log, ``in_flight`` requests
        still running."""
        with self.lock:  # type: ignore[union-attr]  # other threads log too
            held = self.held
            if in_flight and len(held) < self.MAX_HELD - 1:
                held.append(line)
                if len(held) == 1:
                    # Never cancelled (flush may run on another thread): one
                    # that finds nothing held does nothing.
                    asyncio.get_running_loop().call_later(self.MAX_DELAY, self.flush)
                return
            if held:
                held.append(line)
                self.held = []
                line = "".join(held)
            self._write(line)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            held, self.held = self.held, []
            if held:
                self._write("".join(held))
            else:
                super().flush()

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "held access lines"}))

    def emit(self, record: logging.LogRecord) -> None:
        if self.held:
            self.flush()
        super().emit(record)


# The handler configure_logging installed when it writes JSON; access lines go
# straight to it (see AccessLogMiddleware._log).
_json_handler: JsonLineHandler | None = None


_ACCESS_LINE = (
    '{"severity":"%s","message":"%s %s %d %.1fms","time":"%s","logger":"app.access",'
    '"httpRequest":{"requestMethod":"%s","requestUrl":%s,"status":%d,"latency":"%.6fs",'
    '"userAgent":%s,"remoteIp":%s,"protocol":"%s"}%s}\n'
)
_quote = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept
# A path is logged up to this many characters: a 65 kB username must not make
# a 130 kB log line. The longest valid one (/hello/ and 64 letters, each up to
# 4 code points before NFC) fits.
MAX_LOGGED_PATH = 300


_second = -1
_second_text = ""


def utc_timestamp(now: float) -> str:
    """``now`` (seconds since the epoch) as datetime's isoformat writes it in UTC.

    The date and time of day are formatted once a second: a datetime and its
    isoformat() for every line cost 0.9 us, a third of the access line.
    """
    global _second, _second_text
    second = int(now)
    if second != _second:
        _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return "%s.%06d+00:00" % (_second_text, (now - second) * 1_000_000)


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
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str)


class TerminalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Route every logger (ours, uvicorn's) through one handler on stdout."""
    global _json_handler
    stream = stream or sys.stdout
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not stream.isatty()
    )
    handler: logging.StreamHandler[TextIO]
    if use_json:
        handler = JsonLineHandler(stream)
        handler.setFormatter(CloudLoggingFormatter(settings.google_cloud_project))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(TerminalFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    _json_handler = handler if isinstance(handler, JsonLineHandler) else None
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # This module writes the access log; uvicorn's would be a second, unstructured line.
    logging.getLogger("uvicorn.access").disabled = True
    return handler


_PROTOCOLS = {version: f"HTTP/{version}" for version in ("1.0", "1.1", "2", "3")}
_LEVEL_NAMES = {logging.INFO: "INFO", logging.WARNING: "WARNING", logging.ERROR: "ERROR"}


class AccessLogMiddleware:
    """Pure ASGI middleware: one log line per request, and the trace for every
    line logged while the request runs.

    It is also the last resort for a bug: an exception that reaches it becomes
    a problem+json 500 and one log entry, this request's line with the
    traceback in it (Starlette's own last resort re-raises to uvicorn, which
    logged the same traceback twice more).
    """

    def __init__(self, app: ASGIApp, project: str | None, forwarded_hops: int = 0,
                 metrics: RequestMetrics | None = None) -> None:
        self.app = app
        self.project = project
        self.forwarded_hops = forwarded_hops
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # Every header the line and the trace need, in one pass in C; reversed,
        # so that a header sent twice is read from its first line.
        headers = dict(reversed(scope["headers"]))
        traceparent = headers.get(b"traceparent")
        cloud_trace = headers.get(b"x-cloud-trace-context")
        trace = token = None
        if traceparent or cloud_trace:
            trace = tracing.parse(traceparent.decode("latin-1") if traceparent else None,
                                  cloud_trace.decode("latin-1") if cloud_trace else None)
            token = tracing.current.set(trace)
        status = 0
        error: Exception | None = None
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight += 1
        self.in_flight += 1

        # A plain function handing back send's awaitable: the caller awaits
        # it, without a coroutine of this wrapper's own for every message.
        def send_and_record(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception as exc:
            error = exc
            if not status:
                await problem_response(internal_error(), scope.get("path"))(
                    scope, receive, send)
            status = 500
        finally:
            latency = time.perf_counter() - started
            self.in_flight -= 1
            self._log(scope, status or 500, latency, error, trace, headers)
            if metrics is not None:
                metrics.in_flight -= 1
                metrics.observe(scope, status or 500, latency)
            if token is not None:
                tracing.current.reset(token)

    def _log(self, scope: Scope, status: int, latency: float, error: Exception | None,
             trace: tracing.Trace | None, headers: dict[bytes, bytes]) -> None:
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
            forwarded = headers.get(b"x-forwarded-for")
            remote = client_address(forwarded.decode("latin-1") if forwarded else None,
                                    remote, self.forwarded_hops)
        user_agent = headers.get(b"user-agent", b"").decode("latin-1")
        method = scope["method"]
        path = scope["path"]
        if len(path) > MAX_LOGGED_PATH:
            path = f"{path[:MAX_LOGGED_PATH]}... ({len(path)} characters)"
        version = scope.get("http_version", "1.1")
        protocol = _PROTOCOLS.get(version) or f"HTTP/{version}"
        handler = _json_handler
        if handler is None or error is not None:
            access_logger.log(
                level, "%s %s %d %.1fms", method, path, status, latency * 1000,
                extra={"http_request": {
                    "requestMethod": method, "requestUrl": path, "status": status,
                    "latency": f"{latency:.6f}s", "userAgent": user_agent, "remoteIp": remote,
                    "protocol": protocol,
                }},
                exc_info=error,
            )
            return
        # The per-request line is written directly: no LogRecord, Formatter or
        # json.dumps of a nested dict (tests/test_logging.py holds it equal to
        # the formatter's line). Strings from the client are JSON-escaped, but
        # for the method: an HTTP token (RFC 9110, 5.6.2) has no quote,
        # backslash or control character, and the server parsed it as one.
        fields = trace_fields(trace, self.project) if trace is not None else None
        quoted_path = _quote(path)
        line = _ACCESS_LINE % (
            _LEVEL_NAMES[level], method, quoted_path[1:-1], status, latency * 1000,
            utc_timestamp(time.time()),
            method, quoted_path, status, latency,
            _quote(user_agent), _quote(remote), protocol,
            "," + json.dumps(fields, separators=(",", ":"))[1:-1] if fields else "",
        )
        handler.hold(line, self.in_flight)
