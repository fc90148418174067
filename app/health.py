"""Operational endpoints: liveness, and readiness as docs/api.md defines it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.database import DatabaseLost, DatabaseUnavailable
from app.errors import Problem, problem_response
from app.schema import schema_verdict

logger = logging.getLogger("app.health")


class Readiness:
    """Whether this process should get traffic: /readyz's answer, kept cheaply.

    The schema is read on a connection of its own (``read_schema``), never one
    a request could hold, so a saturated pool cannot make a pod unready. One
    read at a time; a probe waits for it at most ``answer_within`` seconds and
    otherwise answers with what is known. Once the schema was seen good it is
    re-read every ``recheck_seconds`` only, so probe traffic barely reaches the
    database, and a database outage after that does not turn it unready:
    requests answer 503 themselves, while a load balancer with every backend
    unready would answer its own 502.
    """

    def __init__(
        self,
        read_schema: Callable[[], Awaitable[set[str]]],
        *,
        recheck_seconds: float = 10.0,
        answer_within: float = 0.5,
    ) -> None:
        self.read_schema = read_schema
        self.recheck_seconds = recheck_seconds
        self.answer_within = answer_within
        self.draining = False
        self.reason: str | None = "starting"
        self.changes = 0  # ready to not ready or back (app.metrics)
        self._checked_at = float("-inf")
        self._check: asyncio.Task[None] | None = None

    @property
    def schema_seen(self) -> bool:
        return self.reason is None

    def refresh(self) -> asyncio.Task[None]:
        """Start a schema read unless one runs or the last good one is recent."""
        stale = not self.schema_seen or (
            time.monotonic() - self._checked_at >= self.recheck_seconds
        )
        if stale and (self._check is None or self._check.done()):
            self._check = asyncio.get_running_loop().create_task(self._read())
        assert self._check is not None  # nosec B101
        return self._check

    async def _read(self) -> None:
        try:
            revisions = await self.read_schema()
        except DatabaseLost as lost:  # this process's own store: no outage that passes
            reason: str | None = str(lost)
        except DatabaseUnavailable:
            if not self.schema_seen:
                self.reason = "the database is unreachable"
            return  # seen good before: an outage is the requests' business
        else:
            reason = schema_verdict(revisions)
        if reason != self.reason:
            logger.info("readiness: %s", reason or "the schema serves this release")
            if (reason is None) != (self.reason is None):
                self.changes += 1
        self.reason = reason
        self._checked_at = time.monotonic()

    async def check(self) -> str | None:
        """None when ready, else the reason."""
        if self.draining:
            return "shutting down"
        task = self.refresh()
        if not task.done():
            await asyncio.wait([task], timeout=self.answer_within)
        if self.draining:
            return "shutting down"
        return self.reason


async def healthz(request: Request) -> JSONResponse:
    # Liveness never touches the database: a database outage must not restart pods.
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    reason = await request.app.state.readiness.check()
    if reason is None:
        return JSONResponse({"status": "ready"})
    return problem_response(Problem("not-ready", f"Not ready: {reason}."), "/readyz")
