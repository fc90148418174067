"""Production server: ``python -m app``.

uvicorn with uvloop and httptools, no reload. On SIGTERM the
server drains: /readyz answers 503 at once, requests are still served for
SHUTDOWN_DRAIN_SECONDS (so load balancers see the 503 and stop sending), then
it stops accepting, finishes in-flight requests, flushes logs and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import FrameType

import uvicorn

from app.health import Readiness
from app.main import create_app
from app.settings import SettingsError

logger = logging.getLogger("app.server")

# In-flight requests get this long after draining before connections are cut.
GRACEFUL_SHUTDOWN_TIMEOUT = 10


class DrainingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, readiness: Readiness, drain_seconds: float
    ) -> None:
        super().__init__(config)
        self.readiness = readiness
        self.drain_seconds = drain_seconds
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)  # Ctrl-C: uvicorn's usual behaviour
            return
        if self.drain_deadline is not None:
            return  # a second SIGTERM does not cut the drain short
        self.readiness.draining = True
        self.drain_deadline = time.monotonic() + self.drain_seconds
        # Not recorded in _captured_signals: uvicorn would re-raise it after
        # shutdown and the process would die of SIGTERM instead of exiting 0.

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            if not self.should_exit:
                logger.info("drain over, shutting down")
            self.should_exit = True
        return await super().on_tick(counter)


def build_server() -> DrainingServer:
    app = create_app()  # reads the environment and configures logging
    settings = app.state.settings
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        # X-Forwarded-For is read by app.proxy, which trusts only the
        # platform's own hops (FORWARDED_HOPS); uvicorn's "*" trusted the
        # left-most entry, which any client can write.
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_TIMEOUT,
        timeout_keep_alive=settings.keep_alive_seconds,
    )
    return DrainingServer(config, app.state.readiness, settings.shutdown_drain_seconds)


def main() -> int:
    try:
        server = build_server()
    except SettingsError as error:
        print(f"hello-birthday: configuration error: {error}", file=sys.stderr)
        return 2
    server.run()
    logging.shutdown()  # flush every handler before the process goes
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
