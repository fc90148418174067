"""The public API: /hello/{username}. Each endpoint validates, then calls the database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Coroutine
from datetime import date, datetime, timezone
from typing import Any

from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import QueryParams
from starlette._utils import get_route_path
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from app import validation
from app.birthday import greeting
from app.errors import Problem


class AnyTextConvertor(Convertor[str]):
    """The rest of the path, newlines included (the stock ``path`` convertor
    stops at a decoded %0A, which turned a bad username into a 404), but never
    ending in a slash: a trailing slash names another path, which does not
    exist, as /healthz/ does not (one rule for every path: 404, no redirect)."""

    regex = r"(?:[\s\S]*[^/])?"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", AnyTextConvertor())

# An ASGI endpoint whose call is a coroutine: Hello, an instance with async __call__.
AsgiEndpoint = Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]]


class TailRoute(Route):
    """``Route(prefix + "{name:anytext}", ...)``, matched by prefix rather than
    by Starlette's regex: the same match for this one template, the last
    parameter running to the end of the path (but never ending in a slash).

    Starlette's Route.matches runs the regex, its groupdict and each
    parameter's convertor, and copies the path parameters, for a test a prefix
    settles; its handle() is one more coroutine around the endpoint's. The
    two were 4.3k of a GET's 114k instructions (nox -s instructions).
    tests/test_input.py holds the match equal to Starlette's.
    """

    def __init__(self, prefix: str, name: str, endpoint: AsgiEndpoint,
                 methods: Collection[str]) -> None:
        super().__init__(f"{prefix}{{{name}:anytext}}", endpoint, methods=methods)
        self.prefix = prefix
        self.param = name
        self.call = endpoint
        self.allowed = frozenset(self.methods or ())  # Route's set, with HEAD for GET

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            path = get_route_path(scope)
            if path.startswith(self.prefix):
                value = path[len(self.prefix):]
                if not value.endswith("/"):
                    path_params = {**scope.get("path_params", {}), self.param: value}
                    child_scope = {"endpoint": self.endpoint, "path_params": path_params}
                    if scope["method"] in self.allowed:
                        return Match.FULL, child_scope
                    return Match.PARTIAL, child_scope
        return Match.NONE, {}

    def handle(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        # The endpoint's own coroutine, without one of Route.handle's around
        # it; a method this route does not serve gets Route.handle's 405.
        if scope["method"] in self.allowed:
            return self.call(scope, receive, send)
        return super().handle(scope, receive, send)


_json_string = json.encoder.encode_basestring


_BODY_TIMEOUT = "hello-birthday: the request body's deadline passed"


async def _read_body(receive: Receive, declared: str | None, timeout: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the limit
    (``declared`` is the Content-Length), and with 408 when the client takes
    longer than ``timeout`` to send it.

    ASGI's receive loop itself: a Request and its stream(), an async generator
    behind a hasattr miss, were 18k of a PUT's 171k instructions (nox -s
    instructions).
    """
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "invalid-content-length", "Content-Length must be a whole number.")
        if int(declared) > validation.MAX_BODY_BYTES:
            raise validation.body_too_large()
    chunks = []
    size = 0
    # asyncio.timeout's own semantics (a timer that cancels the task; a cancel
    # from elsewhere, such as shutdown, stays a cancel) for the one loop here,
    # without its context manager (29k of a PUT's 224k instructions) or a
    # closure per request: the timer's cancel carries a message of its own.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None  # nosec B101 - always run by a task
    cancelling = task.cancelling()
    timer = loop.call_later(timeout, task.cancel, _BODY_TIMEOUT)
    try:
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                # Nobody is left to read an answer; this only keeps it out of the error log.
                raise Problem(400, "client-disconnected", "The client went away mid-body.")
            chunk = message.get("body", b"")
            more_body = message.get("more_body", False)
            size += len(chunk)
            if size > validation.MAX_BODY_BYTES:
                raise validation.body_too_large()
            chunks.append(chunk)
    except asyncio.CancelledError as cancel:
        if cancel.args == (_BODY_TIMEOUT,) and task.uncancel() <= cancelling:
            raise Problem(
                408, "body-timeout",
                f"The request body did not arrive within {timeout:g} seconds.",
            ) from None
        raise
    finally:
        timer.cancel()
    return b"".join(chunks)


class _Greeting(Response):
    """``{"message": ...}``, 200, never cached: a greeting is personal data.

    The body is one string member, escaped as json.dumps(ensure_ascii=False)
    escapes it (JSONResponse builds a JSON encoder per response), and the
    headers are fixed but for the length: set here, without Response's
    render() and init_headers(): 2.6k fewer instructions per GET.
    """

    def __init__(self, message: str) -> None:
        self.status_code = 200
        self.background = None
        self.body = body = ('{"message":' + _json_string(message) + "}").encode()
        self.raw_headers = [(b"content-length", str(len(body)).encode()),
                            (b"content-type", b"application/json"),
                            (b"cache-control", b"no-store")]


class _NoContent(Response):
    """204, no body, no headers: set here, without Response.__init__."""

    def __init__(self) -> None:
        self.status_code = 204
        self.background = None
        self.body = b""
        self.raw_headers = []


class Hello:
    """/hello/{username}, an ASGI endpoint: ``Route(..., Hello(), methods=Hello.METHODS)``.

    Starlette's Route refuses the other methods (405 with Allow) and serves
    HEAD as GET (uvicorn sends no body); errors are raised as Problems, which
    errors.ProblemBoundary turns into problem documents. Neither a function
    endpoint nor an HTTPEndpoint: those build a Request and an exception
    wrapper, or list the allowed methods again, on every request: 7 % and 16 %
    more instructions per GET (nox -s instructions).
    """

    METHODS = ("GET", "PUT", "DELETE")

    def __init__(self) -> None:
        self._handlers = {"GET": self.get, "HEAD": self.get, "PUT": self.put,
                          "DELETE": self.delete}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._handlers[scope["method"]](scope, receive)
        await response(scope, receive, send)

    # GET and DELETE read only the scope: a Request, and its State around the
    # lifespan state, would be built for nothing.
    async def get(self, scope: Scope, receive: Receive) -> Response:
        username = validation.parse_username(scope["path_params"]["username"])
        state = scope["state"]
        today = _today(scope, state["clock"])
        date_of_birth = await state["database"].date_of_birth(username)
        if date_of_birth is None:
            raise _unknown_user(username)
        return _Greeting(greeting(username, date_of_birth, today))

    async def put(self, scope: Scope, receive: Receive) -> Response:
        username = validation.parse_username(scope["path_params"]["username"])
        state = scope["state"]
        today = _today(scope, state["clock"])
        # The two headers from a map built in C; reversed, so that a header
        # sent twice is read from its first line, as Starlette's Headers reads it.
        headers = dict(reversed(scope["headers"]))
        content_type = headers.get(b"content-type")
        validation.check_content_type(None if content_type is None
                                      else content_type.decode("latin-1"))
        declared = headers.get(b"content-length")
        body = await _read_body(receive, None if declared is None else declared.decode("latin-1"),
                                state["body_read_timeout"])
        date_of_birth = validation.parse_date_of_birth(body, today)
        await state["database"].upsert(username, date_of_birth)
        return _NoContent()

    async def delete(self, scope: Scope, receive: Receive) -> Response:
        username = validation.parse_username(scope["path_params"]["username"])
        if not await scope["state"]["database"].delete(username):
            raise _unknown_user(username)
        return _NoContent()


def _today(scope: Scope, clock: Callable[[], datetime]) -> date:
    """Today in the zone of ?tz= (UTC without one), by the injected clock."""
    query = scope["query_string"]
    if not query:  # most requests: UTC, nothing to parse
        return validation.today_in(timezone.utc, clock())
    zone = validation.parse_timezone(QueryParams(query).getlist("tz"))
    return validation.today_in(zone, clock())


def _unknown_user(username: str) -> Problem:
    return Problem(
        404,
        "user-not-found",
        f"No date of birth is stored for {username!r}; save one with PUT first.",
        title="User not found",
    )
