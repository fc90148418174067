"""The OpenAPI 3.1 document of the public API (app/openapi.json), served at /openapi.json.

Written by hand, as data, so that it says exactly what the service does (every
error response included); tests validate it, check real responses against it
and check its limits against the code's.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import Response


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files("app").joinpath("openapi.json").read_bytes())
    return loaded


@lru_cache(maxsize=1)
def _encoded() -> bytes:
    return json.dumps(document(), separators=(",", ":")).encode()


async def openapi_json(request: Request) -> Response:
    return Response(_encoded(), media_type="application/json")
