"""The admission limit: how much work one process takes on at once."""

from __future__ import annotations

from types import TracebackType

from app.errors import Problem


class Admission:
    """At most ``limit`` requests doing work at once; past that, 503 at once.

    A request is admitted once it has been read and validated, for the
    database call and its answer, so a client that is slow to send its
    body, or sends nothing valid, never holds a place (the body deadline
    bounds that wait on its own). Queueing without bound only turns overload
    into timeouts for everyone: a quick 503 with Retry-After lets the load
    balancer or client go elsewhere. ``limit`` 0 admits everyone, and still
    counts. ``async with admission:`` holds one place.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.rejected = 0

    async def __aenter__(self) -> None:
        if self.limit and self.in_flight >= self.limit:
            self.rejected += 1
            raise Problem(
                "overloaded",
                "The server is at its limit of concurrent requests; retry after the number "
                "of seconds in Retry-After.",
            )
        self.in_flight += 1

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self.in_flight -= 1
