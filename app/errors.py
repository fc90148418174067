"""RFC 9457 problem documents, and the handlers that turn every error into one."""

from __future__ import annotations

from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app import tracing
from app.database import DatabaseUnavailable

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:hello-birthday:problem:"
RETRY_AFTER_SECONDS = 1


class Problem(HTTPException):
    """An error a client can act on: rendered as application/problem+json.

    An HTTPException, so Starlette's own routing errors and ours share one
    handler (``handle_http_exception``)."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, detail, headers or {})
        self.type = PROBLEM_TYPE_PREFIX + slug if slug else "about:blank"
        self.title = title or HTTPStatus(status).phrase

    @property
    def status(self) -> int:
        return self.status_code


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


def problem_document(problem: Problem, instance: str | None = None) -> dict[str, object]:
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
    return body


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    return ProblemResponse(problem_document(problem, instance), status_code=problem.status,
                           headers=problem.headers)


# Starlette's own HTTP errors (routing) mapped to problem types.
_HTTP_DETAILS = {
    404: ("not-found", "No resource lives at this path."),
    405: ("method-not-allowed", "This path does not support the method; see the Allow header."),
}


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    # Registered for HTTPException, so Problem too.
    assert isinstance(exc, HTTPException)  # nosec B101
    if isinstance(exc, Problem):
        return problem_response(exc, request.url.path)
    slug, detail = _HTTP_DETAILS.get(exc.status_code, ("", HTTPStatus(exc.status_code).phrase))
    headers = dict(exc.headers or {})
    if "Allow" in headers:
        headers["Allow"] = ", ".join(sorted(m.strip() for m in headers["Allow"].split(",")))
    return problem_response(
        Problem(exc.status_code, slug, detail, headers=headers), request.url.path
    )


class ProblemBoundary:
    """Pure ASGI: what the routes raise becomes its problem+json response.

    An HTTPException (every Problem; Starlette's routing 404 and 405) through
    ``handle_http_exception``; a DatabaseUnavailable as a 503. Anything else
    goes on up to AccessLogMiddleware, the last resort (one 500, one log entry).

    It stands where Starlette's ExceptionMiddleware stood (app.main.Service),
    which does the same through a Request, a wrapped send and two closures
    built for every request: 10 % of a GET's instructions (nox -s
    instructions). This costs a try block until something is raised. The
    routes raise before they respond, so there is never a started response
    to clash with.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
            return
        except HTTPException as exc:
            response = await handle_http_exception(Request(scope, receive), exc)
        except DatabaseUnavailable:
            response = problem_response(database_unavailable(), scope.get("path"))
        await response(scope, receive, send)
