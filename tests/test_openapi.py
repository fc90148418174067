"""The OpenAPI document is valid 3.1 and agrees with what the service answers."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.testclient import TestClient

from app.main import create_app
from app.openapi import document
from tests.conftest import make_settings

DOCUMENT = document()


def test_document_is_valid_openapi_3_1():
    validate(DOCUMENT)
    assert DOCUMENT["openapi"] == "3.1.0"


def test_the_documents_limits_are_the_codes():
    from app import __version__
    from app.domain import USERNAME_MAX_LENGTH
    from app.limits import MAX_BODY_BYTES

    assert DOCUMENT["info"]["version"] == __version__
    (username,) = [p for p in DOCUMENT["paths"]["/hello/{username}"]["parameters"]
                   if p["name"] == "username"]
    assert username["schema"]["maxLength"] == USERNAME_MAX_LENGTH
    assert f"1 to {USERNAME_MAX_LENGTH} " in username["description"]
    too_large = DOCUMENT["paths"]["/hello/{username}"]["put"]["responses"]["413"]
    assert str(MAX_BODY_BYTES) in too_large["description"]
    from app.limits import MAX_HEAD_BYTES, MAX_HEADER_LINES

    for item in DOCUMENT["paths"].values():
        for method, operation in item.items():
            if method != "parameters":
                head = operation["responses"]["431"]["description"]
                assert f"{MAX_HEAD_BYTES // 1024} KiB" in head
                assert f"{MAX_HEADER_LINES} header lines" in head


def test_every_problem_type_is_in_the_code_the_api_doc_and_the_schema_alike():
    """app.errors.PROBLEM_TYPES, docs/api.md's Errors table and the schema's enum."""
    import re
    from pathlib import Path

    from app.errors import PROBLEM_TYPE_PREFIX, PROBLEM_TYPES

    code = {slug: kind.status for slug, kind in PROBLEM_TYPES.items()}
    api_md = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    documented = {slug: int(status) for status, slug
                  in re.findall(r"^\| (\d{3}) \| `([a-z-]+)` \|", api_md, re.MULTILINE)}
    schema = DOCUMENT["components"]["schemas"]["Problem"]["properties"]["type"]["enum"]
    assert documented == code
    assert schema == [PROBLEM_TYPE_PREFIX + slug for slug in code]
    # Each status is a documented response of some operation.
    statuses = {status for item in DOCUMENT["paths"].values() for method, operation
                in item.items() if method != "parameters" for status in operation["responses"]}
    assert {str(status) for status in code.values()} <= statuses


def check_against_document(method: str, template: str, response) -> None:
    operation = DOCUMENT["paths"][template][method.lower()]
    documented = operation["responses"]
    status = str(response.status_code)
    assert status in documented, f"{method} {template} answered undocumented {status}"
    spec = documented[status]
    for header in spec.get("headers", {}):
        assert header in response.headers, f"{status} must carry {header}"
    content = spec.get("content")
    if not content:
        assert response.content == b""
        return
    media_type = response.headers["content-type"].split(";")[0]
    assert media_type in content
    schema = {**content[media_type]["schema"], "components": DOCUMENT["components"]}
    jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)


def test_every_response_of_a_tour_matches_the_document(client):
    headers = {"Content-Type": "application/json"}
    body = json.dumps({"dateOfBirth": "1990-06-20"})
    tour = [
        ("PUT", "/hello/{username}", client.put("/hello/ann", content=body, headers=headers)),
        ("GET", "/hello/{username}", client.get("/hello/ann")),
        ("GET", "/hello/{username}", client.get("/hello/nobody")),
        ("GET", "/hello/{username}", client.get("/hello/a1")),
        ("GET", "/hello/{username}", client.get("/hello/ann?tz=No/Where")),
        ("PUT", "/hello/{username}", client.put("/hello/ann", content=b"[", headers=headers)),
        ("PUT", "/hello/{username}", client.put("/hello/ann", content=body)),
        ("PUT", "/hello/{username}", client.put("/hello/ann", content=b"x" * 2048,
                                                headers=headers)),
        ("PUT", "/hello/{username}", client.put("/hello/ann", content=b"{}", headers=headers)),
        ("DELETE", "/hello/{username}", client.delete("/hello/ann")),
        ("DELETE", "/hello/{username}", client.delete("/hello/ann")),
        ("GET", "/hello/{username}", client.post("/hello/ann")),
        ("GET", "/healthz", client.get("/healthz")),
        ("GET", "/readyz", client.get("/readyz")),
    ]
    statuses = set()
    for method, template, response in tour:
        check_against_document(method, template, response)
        statuses.add(response.status_code)
    assert statuses == {200, 204, 400, 404, 405, 413, 415, 422}


@pytest.fixture
def client_without_database(tmp_path):
    # Nothing listens on port 1: every database call fails at once.
    settings = make_settings("postgresql+psycopg://postgres@127.0.0.1:1/none",
                             db_pool_timeout=0.5, db_statement_timeout=0.5)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_database_outage_responses_match_the_document(client_without_database):
    client = client_without_database
    headers = {"Content-Type": "application/json"}
    body = json.dumps({"dateOfBirth": "1990-06-20"})
    for method, response in [
        ("GET", client.get("/hello/ann")),
        ("PUT", client.put("/hello/ann", content=body, headers=headers)),
        ("DELETE", client.delete("/hello/ann")),
    ]:
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        check_against_document(method, "/hello/{username}", response)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    check_against_document("GET", "/readyz", ready)
    assert client.get("/healthz").status_code == 200
