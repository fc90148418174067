"""Production server: ``python -m app``.

uvicorn with uvloop, behind app.server's bounds on what a client controls. On
SIGTERM the server drains: /readyz answers 503 at once, requests are still
served for SHUTDOWN_DRAIN_SECONDS (so load balancers see the 503 and stop
sending), then it stops accepting, finishes in-flight requests, flushes logs
and exits 0.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
import uvloop

from app.main import create_app
from app.server import serve, uvicorn_config
from app.settings import SettingsError


def main() -> int:
    try:
        app = create_app()  # reads the environment and configures logging
    except SettingsError as error:
        print(f"hello-birthday: configuration error: {error}", file=sys.stderr)
        return 2
    settings = app.state.settings
    readiness = app.state.readiness
    server = uvicorn.Server(uvicorn_config(
        app, settings.host, settings.port, settings.keep_alive_seconds, lifespan="on",
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds))

    def drain() -> None:
        readiness.draining = True

    uvloop.run(serve(server, drain, settings.shutdown_drain_seconds))
    logging.shutdown()  # flush every handler before the process goes
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
