"""Request header values as RFC 9110 reads them."""

from __future__ import annotations

from starlette.types import Scope


def header(scope: Scope, name: bytes) -> str | None:
    """The value of header ``name`` (lower case), or None when it was not sent.

    RFC 9110, 5.2-5.3: whitespace around a value is not part of it, and a
    header sent on several lines is one comma-separated list, in order.
    """
    values = [value.decode("latin-1").strip() for key, value in scope["headers"] if key == name]
    if not values:
        return None
    return ", ".join(values)
