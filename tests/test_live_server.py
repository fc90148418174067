"""Black-box: the contract over real HTTP against `python -m app` on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import httpx2 as httpx
import pytest
import sqlalchemy as sa

from tests.live_server import LiveServer

pytestmark = pytest.mark.slow
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(postgres_server):
    from tests.conftest import migrate

    url = postgres_server.create_database()
    migrate(url)
    live = LiveServer(url).start()
    live.database_url = url
    yield live
    live.terminate()
    assert live.wait() == 0


def dob(days_ago: int) -> str:
    return (datetime.now(timezone.utc).date() - timedelta(days=days_ago)).isoformat()


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("PUT", "/hello/Alice", {"dateOfBirth": "1990-01-01"}, JSON, 204),
        ("GET", "/hello/Alice", None, {}, 200),
        ("GET", "/hello/Alice?tz=Asia/Tokyo", None, {}, 200),
        ("GET", "/hello/Al1ce", None, {}, 400),
        ("GET", "/hello/" + "a" * 65, None, {}, 400),
        ("GET", "/hello/Alice?tz=Not/AZone", None, {}, 400),
        ("PUT", "/hello/Alice", "[1]", JSON, 400),
        ("PUT", "/hello/Alice", "{", JSON, 400),
        ("PUT", "/hello/Alice", {"dateOfBirth": "1990-01-01"}, {"Content-Type": "text/plain"}, 415),
        ("PUT", "/hello/Alice", {"dateOfBirth": "1990-01-01", "x": "y" * 2000}, JSON, 413),
        ("PUT", "/hello/Alice", {"dateOfBirth": "1990-02-30"}, JSON, 422),
        ("PUT", "/hello/Alice", {"dateOfBirth": dob(0)}, JSON, 422),
        ("PUT", "/hello/Alice", {}, JSON, 422),
        ("GET", "/hello/Nobody", None, {}, 404),
        ("DELETE", "/hello/Nobody", None, {}, 404),
        ("POST", "/hello/Alice", None, {}, 405),
        ("GET", "/nowhere", None, {}, 404),
        ("GET", "/healthz", None, {}, 200),
        ("GET", "/readyz", None, {}, 200),
        ("GET", "/openapi.json", None, {}, 200),
    ],
)
def test_contract_row_over_http(server, method, path, body, headers, status):
    content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    response = httpx.request(method, server.url + path, content=content, headers=headers,
                             timeout=10)
    assert response.status_code == status, response.text
    expected_type = "application/problem+json" if status >= 400 else "application/json"
    if status != 204:
        assert response.headers["content-type"] == expected_type
    if status == 405:
        assert response.headers["allow"]


def test_greeting_over_http(server):
    httpx.put(server.url + "/hello/Zoë", content=json.dumps({"dateOfBirth": dob(365 * 20)}),
              headers=JSON)
    message = httpx.get(server.url + "/hello/Zo%C3%AB").json()["message"]
    assert message.startswith("Hello, Zoë! ")


def test_sixty_concurrent_puts_for_one_name(server):
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=60)) as client:
            return await asyncio.gather(*(
                client.put("/hello/Crowd", content=json.dumps({"dateOfBirth": dob(1000 + i)}),
                           headers=JSON)
                for i in range(60)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [204] * 60
    engine = sa.create_engine(server.database_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        count = connection.execute(
            sa.text("SELECT count(*) FROM users WHERE username = 'Crowd'")).scalar_one()
    engine.dispose()
    assert count == 1


def test_delete_over_http(server):
    httpx.put(server.url + "/hello/Gone", content=json.dumps({"dateOfBirth": dob(9000)}),
              headers=JSON)
    assert httpx.delete(server.url + "/hello/Gone").status_code == 204
    assert httpx.get(server.url + "/hello/Gone").status_code == 404


def test_sigterm_exits_zero_and_flushes_logs(postgres_url):
    live = LiveServer(postgres_url).start()
    httpx.get(live.url + "/healthz")
    live.terminate()
    assert live.wait(timeout=20) == 0
    logged = [json.loads(line) for line in live.output.splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in logged]
    served = [i for i, entry in enumerate(logged)
              if entry.get("httpRequest", {}).get("requestUrl") == "/healthz"]
    stopped = [i for i, message in enumerate(messages)
               if message.startswith("hello-birthday stopped")]
    assert served and stopped and served[-1] < stopped[0], messages


def test_uvicorns_own_cli_with_the_factory_logs_as_python_m_app_does(sqlite_url):
    """`uvicorn --factory app.main:create_app` and `python -m app` configure the
    same logging: every line JSON on stdout, the same fields, one access line."""
    import os
    import subprocess
    import sys

    from tests.live_server import free_port, wait_ready

    def lines_of(command: list[str], port: int) -> list[dict]:
        env = {**os.environ, "DATABASE_URL": sqlite_url, "LOG_FORMAT": "json",
               "PORT": str(port), "HOST": "127.0.0.1", "METRICS_PORT": "0"}
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}", 30, interval=0.1)
            httpx.get(f"http://127.0.0.1:{port}/hello/Nobody")
        finally:
            process.terminate()
            out, err = process.communicate(timeout=30)
        assert not err.strip(), err
        return [json.loads(line) for line in out.splitlines()]

    port = free_port()
    ours = lines_of([sys.executable, "-m", "app"], port)
    port = free_port()
    theirs = lines_of([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                       "--host", "127.0.0.1", "--port", str(port)], port)

    def shape(lines: list[dict]) -> set:
        return {(line["logger"], tuple(sorted(line))) for line in lines
                if line["logger"] in ("app", "app.access")}

    assert shape(ours) == shape(theirs)
    access = [line for line in theirs if line["logger"] == "app.access"]
    assert [line["httpRequest"]["status"] for line in access
            if line["httpRequest"]["requestUrl"] == "/hello/Nobody"] == [404]
