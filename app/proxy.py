"""The client's address behind the platform's proxies (X-Forwarded-For)."""

from __future__ import annotations

import ipaddress


def client_address(forwarded_for: str | None, peer: str, hops: int) -> str:
    """The address the platform's own proxies saw the request come from.

    Each proxy appends the address it received the request from, so only the
    right-most ``hops`` entries were written by infrastructure; anything to
    their left came from the client and can say anything. The Google load
    balancer (GKE Ingress) appends two: the client, then its own address.
    Cloud Run's front end appends one, the client. With ``hops`` 0, or a header
    shorter than that (the request did not come through the platform), the
    TCP peer is the answer, as it is for an entry that is not an IP address.
    The header sent on several lines is one list (app.headers.header joins it).
    """
    if hops <= 0 or not forwarded_for:
        return peer
    entries = [entry.strip() for entry in forwarded_for.split(",")]
    if len(entries) < hops:
        return peer
    entry = entries[-hops]
    try:  # written by the platform, so an address; anything else was not
        address = ipaddress.ip_address(entry) if len(entry) <= 45 else None
    except ValueError:
        address = None
    if address is None or getattr(address, "scope_id", None):  # "::1%<anything>" parses
        return peer
    return str(address)
