"""Overload protection: a bound on the requests one process serves at once."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import RETRY_AFTER_SECONDS, Problem, problem_response
from app.metrics import RequestMetrics

_OVERLOADED = Problem(
    503, "overloaded",
    "The server is at its limit of concurrent requests; retry after the number of seconds "
    "in Retry-After.",
    title="Service temporarily unavailable",
    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
)


class ConcurrencyLimit:
    """Pure ASGI middleware: past ``limit`` requests in flight, answer 503 at once.

    Queueing without bound only turns overload into timeouts for everyone;
    a quick 503 with Retry-After lets the load balancer or client go elsewhere.
    Unlike uvicorn's ``limit_concurrency`` it counts requests, not connections,
    so idle keep-alive connections from a load balancer (kept for 600 s on
    GKE) never count against it. The probes are never refused.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: RequestMetrics | None = None) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/healthz", "/readyz"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            if self.metrics is not None:
                self.metrics.rejected += 1
            await problem_response(_OVERLOADED)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
