"""The ASGI application, built by ``create_app``.

Every way of starting it logs the same: ``python -m app`` (app/__main__.py)
and ``uvicorn --factory app.main:create_app`` both call ``create_app()``
without settings, which reads the environment and configures logging; tests
pass settings and keep their own logging.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from app import errors, health, openapi, routes
from app.admission import Admission
from app.database import Database, open_database
from app.health import Readiness
from app.logging import AccessLogMiddleware
from app.metrics import Collector, MetricsServer, RequestMetrics
from app.settings import Settings, load_settings

logger = logging.getLogger("app")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = utc_now,
    database: Database | None = None,
) -> Starlette:
    if settings is None:
        from app.logging import configure_logging

        settings = load_settings()
        configure_logging(settings)
    db = database or open_database(settings)
    readiness = Readiness(db.schema_revisions)
    admission = Admission(settings.max_concurrent_requests)
    metrics = RequestMetrics() if settings.metrics_port else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        await db.open()
        logger.info(
            "hello-birthday %s (revision %s) serving on the %s database",
            settings.build_version, settings.build_revision,
            "embedded SQLite" if settings.is_sqlite else "PostgreSQL",
        )
        readiness.refresh()  # the first probe finds the answer ready
        metrics_server = None
        if metrics is not None:
            metrics_server = MetricsServer(
                Collector(metrics, admission, db, readiness, settings.build_version,
                          settings.build_revision),
                settings.host, settings.metrics_port,
            )
            metrics_server.start()
        try:
            yield {
                "database": db,
                "clock": clock,
                "admission": admission,
                "body_read_timeout": settings.body_read_timeout,
            }
        finally:
            if metrics_server is not None:
                metrics_server.close()
            await db.close()
            logger.info("hello-birthday stopped: requests finished, database connections closed")

    app = Starlette(
        routes=[
            Route("/hello/{username:anytext}", routes.hello, methods=routes.METHODS),
            Route("/healthz", health.healthz, methods=["GET"]),
            Route("/readyz", health.readyz, methods=["GET"]),
            Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
        ],
        middleware=[
            Middleware(AccessLogMiddleware, project=settings.google_cloud_project,
                       forwarded_hops=settings.forwarded_hops, metrics=metrics),
        ],
        exception_handlers=errors.EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    # /hello is an unknown path, not a redirect to /hello/ (Router's documented switch).
    app.router.redirect_slashes = False
    app.state.readiness = readiness
    app.state.settings = settings
    return app
