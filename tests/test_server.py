"""What app/server.py relies on in uvicorn beyond its documentation, held here
so that a new uvicorn or httptools release that changes it fails loudly
(pyproject.toml pins both exactly for that reason)."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.server import BoundedProtocol, serve, uvicorn_config
from tests.live_server import free_port

# The asyncio.Protocol callbacks a transport calls; BoundedProtocol forwards each.
CALLBACKS = {"connection_made", "data_received", "eof_received", "connection_lost",
             "pause_writing", "resume_writing"}


async def _app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})


def test_uvicorn_takes_a_protocol_class_and_calls_it_with_the_keywords_forwarded():
    config = uvicorn_config(_app, "127.0.0.1", free_port(), keep_alive=5)
    config.load()
    assert config.http_protocol_class is BoundedProtocol
    parameters = set(inspect.signature(HttpToolsProtocol.__init__).parameters) - {"self"}
    assert parameters == {"config", "server_state", "app_state", "_loop"}


def test_the_wrapped_protocol_takes_bytes_only_through_the_callbacks_forwarded():
    """A BufferedProtocol's get_buffer/buffer_updated would bypass the bounds."""
    assert issubclass(HttpToolsProtocol, asyncio.Protocol)
    assert not issubclass(HttpToolsProtocol, asyncio.BufferedProtocol)
    assert not hasattr(HttpToolsProtocol, "get_buffer")
    defined = {name for name in dir(asyncio.BufferedProtocol) if not name.startswith("_")}
    assert defined - {"get_buffer", "buffer_updated"} <= CALLBACKS
    assert all(name in vars(BoundedProtocol) for name in CALLBACKS)


def test_uvicorn_installs_its_sigterm_handler_before_it_serves_and_ours_replaces_it():
    drained: list[bool] = []

    async def scenario() -> None:
        server = uvicorn.Server(uvicorn_config(_app, "127.0.0.1", free_port(), keep_alive=5,
                                               lifespan="on", log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) == server.handle_exit  # uvicorn's, while serving
        server.should_exit = True
        await serving

        server = uvicorn.Server(uvicorn_config(_app, "127.0.0.1", free_port(), keep_alive=5,
                                               lifespan="on", log_level="warning"))
        ours = asyncio.create_task(serve(server, lambda: drained.append(True), 0.2))
        while not server.started:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) != server.handle_exit
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(ours, 10)  # drained, then shut down: not killed

    before = signal.getsignal(signal.SIGTERM)
    try:
        asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGTERM, before)
    assert drained == [True]
