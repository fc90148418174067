"""RFC 9457 problem documents: every problem type the service answers with,
defined here once, and the exception handlers that render them.

docs/api.md and app/openapi.json list the same types; tests/test_openapi.py
holds the three equal.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app import tracing
from app.database import DatabaseUnavailable
from app.limits import MAX_ECHOED_CHARS

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:hello-birthday:problem:"
RETRY_AFTER_SECONDS = 1


class ProblemType(NamedTuple):
    status: int
    title: str
    retry: bool = False  # a 503 that says when to come back (Retry-After)


PROBLEM_TYPES: dict[str, ProblemType] = {
    "invalid-username": ProblemType(400, "Invalid username"),
    "unknown-time-zone": ProblemType(400, "Unknown time zone"),
    "repeated-time-zone": ProblemType(400, "Time zone given twice"),
    "invalid-json": ProblemType(400, "Invalid JSON body"),
    "invalid-content-length": ProblemType(400, "Invalid Content-Length"),
    "client-disconnected": ProblemType(400, "Client disconnected"),
    "user-not-found": ProblemType(404, "User not found"),
    "not-found": ProblemType(404, "Not found"),
    "method-not-allowed": ProblemType(405, "Method not allowed"),
    "body-timeout": ProblemType(408, "Request body timeout"),
    "body-too-large": ProblemType(413, "Request body too large"),
    "unsupported-media-type": ProblemType(415, "Unsupported media type"),
    "invalid-date-of-birth": ProblemType(422, "Invalid date of birth"),
    "headers-too-large": ProblemType(431, "Request header fields too large"),
    "internal-error": ProblemType(500, "Internal server error"),
    "database-unavailable": ProblemType(503, "Database unavailable", retry=True),
    "overloaded": ProblemType(503, "Overloaded", retry=True),
    "not-ready": ProblemType(503, "Not ready", retry=True),
}


class Problem(HTTPException):
    """An error a client can act on, of one of PROBLEM_TYPES.

    An HTTPException, so Starlette's routing errors and ours share one
    handler (``handle_http_exception``)."""

    def __init__(self, slug: str, detail: str, headers: dict[str, str] | None = None) -> None:
        kind = PROBLEM_TYPES[slug]
        if kind.retry:
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS), **(headers or {})}
        super().__init__(kind.status, detail, headers)
        self.slug = slug
        self.title = kind.title

    @property
    def type(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug


def database_unavailable() -> Problem:
    return Problem(
        "database-unavailable",
        "The database did not answer in time; retry after the number of seconds in Retry-After.",
    )


def internal_error() -> Problem:
    return Problem("internal-error", "The server failed to answer; this is not your fault.")


def problem_document(problem: Problem, instance: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status_code,
        "detail": problem.detail,
    }
    # A longer path (a 65 kB "username") is left out rather than cut into a
    # path that is not it; the path is percent-encoded again, so the member is
    # a URI reference and names exactly the path requested (%0A stays %0A).
    if instance and len(instance) <= MAX_ECHOED_CHARS:
        body["instance"] = quote(instance, safe="/:@!$&'()*+,;=")
    # An extension member (RFC 9457, 3.2): the trace the request arrived with,
    # so support can go from a client's error to its log line.
    trace_id = tracing.current_trace_id()
    if trace_id:
        body["traceId"] = trace_id
    return body


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    return ProblemResponse(problem_document(problem, instance), status_code=problem.status_code,
                           headers=problem.headers)


# Starlette's own HTTP errors (routing) as problem types.
_ROUTING_PROBLEMS = {
    404: ("not-found", "No resource lives at this path."),
    405: ("method-not-allowed", "This path does not support the method; see the Allow header."),
}


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Every HTTPException, ours (Problem) and Starlette's routing 404 and 405."""
    assert isinstance(exc, HTTPException)  # nosec B101 - registered for HTTPException
    if not isinstance(exc, Problem):
        slug, detail = _ROUTING_PROBLEMS.get(exc.status_code, ("internal-error", exc.detail))
        headers = dict(exc.headers or {})
        if "Allow" in headers:  # Route lists its methods from a set: in no fixed order
            headers["Allow"] = ", ".join(sorted(m.strip() for m in headers["Allow"].split(",")))
        exc = Problem(slug, detail, headers=headers)
    return problem_response(exc, request.scope["path"])


async def handle_database_unavailable(request: Request, exc: Exception) -> Response:
    return problem_response(database_unavailable(), request.scope["path"])


EXCEPTION_HANDLERS = {
    HTTPException: handle_http_exception,
    DatabaseUnavailable: handle_database_unavailable,
}
