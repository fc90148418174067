"""The public API: /hello/{username}. Each endpoint validates, then calls the database."""

from __future__ import annotations

import asyncio
from datetime import date, timezone

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from app import validation
from app.birthday import greeting
from app.errors import Problem
from app.headers import header
from app.limits import MAX_BODY_BYTES


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

# Route answers the others with 405 and Allow, and HEAD as GET.
METHODS = ["GET", "PUT", "DELETE"]


async def hello(request: Request) -> Response:
    """/hello/{username}: GET greets, PUT saves, DELETE erases."""
    if request.method == "PUT":
        return await save(request)
    if request.method == "DELETE":
        return await erase(request)
    return await greet(request)


async def greet(request: Request) -> Response:
    username = validation.parse_username(request.path_params["username"])
    today = _today(request)
    async with request.state.admission:
        date_of_birth = await request.state.database.date_of_birth(username)
    if date_of_birth is None:
        raise _unknown_user(username)
    # A greeting is personal data: never kept by a cache.
    return JSONResponse({"message": greeting(username, date_of_birth, today)},
                        headers={"Cache-Control": "no-store"})


async def save(request: Request) -> Response:
    username = validation.parse_username(request.path_params["username"])
    today = _today(request)
    validation.check_content_type(header(request.scope, b"content-type"))
    body = await read_body(request)
    date_of_birth = validation.parse_date_of_birth(body, today)
    async with request.state.admission:
        await request.state.database.upsert(username, date_of_birth)
    return Response(status_code=204)


async def erase(request: Request) -> Response:
    username = validation.parse_username(request.path_params["username"])
    async with request.state.admission:
        erased = await request.state.database.delete(username)
    if not erased:
        raise _unknown_user(username)
    return Response(status_code=204)


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed MAX_BODY_BYTES
    (from Content-Length, or while it arrives), and with 408 when the client
    takes longer than BODY_READ_TIMEOUT to send it."""
    declared = header(request.scope, b"content-length")
    if declared is not None:
        # RFC 9110, 8.6: a list of one repeated value is that value.
        values = {value.strip() for value in declared.split(",")}
        if len(values) != 1 or not validation.is_whole_number(next(iter(values))):
            raise Problem("invalid-content-length", "Content-Length must be a whole number.")
        if int(values.pop()) > MAX_BODY_BYTES:
            raise validation.body_too_large()
    timeout = request.state.body_read_timeout
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise validation.body_too_large()
                chunks.append(chunk)
    except TimeoutError:
        raise Problem("body-timeout",
                      f"The request body did not arrive within {timeout:g} seconds.") from None
    except ClientDisconnect:
        # Nobody is left to read an answer; this only keeps it out of the error log.
        raise Problem("client-disconnected", "The client went away mid-body.") from None
    return b"".join(chunks)


def _today(request: Request) -> date:
    """Today in the zone of ?tz= (UTC without one), by the injected clock."""
    query = request.scope["query_string"]  # most requests have none: nothing to parse
    zone = validation.parse_timezone(request.query_params.getlist("tz")) if query else timezone.utc
    return validation.today_in(zone, request.state.clock())


def _unknown_user(username: str) -> Problem:
    return Problem("user-not-found",
                   f"No date of birth is stored for {username!r}; save one with PUT first.")
