"""The production server: uvicorn, with the bounds a client must not exceed
on a connection, and a drain before shutdown.

uvicorn bounds neither the size of a request head (its httptools protocol
keeps every header line it is sent) nor the time a client takes to send a
request or to take its response, and it never closes a new connection that
sends nothing. ``BoundedProtocol`` adds those bounds around uvicorn's own
protocol, through the extension point uvicorn offers for it
(``Config(http=<asyncio.Protocol class>)``), using only the asyncio.Protocol
interface of the protocol it wraps: it sees every byte before uvicorn's
parser does, and refuses what must never reach it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from types import FrameType
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import Problem, problem_document
from app.framing import Framing, Phase, Refusal
from app.limits import (BODY_TIMEOUT_SECONDS, HEAD_TIMEOUT_SECONDS, MAX_HEAD_BYTES,
                        MAX_HEADER_LINES, SEND_TIMEOUT_SECONDS)
from app.settings import Settings

logger = logging.getLogger("app.server")


def _refusal() -> bytes:
    problem = Problem("headers-too-large",
                      f"The request head is larger than {MAX_HEAD_BYTES} bytes or has more than "
                      f"{MAX_HEADER_LINES} header lines.")
    body = json.dumps(problem_document(problem)).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/problem+json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body)


class BoundedProtocol(asyncio.Protocol):
    """uvicorn's HTTP protocol, behind the bounds of docs/api.md's "What a client controls".

    Every byte goes through app.framing.Framing first, which knows where each
    request's head and body begin and end:
    - a head over MAX_HEAD_BYTES or MAX_HEADER_LINES: 431 (for the connection's
      first request; after one, its answer may still be due, so the connection
      is just closed), never parsed;
    - a chunked body over MAX_BODY_WIRE_BYTES, more than MAX_PIPELINED requests in
      one read, framing that cannot be followed, bytes after an Upgrade
      request: closed;
    - a head not complete HEAD_TIMEOUT_SECONDS after its first byte (after the
      connection opened, for the first request), a body not complete
      BODY_TIMEOUT_SECONDS after its head, a new connection silent for the
      keep-alive time, a client that does not take a response for
      SEND_TIMEOUT_SECONDS: closed.
    """

    inner_class: type[asyncio.Protocol] = HttpToolsProtocol

    def __init__(self, **kwargs: Any) -> None:
        config: uvicorn.Config = kwargs["config"]
        self.keep_alive = float(config.timeout_keep_alive)
        self.inner = self.inner_class(**kwargs)
        self.framing = Framing()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.deadline: asyncio.TimerHandle | None = None
        self.send_deadline: asyncio.TimerHandle | None = None
        self.opened = 0.0
        self.phase = Phase.IDLE
        self.requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.opened = time.monotonic()
        self.deadline = self.loop.call_later(min(self.keep_alive, HEAD_TIMEOUT_SECONDS),
                                             self._close)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        refusal = self.framing.feed(data)
        if refusal is not None:
            self._refuse(refusal)
            return
        phase, requests = self.framing.phase, self.framing.requests
        if phase is not self.phase or requests != self.requests:
            self._time(phase)
            self.phase, self.requests = phase, requests
        self.inner.data_received(data)

    def _time(self, phase: Phase) -> None:
        """The deadline of the part of a request the connection is now in."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if phase is Phase.HEAD:  # its first byte: from the connection's start for the first
            started, self.opened = self.opened or time.monotonic(), 0.0
            self.deadline = self.loop.call_later(
                max(0.0, started + HEAD_TIMEOUT_SECONDS - time.monotonic()), self._close)
        elif phase is Phase.BODY:
            self.opened = 0.0
            self.deadline = self.loop.call_later(BODY_TIMEOUT_SECONDS, self._close)
        else:  # between requests: uvicorn's keep-alive time runs after the response
            self.opened = 0.0

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.deadline, self.send_deadline):
            if timer is not None:
                timer.cancel()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        # The client stopped taking what is sent: it has SEND_TIMEOUT_SECONDS to resume.
        if self.send_deadline is None:
            self.send_deadline = self.loop.call_later(SEND_TIMEOUT_SECONDS, self._abort)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.send_deadline is not None:
            self.send_deadline.cancel()
            self.send_deadline = None
        self.inner.resume_writing()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # what is buffered for it would never be taken

    def _refuse(self, refusal: Refusal) -> None:
        assert self.transport is not None  # nosec B101 - data comes after connection_made
        client = self.transport.get_extra_info("peername")
        logger.warning("closed a connection from %s: %s", client[0] if client else "?",
                       refusal.value)
        if refusal is Refusal.HEAD_TOO_LARGE and self.framing.first_request:
            self.transport.write(_refusal())  # else an earlier answer may still be due
        self._close()


def uvicorn_config(app: Any, host: str, port: int, keep_alive: float,
                   **options: Any) -> uvicorn.Config:
    """The server settings of ``python -m app``; the bench's baseline runs the same."""
    # After the drain, in-flight requests get this long before connections are cut
    # (SHUTDOWN_TIMEOUT_SECONDS; a float works as well as uvicorn's int).
    options = {"http": BoundedProtocol,
               "timeout_graceful_shutdown": Settings.shutdown_timeout_seconds, **options}
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        ws="none",
        # X-Forwarded-For is read by app.proxy, which trusts only the
        # platform's own hops (FORWARDED_HOPS); uvicorn's "*" trusted the
        # left-most entry, which any client can write.
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # a float works as well
        **options,
    )


async def serve(server: uvicorn.Server, on_drain: Any, drain_seconds: float) -> None:
    """Run ``server``; on SIGTERM call ``on_drain()`` at once, keep serving for
    ``drain_seconds``, then shut down gracefully (SIGINT stays uvicorn's: at once).

    uvicorn installs its own handlers when it starts serving; this one
    replaces its SIGTERM handler once the server has started.
    """
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    deadline: float | None = None

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        nonlocal deadline
        if deadline is None:  # a second SIGTERM does not cut the drain short
            on_drain()
            deadline = time.monotonic() + drain_seconds

    if server.started:
        signal.signal(signal.SIGTERM, on_sigterm)
    while not serving.done():
        if deadline is not None and time.monotonic() >= deadline and not server.should_exit:
            logger.info("drain over, shutting down")
            server.should_exit = True
        await asyncio.wait([serving], timeout=0.05)
    await serving
