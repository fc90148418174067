"""The benchmark's baseline: the least an ASGI app can do for the same requests.

One Starlette route per operation, the same single query the service runs,
prepared, through a psycopg async pool. No validation, no logging, no ORM,
no middleware. `python -m benchmarks.baseline` serves it with the server
settings of `python -m app` (app.server.uvicorn_config, one worker).
"""

from __future__ import annotations

import contextlib
import json
import os

import uvicorn
import uvloop
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

SELECT = "SELECT date_of_birth FROM users WHERE username = %s"
UPSERT = (
    "INSERT INTO users (username, date_of_birth) VALUES (%s, %s) "
    "ON CONFLICT (username) DO UPDATE SET date_of_birth = excluded.date_of_birth, "
    "updated_at = now()"
)


def conninfo() -> str:
    url = os.environ["DATABASE_URL"]
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


pool = AsyncConnectionPool(conninfo(), min_size=int(os.environ.get("DB_POOL_SIZE", "10")),
                           max_size=int(os.environ.get("DB_POOL_SIZE", "10")), open=False,
                           kwargs={"autocommit": True})


async def hello(request):
    name = request.path_params["username"]
    if request.method == "PUT":
        body = json.loads(await request.body())
        async with pool.connection() as conn:
            await conn.execute(UPSERT, (name, body["dateOfBirth"]), prepare=True)
        return Response(status_code=204)
    async with pool.connection() as conn:
        cursor = await conn.execute(SELECT, (name,), prepare=True)
        row = await cursor.fetchone()
    return Response(json.dumps({"message": f"Hello, {name}! {row[0]}"}),
                    media_type="application/json")


async def readyz(request):
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    return Response(b'{"status":"ready"}', media_type="application/json")


@contextlib.asynccontextmanager
async def lifespan(app):
    await pool.open(wait=True)
    yield
    await pool.close()


app = Starlette(routes=[Route("/hello/{username}", hello, methods=["GET", "PUT"]),
                        Route("/readyz", readyz)], lifespan=lifespan)

if __name__ == "__main__":
    from app.server import uvicorn_config

    # As python -m app serves: the same protocol, bounds and uvicorn settings;
    # BENCH_UNBOUNDED=1 serves on uvicorn's bare httptools protocol instead, to
    # measure what the bounds cost (nox -s bench -- --bounds-cost).
    options = {"http": "httptools"} if os.environ.get("BENCH_UNBOUNDED") else {}
    config = uvicorn_config(app, "127.0.0.1", int(os.environ["PORT"]), keep_alive=5,
                            log_level="warning", **options)
    uvloop.run(uvicorn.Server(config).serve())
