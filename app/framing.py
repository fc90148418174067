"""Where each request on a connection begins and ends: HTTP/1.1 message framing
(RFC 9112, 2.2 and 6-7), followed just far enough to hold a client to its bounds.

``Framing`` reads the bytes a connection receives, in pieces of any size, and
knows at every moment whether it is inside a request head, inside a body, or
between requests. It never buffers more than one head (MAX_HEAD_BYTES), and
every search it makes is bounded by what the current part may still hold and
moves forward, so its work is linear in the bytes it is given. It does not
parse what the parser behind it parses (header values, the request line); it
refuses what must not reach that parser at all. Where the two could disagree
it follows the parser (uvicorn's httptools, llhttp): empty lines before a
request are skipped, and the rest of a read after a request that asks to
change protocols is dropped.
"""

from __future__ import annotations

import enum
import re

from app.limits import (MAX_BODY_WIRE_BYTES, MAX_CHUNK_LINE, MAX_HEAD_BYTES, MAX_HEADER_LINES,
                        MAX_PIPELINED)

_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")  # RFC 9112, 7.1: 1*HEXDIG, no sign, no prefix


class Phase(enum.Enum):
    IDLE = "between requests"
    HEAD = "in a request head"
    BODY = "in a request body"


class Refusal(enum.Enum):
    HEAD_TOO_LARGE = "the request head is over the bound"
    BODY_TOO_LARGE = "the request body is over the bound"
    PIPELINED = "too many requests in one read"
    MALFORMED = "the request's framing cannot be followed"


class _Part(enum.Enum):
    HEAD = 0
    LENGTH = 1
    CHUNK_SIZE = 2
    CHUNK_DATA = 3
    CHUNK_END = 4
    TRAILERS = 5


class Framing:
    def __init__(self) -> None:
        self.requests = 0  # heads completed on this connection
        self.refusal: Refusal | None = None
        # Whether the head being refused was the connection's first request: only
        # then may the refusal be answered (earlier ones may still be in flight).
        self.first_request = True
        self._start_head()

    @property
    def phase(self) -> Phase:
        if self._part is _Part.HEAD:
            return Phase.HEAD if self._size else Phase.IDLE
        return Phase.BODY

    def _start_head(self) -> None:
        self._part = _Part.HEAD
        self._size = 0  # bytes of the current head (or trailers), empty lines before it too
        self._started = False  # the request line has begun
        self._lines = 0
        self._tail = b""  # the last bytes of the current head: its end may span reads
        self._head: list[bytes] = []
        self._body = 0  # wire bytes of the current chunked body, framing included
        self._left = 0  # bytes left of a Content-Length body or of a chunk
        self._line = b""  # a chunk-size line split across reads

    def feed(self, data: bytes) -> Refusal | None:
        """Follow ``data``; a Refusal when the connection must be refused (then
        ``refusal`` stays set and nothing more is followed)."""
        if self.refusal is not None:
            return self.refusal
        offset = 0
        heads = 0
        while offset < len(data) and self.refusal is None:
            part = self._part
            if part is _Part.HEAD:
                self.first_request = self.requests == 0
                offset, done = self._take_head(data, offset, MAX_HEADER_LINES + 2)
                if done:
                    heads += 1
                    if heads > MAX_PIPELINED:
                        self.refusal = Refusal.PIPELINED
                    elif self._end_head():
                        break  # the parser drops the rest of this read (see _end_head)
            elif part is _Part.LENGTH:
                # Counted, not bounded: a Content-Length body costs nothing to
                # follow, and its deadline bounds it (the server's flow control
                # bounds what is held of it).
                taken = min(self._left, len(data) - offset)
                offset += taken
                self._left -= taken
                if not self._left:
                    self._start_head()
            elif part is _Part.CHUNK_SIZE:
                offset = self._take_chunk_size(data, offset)
            elif part is _Part.CHUNK_DATA:
                taken = min(self._left, len(data) - offset)
                offset += taken
                self._left -= taken
                self._count_body(taken)
                if not self._left:
                    self._part = _Part.CHUNK_END
                    self._line = b""
            elif part is _Part.CHUNK_END:
                offset = self._take_chunk_end(data, offset)
            else:  # TRAILERS
                offset, done = self._take_head(data, offset, MAX_HEADER_LINES + 1)
                if done:
                    self._start_head()
        return self.refusal

    def _take_head(self, data: bytes, offset: int, max_lines: int) -> tuple[int, bool]:
        """Take head bytes from ``data[offset:]``; (new offset, whether the head ended)."""
        if self._part is _Part.HEAD and not self._started:
            # Empty lines before a request line are skipped (RFC 9112, 2.2), as
            # the parser skips them: they start the head's deadline, never end it.
            start = offset
            while offset < len(data) and data[offset] in b"\r\n":
                offset += 1
            self._size += offset - start
            if self._size > MAX_HEAD_BYTES:
                self.refusal = Refusal.HEAD_TOO_LARGE
                return offset, False
            if offset == len(data):
                return offset, False
            self._started = True
        room = MAX_HEAD_BYTES - self._size
        window = min(len(data), offset + room + 1)  # one byte past the bound shows it passed
        end = -1
        if self._tail:  # an end that spans the previous read and this one
            joined = self._tail + data[offset:offset + 3]
            for marker in (b"\r\n\r\n", b"\n\n"):
                at = joined.find(marker)
                if at >= 0 and at + len(marker) > len(self._tail):
                    found = offset + at + len(marker) - len(self._tail)
                    end = found if end < 0 else min(end, found)
        if end < 0:
            crlf = data.find(b"\r\n\r\n", offset, window)
            lf = data.find(b"\n\n", offset, crlf + 4 if crlf >= 0 else window)
            ends = [at + n for at, n in ((crlf, 4), (lf, 2)) if at >= 0]
            end = min(ends) if ends else -1
        stop = window if end < 0 else end
        self._size += stop - offset
        self._lines += data.count(b"\n", offset, stop)
        # Lines, the blank one excepted once there: a request line and header lines.
        if self._size > MAX_HEAD_BYTES or self._lines - (1 if end >= 0 else 0) > max_lines - 1:
            self.refusal = Refusal.HEAD_TOO_LARGE
            return stop, False
        if self._part is _Part.HEAD:
            self._head.append(data[offset:stop])
        if end < 0:
            self._tail = (self._tail + data[offset:stop])[-3:]
            return stop, False
        return end, True

    def _end_head(self) -> bool:
        """Set up for what follows the head; True when the rest of the read is
        dropped: after a request asking to change protocols (an Upgrade, or
        CONNECT), the parser stops at the head, serves the request, and reads
        the next read afresh."""
        self.requests += 1
        head = b"".join(self._head).lower()
        self._start_head()
        if head.startswith(b"connect ") or (
                b"\nupgrade:" in head and _has_token(head, b"\nconnection:", b"upgrade")):
            return True
        if b"\ntransfer-encoding:" in head:
            if _has_token(head, b"\ntransfer-encoding:", b"chunked"):
                self._part = _Part.CHUNK_SIZE
            return False  # another coding: the parser refuses the request itself
        length = _header(head, b"\ncontent-length:")
        if length is None or not length.isdigit():
            return False  # none, or not one whole number: the parser refuses the latter itself
        self._left = int(length)
        if self._left:
            self._part = _Part.LENGTH
        return False

    def _count_body(self, size: int) -> None:
        self._body += size
        if self._body > MAX_BODY_WIRE_BYTES:
            self.refusal = Refusal.BODY_TOO_LARGE

    def _take_chunk_size(self, data: bytes, offset: int) -> int:
        end = data.find(b"\n", offset, offset + MAX_CHUNK_LINE + 1)
        stop = len(data) if end < 0 else end + 1
        self._line += data[offset:stop]
        self._count_body(stop - offset)
        if len(self._line) > MAX_CHUNK_LINE:
            self.refusal = Refusal.MALFORMED
        if end < 0 or self.refusal is not None:
            return stop
        size = self._line.split(b";", 1)[0].strip()
        self._line = b""
        if not _CHUNK_SIZE.fullmatch(size):
            self.refusal = Refusal.MALFORMED
            return stop
        self._left = int(size, 16)
        if self._left:
            self._part = _Part.CHUNK_DATA
        else:  # the last chunk: trailers, then a blank line
            self._part = _Part.TRAILERS
            self._tail = b"\r\n"
        return stop

    def _take_chunk_end(self, data: bytes, offset: int) -> int:
        """The line end after a chunk's data: CRLF (or a bare LF)."""
        while offset < len(data):
            byte = data[offset:offset + 1]
            offset += 1
            self._count_body(1)
            if byte == b"\n":
                self._part = _Part.CHUNK_SIZE
                self._line = b""
                return offset
            if byte != b"\r" or self._line:
                self.refusal = Refusal.MALFORMED
                return offset
            self._line = b"\r"
        return offset


def _header(head: bytes, name: bytes) -> bytes | None:
    """The first value of a (lower-cased) header line in a lower-cased head."""
    start = head.find(name)
    if start < 0:
        return None
    end = head.find(b"\n", start + 1)
    return head[start + len(name):end if end >= 0 else len(head)].strip()


def _has_token(head: bytes, name: bytes, token: bytes) -> bool:
    """Whether any line of header ``name`` lists ``token`` (RFC 9110's comma lists)."""
    start = head.find(name)
    while start >= 0:
        end = head.find(b"\n", start + 1)
        value = head[start + len(name):end if end >= 0 else len(head)]
        if token in (item.strip() for item in value.split(b",")):
            return True
        start = head.find(name, start + 1)
    return False
