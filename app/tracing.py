"""The trace a request arrived with, for its log lines and its problem documents.

Google's front ends (Cloud Run, the GKE load balancer) send a W3C
``traceparent`` and the older ``X-Cloud-Trace-Context``; the first that parses
wins, as in google-cloud-logging's own request parsing. A header that does not
parse is ignored: it is the client's, and never worth a failed request.
"""

from __future__ import annotations

import contextvars
from typing import NamedTuple

_HEX = frozenset("0123456789abcdef")


class Trace(NamedTuple):
    trace_id: str          # 32 lowercase hex digits
    span_id: str | None    # 16 lowercase hex digits
    sampled: bool


# Set by app.logging.AccessLogMiddleware for the request it wraps.
current: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("trace", default=None)


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= _HEX and value != "0" * length


def parse(traceparent: str | None, cloud_trace: str | None) -> Trace | None:
    """A Trace from a W3C traceparent, else from an X-Cloud-Trace-Context, else None."""
    if traceparent:
        # W3C Trace Context, 3.2: version 00 has exactly four fields; a later
        # version may add fields after the flags.
        parts = traceparent.strip().lower().split("-")
        version = parts[0]
        if (len(parts) >= 4 and len(version) == 2 and set(version) <= _HEX and version != "ff"
                and (version != "00" or len(parts) == 4)
                and _is_hex(parts[1], 32) and _is_hex(parts[2], 16)
                and len(parts[3]) == 2 and set(parts[3]) <= _HEX):
            return Trace(parts[1], parts[2], bool(int(parts[3], 16) & 1))
    if cloud_trace:
        # TRACE_ID[/SPAN_ID][;o=OPTIONS], the span id in decimal.
        trace_part, _, options = cloud_trace.strip().partition(";")
        trace_id, _, span = trace_part.partition("/")
        trace_id = trace_id.lower()
        if _is_hex(trace_id, 32):
            # ASCII digits only ('²'.isdigit() is true, and int('²') raises), and
            # no more than a 64-bit number has (int() refuses over 4300 digits).
            decimal = span.isascii() and span.isdigit() and len(span) <= 20
            span_id = f"{int(span):016x}" if decimal and 0 < int(span) < 2**64 else None
            return Trace(trace_id, span_id, options.strip() == "o=1")
    return None


def current_trace_id() -> str | None:
    trace = current.get()
    return trace.trace_id if trace else None
