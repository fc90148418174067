"""RFC 9457 problem documents, and the handlers that turn every error into one."""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from app import tracing

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:hello-birthday:problem:"
RETRY_AFTER_SECONDS = 1


class Problem(Exception):
    """An error a client can act on: rendered as application/problem+json."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = PROBLEM_TYPE_PREFIX + slug if slug else "about:blank"
        self.title = title or HTTPStatus(status).phrase
        self.detail = detail
        self.headers = headers or {}


def bad_request(slug: str, detail: str) -> Problem:
    return Problem(400, slug, detail)


def unprocessable(detail: str) -> Problem:
    return Problem(422, "invalid-date-of-birth", detail, title="Invalid date of birth")


def database_unavailable() -> Problem:
    return Problem(
        503,
        "database-unavailable",
        "The database did not answer in time; retry after the number of seconds in Retry-After.",
        title="Service temporarily unavailable",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def internal_error() -> Problem:
    return Problem(500, "internal-error", "The server failed to answer; this is not your fault.")


# The request path is echoed as ``instance`` up to this length; a longer one
# (a 65 kB "username") is left out rather than cut into a path that is not it.
MAX_INSTANCE_LENGTH = 300


def problem_body(problem: Problem, instance: str | None = None) -> bytes:
    body: dict[str, object] = {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if instance and len(instance) <= MAX_INSTANCE_LENGTH:
        body["instance"] = instance
    # An extension member (RFC 9457, 3.2): the trace the request arrived with,
    # so support can go from a client's error to its log line.
    trace_id = tracing.current_trace_id()
    if trace_id:
        body["traceId"] = trace_id
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    return Response(
        problem_body(problem, instance),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


# Starlette's own HTTP errors (routing) mapped to problem types.
_HTTP_DETAILS = {
    404: ("not-found", "No resource lives at this path."),
    405: ("method-not-allowed", "This path does not support the method; see the Allow header."),
}


async def handle_problem(request: Request, exc: Exception) -> Response:
    # Registered for Problem only.
    assert isinstance(exc, Problem)  # nosec B101
    return problem_response(exc, request.url.path)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    # Registered for HTTPException only.
    assert isinstance(exc, HTTPException)  # nosec B101
    slug, detail = _HTTP_DETAILS.get(exc.status_code, ("", HTTPStatus(exc.status_code).phrase))
    headers = dict(exc.headers or {})
    if "Allow" in headers:
        headers["Allow"] = ", ".join(sorted(m.strip() for m in headers["Allow"].split(",")))
    return problem_response(
        Problem(exc.status_code, slug, detail, headers=headers), request.url.path
    )
