"""The OpenAPI 3.1 document of the public API, served at /openapi.json.

Written by hand so that it says exactly what the service does (every error
response included); tests validate it and check real responses against it.
"""

from __future__ import annotations

import json
from functools import lru_cache

from starlette.requests import Request
from starlette.responses import Response

from app import __version__
from app.validation import MAX_BODY_BYTES, USERNAME_MAX_LENGTH


def _problem(description: str, headers: dict | None = None) -> dict:
    response = {
        "description": description,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    }
}
_ALLOW = {
    "Allow": {"description": "The methods this path supports.", "schema": {"type": "string"}}
}

_STATUS_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}

_USERNAME = {
    "name": "username",
    "in": "path",
    "required": True,
    "description": (
        f"1 to {USERNAME_MAX_LENGTH} Unicode letters (Python's str.isalpha()), percent-encoded "
        "UTF-8, normalised to NFC. Case-sensitive."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": USERNAME_MAX_LENGTH},
}
_TZ = {
    "name": "tz",
    "in": "query",
    "required": False,
    "description": "IANA time zone that defines today (default UTC), e.g. Asia/Tokyo. "
    "Given more than once: 400.",
    "schema": {"type": "string"},
}

_COMMON_ERRORS = {
    "400": _problem(
        "Invalid username, unknown or repeated tz, or a body that is not UTF-8 JSON, not an "
        "object, or names a member twice."
    ),
    "405": _problem("Method not allowed on this path.", _ALLOW),
    "503": _problem(
        "The database cannot do the work now (unreachable, timing out, restarting, read-only), "
        "or the server is at its concurrency limit.",
        _RETRY_AFTER,
    ),
}


def build_document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hello-birthday",
            "version": __version__,
            "description": "Stores dates of birth and greets people with the days to their "
            "birthday.",
        },
        "paths": {
            "/hello/{username}": {
                "parameters": [_USERNAME],
                "put": {
                    "operationId": "saveDateOfBirth",
                    "summary": "Save or replace the user's date of birth (upsert).",
                    "parameters": [_TZ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/DateOfBirth"}
                            }
                        },
                    },
                    "responses": {
                        "204": {"description": "Saved."},
                        **_COMMON_ERRORS,
                        "404": _problem("No resource at this path (a trailing slash)."),
                        "408": _problem("The body did not arrive within BODY_READ_TIMEOUT."),
                        "413": _problem(f"Body larger than {MAX_BODY_BYTES} bytes."),
                        "415": _problem("Content-Type is not application/json."),
                        "422": _problem(
                            "dateOfBirth missing, not a YYYY-MM-DD string, not a real date, "
                            "or not before today."
                        ),
                    },
                },
                "get": {
                    "operationId": "greet",
                    "summary": "Greet the user with the days left to their birthday.",
                    "parameters": [_TZ],
                    "responses": {
                        "200": {
                            "description": "The greeting.",
                            "headers": {
                                "Cache-Control": {
                                    "description": "no-store: the greeting is personal data.",
                                    "schema": {"type": "string", "const": "no-store"},
                                }
                            },
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Greeting"}
                                }
                            },
                        },
                        **_COMMON_ERRORS,
                        "404": _problem("No such user."),
                    },
                },
                "delete": {
                    "operationId": "forget",
                    "summary": "Erase the user (right to erasure).",
                    "responses": {
                        "204": {"description": "Erased."},
                        **_COMMON_ERRORS,
                        "404": _problem("No such user."),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "liveness",
                    "summary": "Liveness: 200 while the process can serve.",
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": _STATUS_JSON,
                        },
                        "405": _problem("Method not allowed.", _ALLOW),
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readiness",
                    "summary": "Readiness: the schema seen at this release's head or newer.",
                    "responses": {
                        "200": {
                            "description": "Ready.",
                            "content": _STATUS_JSON,
                        },
                        "405": _problem("Method not allowed.", _ALLOW),
                        "503": _problem(
                            "Not ready: the schema not seen yet or older than this release "
                            "needs, or shutting down.",
                            _RETRY_AFTER,
                        ),
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "DateOfBirth": {
                    "type": "object",
                    "required": ["dateOfBirth"],
                    "properties": {
                        "dateOfBirth": {
                            "type": "string",
                            "format": "date",
                            "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
                            "description": "A real calendar date strictly before today.",
                            "examples": ["1990-04-23"],
                        }
                    },
                },
                "Greeting": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {
                        "message": {
                            "type": "string",
                            "examples": [
                                "Hello, alice! Your birthday is in 5 day(s)",
                                "Hello, alice! Happy birthday!",
                            ],
                        }
                    },
                },
                "Status": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string"}},
                },
                "Problem": {
                    "type": "object",
                    "description": "RFC 9457 problem details.",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string", "format": "uri"},
                        "title": {"type": "string"},
                        "status": {"type": "integer", "minimum": 400, "maximum": 599},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                },
            }
        },
    }


@lru_cache(maxsize=1)
def _encoded() -> bytes:
    return json.dumps(build_document(), separators=(",", ":")).encode()


async def openapi_json(request: Request) -> Response:
    return Response(_encoded(), media_type="application/json")
