"""The production server: uvicorn, with the bounds a client must not exceed
on a connection, and a drain before shutdown.

uvicorn bounds neither the size of a request head (its httptools protocol
keeps every header line it is sent) nor the time a client takes to send it,
and it never closes a new connection that sends nothing. ``BoundedProtocol``
adds those bounds around uvicorn's own protocol, through the extension point
uvicorn offers for it (``Config(http=<asyncio.Protocol class>)``): it sees
every byte before uvicorn's parser does, and refuses a head over
MAX_HEAD_BYTES or MAX_HEADER_LINES with 431 before the parser holds it.
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
from app.limits import HEAD_TIMEOUT_SECONDS, MAX_BODY_BYTES, MAX_HEAD_BYTES, MAX_HEADER_LINES

logger = logging.getLogger("app.server")

# In-flight requests get this long after draining before connections are cut.
GRACEFUL_SHUTDOWN_TIMEOUT = 10
# The key under which a request's scope["state"] names its connection.
CONNECTION = "app.server.connection"


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

    - A request head over MAX_HEAD_BYTES or MAX_HEADER_LINES: 431, closed.
    - A head not complete HEAD_TIMEOUT_SECONDS after its first byte (or
      after the connection opened, for the first request): closed.
    - A new connection that sends nothing for the keep-alive time: closed
      (uvicorn closes idle connections only after a response).
    - Past a head, a request may bring its body and the head of a pipelined
      request, nothing more, before its response is complete: else closed.

    The end of a head is found here by its blank line; the end of a response
    is reported by the application (``response_done``, called by the access
    log middleware through the request's scope["state"]).
    """

    inner_class: type[asyncio.Protocol] = HttpToolsProtocol

    def __init__(self, **kwargs: Any) -> None:
        config: uvicorn.Config = kwargs["config"]
        self.keep_alive = float(config.timeout_keep_alive)
        # The lifespan state is complete once connections are accepted; each
        # request's scope["state"] is a copy of this one.
        kwargs["app_state"] = {**kwargs["app_state"], CONNECTION: self}
        self.inner = self.inner_class(**kwargs)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.in_head = True
        self.head_bytes = 0
        self.head_lines = 0
        self.tail = b""  # the last bytes of the head so far: its end may span two reads
        self.after_head = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.opened = time.monotonic()
        self._arm(min(self.keep_alive, HEAD_TIMEOUT_SECONDS))
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_head:
            self.after_head += len(data)
            if self.after_head > MAX_BODY_BYTES + MAX_HEAD_BYTES:
                self._close()
                return
        else:
            if not self.head_bytes:  # the first byte of a head starts its deadline
                started = self.opened if self.opened else time.monotonic()
                self.opened = 0.0
                self._arm(started + HEAD_TIMEOUT_SECONDS - time.monotonic())
            seen = self.tail + data
            end = _head_end(seen)
            head = data if end < 0 else data[:max(0, end - len(self.tail))]
            self.head_bytes += len(head)
            self.head_lines += head.count(b"\n")
            # The request line and the blank line are not header lines.
            if self.head_bytes > MAX_HEAD_BYTES or self.head_lines > MAX_HEADER_LINES + 2:
                self._refuse()
                return
            if end < 0:
                self.tail = seen[-3:]
            else:
                self._disarm()
                self.in_head = False
                self.after_head = len(data) - len(head)
        self.inner.data_received(data)

    def response_done(self) -> None:
        """The application has answered the request; the next bytes are a new head."""
        self.in_head = True
        self.head_bytes = self.head_lines = self.after_head = 0
        self.tail = b""

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = self.loop.call_later(max(0.0, seconds), self._close)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self) -> None:
        assert self.transport is not None  # nosec B101 - data comes after connection_made
        client = self.transport.get_extra_info("peername")
        logger.warning("refused a request head over %d bytes or %d header lines from %s",
                       MAX_HEAD_BYTES, MAX_HEADER_LINES, client[0] if client else "?")
        self.transport.write(_refusal())
        self._close()


def _head_end(data: bytes) -> int:
    """The index just past the blank line that ends a head, or -1."""
    ends = [i + n for i, n in ((data.find(b"\r\n\r\n"), 4), (data.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1


def response_done(scope_state: dict[str, Any]) -> None:
    """Tell the request's connection, when a BoundedProtocol serves it, that it was answered."""
    connection = scope_state.get(CONNECTION)
    if connection is not None:
        connection.response_done()


def uvicorn_config(app: Any, host: str, port: int, keep_alive: float,
                   **options: Any) -> uvicorn.Config:
    """The server settings of ``python -m app``; the bench's baseline runs the same."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=BoundedProtocol,
        ws="none",
        # X-Forwarded-For is read by app.proxy, which trusts only the
        # platform's own hops (FORWARDED_HOPS); uvicorn's "*" trusted the
        # left-most entry, which any client can write.
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_TIMEOUT,
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
