"""The production server: uvicorn, with the bounds a client must not exceed
on a connection, and a drain before shutdown.

uvicorn bounds neither the size of a request head (its httptools protocol
keeps every header line it is sent) nor the time a client takes to send it,
and it never closes a new connection that sends nothing. ``BoundedProtocol``
adds those bounds around uvicorn's own protocol, through the extension point
uvicorn offers for it (``Config(http=<asyncio.Protocol class>)``), using only
the asyncio.Protocol interface of the protocol it wraps: it sees every byte
before uvicorn's parser does, and refuses a head over MAX_HEAD_BYTES or
MAX_HEADER_LINES with 431 before the parser holds it.
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

    It follows the framing of each request just far enough to know where the
    next head starts: a head ends at its blank line; a body is Content-Length
    bytes long, or, chunked, ends at its last chunk. A chunked body that does
    not end within MAX_BODY_BYTES + MAX_HEAD_BYTES closes the connection (the
    service takes no body over MAX_BODY_BYTES anyway).
    """

    inner_class: type[asyncio.Protocol] = HttpToolsProtocol

    def __init__(self, **kwargs: Any) -> None:
        config: uvicorn.Config = kwargs["config"]
        self.keep_alive = float(config.timeout_keep_alive)
        self.inner = self.inner_class(**kwargs)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.opened = 0.0
        self._next_head()

    def _next_head(self) -> None:
        self.head: list[bytes] = []
        self.head_bytes = 0
        self.head_lines = 0
        self.tail = b""  # the last bytes seen: an end marker may span two reads
        self.body_left = 0  # bytes of a Content-Length body still to come
        self.chunked = False
        self.chunked_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.opened = time.monotonic()
        self._arm(min(self.keep_alive, HEAD_TIMEOUT_SECONDS))
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._follow(data):
            self.inner.data_received(data)

    def _follow(self, data: bytes) -> bool:
        """Walk ``data`` through heads and bodies; False when the connection was refused."""
        offset = 0
        while offset < len(data):
            if self.body_left:
                taken = min(self.body_left, len(data) - offset)
                self.body_left -= taken
                offset += taken
                if not self.body_left:
                    self._next_head()
            elif self.chunked:
                end = self._last_chunk(data, offset)
                if end is None:
                    return False
                offset = end
            else:
                end = self._head(data, offset)
                if end is None:
                    return False
                offset = end
        return True

    def _last_chunk(self, data: bytes, offset: int) -> int | None:
        """Where the chunked body ends in ``data``, else len(data); None once it ran too long."""
        seen = self.tail + data[offset:]
        start = 0
        while (end := seen.find(b"0\r\n\r\n", start)) >= 0:
            # The last chunk, without trailers: its size line starts a line.
            if seen[end - 2:end] == b"\r\n" if end >= 2 else (end == 0 and not self.chunked_bytes):
                self._next_head()
                return offset + end + 5 - len(self.tail)
            start = end + 1
        self.chunked_bytes += len(data) - offset
        if self.chunked_bytes > MAX_BODY_BYTES + MAX_HEAD_BYTES:
            self._close()
            return None
        self.tail = seen[-6:]
        return len(data)

    def _head(self, data: bytes, offset: int) -> int | None:
        """Take the head bytes of ``data[offset:]``: where the head ends in ``data``,
        else len(data); None when they pass the bound."""
        if not self.head_bytes:  # the first byte of a head starts its deadline
            started = self.opened or time.monotonic()
            self.opened = 0.0
            self._arm(started + HEAD_TIMEOUT_SECONDS - time.monotonic())
        seen = self.tail + data[offset:]
        end = _head_end(seen)
        part = data[offset:] if end < 0 else data[offset:offset + max(0, end - len(self.tail))]
        self.head.append(part)
        self.head_bytes += len(part)
        self.head_lines += part.count(b"\n")
        # The request line, and the blank line once there, are not header lines.
        header_lines = self.head_lines - (1 if end < 0 else 2)
        if self.head_bytes > MAX_HEAD_BYTES or header_lines > MAX_HEADER_LINES:
            self._refuse()
            return None
        if end < 0:
            self.tail = seen[-3:]
            return len(data)
        self._disarm()
        head = b"".join(self.head).lower()
        self._next_head()
        if b"\ntransfer-encoding:" in head and b"chunked" in head:
            self.chunked = True
        else:
            self.body_left = _content_length(head)
        return offset + len(part)

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


def _content_length(head: bytes) -> int:
    """The body length a (lower-cased) head declares; 0 when none or unreadable
    (the parser then refuses the request itself)."""
    start = head.find(b"\ncontent-length:")
    if start < 0:
        return 0
    value = head[start + 16:head.find(b"\n", start + 1)].strip()
    return int(value) if value.isdigit() else 0


def uvicorn_config(app: Any, host: str, port: int, keep_alive: float,
                   **options: Any) -> uvicorn.Config:
    """The server settings of ``python -m app``; the bench's baseline runs the same."""
    options = {"http": BoundedProtocol, **options}
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
