"""Operational endpoints: liveness, readiness, and the schema head readiness waits for."""

from __future__ import annotations

import ast
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.database import DatabaseUnavailable
from app.errors import Problem, problem_response

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def migration_heads(migrations_dir: Path = MIGRATIONS_DIR) -> set[str]:
    """The head revision(s) of the alembic scripts shipped with this code.

    Read from the scripts' ``revision``/``down_revision`` assignments rather
    than through alembic, whose import would add a third to start-up time; a
    test checks the answer against alembic's own.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (migrations_dir / "versions").glob("*.py"):
        for node in ast.parse(script.read_text(encoding="utf-8")).body:
            target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
            name = getattr(target, "id", None)
            value = getattr(node, "value", None)
            if name == "revision" and value is not None:
                revisions.add(ast.literal_eval(value))
            elif name == "down_revision" and value is not None:
                down = ast.literal_eval(value)
                parents.update([down] if isinstance(down, str) else (down or ()))
    return revisions - parents


async def healthz(request: Request) -> JSONResponse:
    # Liveness never touches the database: a database outage must not restart pods.
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    lifecycle = request.state.lifecycle
    if lifecycle.draining:
        return _not_ready("shutting down")
    try:
        revisions = await request.state.database.schema_revisions()
    except DatabaseUnavailable:
        return _not_ready("database unavailable")
    if revisions != lifecycle.schema_heads:
        return _not_ready("database schema is not at the migration head")
    return JSONResponse({"status": "ready"})


def _not_ready(reason: str) -> Response:
    problem = Problem(
        503, "not-ready", f"Not ready: {reason}.", title="Not ready",
        headers={"Retry-After": "1"},
    )
    return problem_response(problem, "/readyz")
