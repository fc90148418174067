"""app.framing: where each request on a connection begins and ends, whatever
the pieces the bytes arrive in, and what is refused before uvicorn's parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.framing import Framing, Phase, Refusal
from app.limits import MAX_BODY_WIRE_BYTES, MAX_HEAD_BYTES, MAX_HEADER_LINES, MAX_PIPELINED

GET = b"GET /hello/ann HTTP/1.1\r\nHost: x\r\n\r\n"


def put(body: bytes) -> bytes:
    return (b"PUT /hello/ann HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def chunked(pieces: list[bytes], trailers: bytes = b"", extension: bytes = b"") -> bytes:
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece) for piece in pieces)
    return (b"PUT /hello/ann HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + framed + b"0" + extension + b"\r\n" + trailers + b"\r\n")


def follow(*pieces: bytes) -> Framing:
    framing = Framing()
    for piece in pieces:
        framing.feed(piece)
    return framing


requests = st.one_of(
    st.just(GET),
    st.binary(max_size=200).map(put),
    st.tuples(st.lists(st.binary(min_size=1, max_size=60), max_size=5),
              st.sampled_from([b"", b"X-Trailer: 1\r\n", b"A: 1\r\nB: 2\r\n"]),
              st.sampled_from([b"", b";ext=1", b";a;b=\"c\""])).map(lambda t: chunked(*t)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(requests, min_size=1, max_size=MAX_PIPELINED), st.data())
def test_any_stream_of_requests_split_anywhere_is_followed_to_its_end(stream, data):
    joined = b"".join(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(joined)), max_size=12)))
    pieces = [joined[a:b] for a, b in zip([0, *cuts], [*cuts, len(joined)])]
    framing = follow(*pieces)
    assert framing.refusal is None
    assert framing.requests == len(stream)
    assert framing.phase is Phase.IDLE


def test_a_head_split_at_every_byte_is_followed():
    for cut in range(len(GET) + 1):
        framing = follow(GET[:cut], GET[cut:], GET)
        assert (framing.requests, framing.phase, framing.refusal) == (2, Phase.IDLE, None)


def test_the_phase_says_where_the_connection_is():
    framing = Framing()
    assert framing.phase is Phase.IDLE
    framing.feed(b"PUT /hello/ann HTTP/1.1\r\nContent-Length: 5\r\n")
    assert framing.phase is Phase.HEAD
    framing.feed(b"\r\n{\"a")
    assert framing.phase is Phase.BODY
    framing.feed(b'":')
    assert framing.phase is Phase.IDLE


def test_chunk_data_that_looks_like_a_last_chunk_and_a_head_is_only_data():
    """The attack that hid a 100 MiB head from the bounds: the fake end and the
    fake head inside the chunk are data, and the real head after is bounded."""
    inner = b"\r\n0\r\n\r\nGET /x HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n"
    framing = follow(chunked([inner]))
    assert (framing.requests, framing.phase, framing.refusal) == (1, Phase.IDLE, None)
    framing.feed(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * MAX_HEAD_BYTES)
    assert framing.refusal is Refusal.HEAD_TOO_LARGE


@pytest.mark.parametrize("last", [b"0;a=b\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n",
                                  b"0;x\r\nA: 1\r\nB: 2\r\n\r\n"])
def test_a_last_chunk_with_extensions_or_trailers_ends_the_body(last):
    body = (b"PUT /hello/ann HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n" + last)
    framing = follow(body)
    assert (framing.requests, framing.phase) == (1, Phase.IDLE)
    framing.feed(b"GET /")
    assert framing.phase is Phase.HEAD  # the next head's deadline runs


@pytest.mark.parametrize("lines, refused", [(MAX_HEADER_LINES, False),
                                            (MAX_HEADER_LINES + 1, True)])
def test_header_lines_are_bounded_complete_or_not(lines, refused):
    head = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * lines
    assert (follow(head).refusal is Refusal.HEAD_TOO_LARGE) == refused  # no blank line yet
    assert (follow(head + b"\r\n").refusal is Refusal.HEAD_TOO_LARGE) == refused


@pytest.mark.parametrize("size, refused", [(MAX_HEAD_BYTES, False), (MAX_HEAD_BYTES + 1, True)])
def test_a_head_is_bounded_in_bytes_and_never_held_past_the_bound(size, refused):
    start = b"GET / HTTP/1.1\r\nX: "
    head = start + b"v" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    assert (follow(head).refusal is Refusal.HEAD_TOO_LARGE) == refused
    flood = Framing()
    flood.feed(start + b"v" * (16 * MAX_HEAD_BYTES))
    assert flood.refusal is Refusal.HEAD_TOO_LARGE
    assert sum(len(part) for part in flood._head) <= MAX_HEAD_BYTES + 1


def test_trailers_are_bounded_like_a_head():
    framing = follow(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
                     b"T: 1\r\n" * (MAX_HEADER_LINES + 1))
    assert framing.refusal is Refusal.HEAD_TOO_LARGE


def test_more_requests_in_one_read_than_the_bound_are_refused():
    assert follow(GET * MAX_PIPELINED).refusal is None
    assert follow(GET * (MAX_PIPELINED + 1)).refusal is Refusal.PIPELINED
    assert follow(*[GET] * (MAX_PIPELINED * 4)).refusal is None  # one a read is fine


def test_a_chunked_body_is_bounded_on_the_wire():
    # A Content-Length body is only counted (its deadline bounds it): a client
    # sending too much hears the application's 413, not a reset.
    assert follow(put(b"x" * (4 * MAX_BODY_WIRE_BYTES))).refusal is None
    assert follow(chunked([b"x" * 4000] * 16)).refusal is None
    assert follow(chunked([b"x" * 4000] * 17)).refusal is Refusal.BODY_TOO_LARGE
    one_byte_chunks = chunked([b"x"] * (MAX_BODY_WIRE_BYTES // 6 + 1))
    assert follow(one_byte_chunks).refusal is Refusal.BODY_TOO_LARGE


@pytest.mark.parametrize("framing", [b"zz\r\n", b"3\r\nabcX\r\n", b"1" * 2000,
                                     # int(x, 16) takes these; RFC 9112's 1*HEXDIG does not
                                     b"-4\nX", b"+5\r\nabcde\r\n", b"0x5\r\n", b"1_0\r\n",
                                     b"12345678901234567\r\n"])
def test_chunk_framing_that_cannot_be_followed_is_refused(framing):
    start = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert follow(start + framing).refusal is Refusal.MALFORMED


@pytest.mark.parametrize("request_head", [
    b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: foo\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
])
def test_the_rest_of_a_read_after_an_upgrade_request_is_dropped_as_the_parser_drops_it(
        request_head):
    """llhttp stops at such a head; uvicorn serves the request and parses the
    next read afresh (RFC 9110, 7.8: a server may ignore Upgrade)."""
    framing = follow(request_head + b"garbage the parser never sees\r\n\r\n" * 3)
    assert (framing.requests, framing.phase, framing.refusal) == (1, Phase.IDLE, None)
    framing.feed(GET)
    assert (framing.requests, framing.phase, framing.refusal) == (2, Phase.IDLE, None)


def test_empty_lines_before_a_request_are_skipped_and_never_end_a_head():
    """RFC 9112, 2.2; '\\r\\n\\r\\n' alone is no request, and starts the head's deadline."""
    framing = follow(b"\r\n\r\n\n")
    assert (framing.requests, framing.phase) == (0, Phase.HEAD)
    framing.feed(GET)
    assert (framing.requests, framing.phase) == (1, Phase.IDLE)
    assert follow(b"\r\n" * (MAX_HEAD_BYTES // 2 + 1)).refusal is Refusal.HEAD_TOO_LARGE


def test_other_codings_and_unreadable_lengths_are_left_to_the_parser():
    """The parser behind refuses these requests itself (400 and a close)."""
    for head in (b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                 b"PUT / HTTP/1.1\r\nContent-Length: 28, 28\r\n\r\n"):
        assert follow(head).phase is Phase.IDLE


class _Parser:
    """uvicorn's parser (httptools, llhttp), counting the heads it completes."""

    def __init__(self) -> None:
        import httptools

        self.heads = 0
        self.parser = httptools.HttpRequestParser(self)

    def on_headers_complete(self) -> None:
        self.heads += 1

    def feed(self, data: bytes) -> bool:
        """False once the parser gave up on the connection (an error, or an upgrade)."""
        import httptools

        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return False
        return True


@settings(max_examples=400, deadline=2000)
@given(st.lists(requests, min_size=1, max_size=MAX_PIPELINED), st.data())
def test_the_follower_never_falls_behind_the_parser_on_mutated_streams(stream, data):
    """Whatever bytes arrive, each head the parser starts is one the follower
    counts (so no head escapes the bounds), and following always ends."""
    joined = bytearray(b"".join(stream))
    for _ in range(data.draw(st.integers(0, 4))):
        at = data.draw(st.integers(0, len(joined)))
        joined[at:at] = data.draw(st.sampled_from(
            [b"\r\n", b"\n", b"\r\n\r\n", b"0", b"-", b";", b"\r\n0\r\n\r\n", b"x",
             b"GET / HTTP/1.1\r\n\r\n", b"Content-Length: 3\r\n"]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(joined)), max_size=8)))
    pieces = [bytes(joined[a:b]) for a, b in zip([0, *cuts], [*cuts, len(joined)])]
    parser, framing = _Parser(), Framing()
    for piece in pieces:
        if framing.feed(piece) is not None:
            break
        if not parser.feed(piece):
            break
        assert parser.heads <= framing.requests
