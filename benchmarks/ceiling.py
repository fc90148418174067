"""The benchmark's ceiling: a bare ASGI callable, no framework at all.

The same pool (psycopg's, the same size), the same prepared statements, the
same uvicorn (uvloop, httptools, one worker) as `python -m app`; the path is
split by hand and the body parsed with json. Nothing validates, logs, counts
or greets: this is as fast as Python serves these requests on this stack, and
`nox -s bench` holds the service to a share of it.
"""

from __future__ import annotations

import json
import os

import uvicorn
from psycopg_pool import AsyncConnectionPool

from benchmarks.baseline import SELECT, UPSERT, conninfo

pool = AsyncConnectionPool(conninfo(), min_size=int(os.environ.get("DB_POOL_SIZE", "10")),
                           max_size=int(os.environ.get("DB_POOL_SIZE", "10")), open=False,
                           kwargs={"autocommit": True})
JSON = [(b"content-type", b"application/json")]


async def respond(send, status: int, body: bytes = b"") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await pool.open(wait=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/readyz":
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        await respond(send, 200, b'{"status":"ready"}')
        return
    name = path[len("/hello/"):]
    if scope["method"] == "PUT":
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        async with pool.connection() as conn:
            await conn.execute(UPSERT, (name, json.loads(body)["dateOfBirth"]), prepare=True)
        await respond(send, 204)
        return
    async with pool.connection() as conn:
        cursor = await conn.execute(SELECT, (name,), prepare=True)
        row = await cursor.fetchone()
    await respond(send, 200, json.dumps({"message": f"Hello, {name}! {row[0]}"}).encode())


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), loop="uvloop",
                http="httptools", access_log=False, log_level="warning", lifespan="on",
                # as python -m app runs: no proxy-headers middleware, no Server header
                proxy_headers=False, server_header=False)
