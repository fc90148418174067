"""Instructions per request of the service's ASGI stack: a repeatable figure for A/B.

`nox -s bench` is the judge, but on a two-core machine its rounds vary by 10-25 %,
too much to see a change of a few per cent. This counts instructions instead
(valgrind's callgrind: the same count for the same code, whatever else the
machine does): the app from create_app, with its middleware, validation,
access log (to /dev/null) and metrics, driven in-process without a network and
with a database that answers from memory, so only the Python request path is
counted. It is a profiling aid, not a test: the tests and the bench run on
PostgreSQL.

    nox -s instructions -- GET        # or PUT; needs valgrind
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from datetime import date

from app.admission import Admission
from app.database import DatabaseStats
from app.logging import configure_logging
from app.main import create_app, utc_now
from app.settings import Settings


class MemoryDatabase:
    """Answers at once; only for counting the request path's own instructions."""

    stats = DatabaseStats()

    def pool_stats(self) -> None:
        return None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def upsert(self, username: str, date_of_birth: date) -> None: ...

    async def date_of_birth(self, username: str) -> date | None:
        return date(1990, 4, 23)

    async def delete(self, username: str) -> bool:
        return True

    async def schema_revisions(self) -> set[str]:
        return set()


def drive(method: str, requests: int) -> None:
    settings = Settings(database_url="postgresql://memory/none", log_format="json",
                        metrics_port=9090)
    configure_logging(settings, open(os.devnull, "w"))
    app = create_app(settings, database=MemoryDatabase())
    state = {"database": MemoryDatabase(), "clock": utc_now, "admission": Admission(100),
             "body_read_timeout": 5.0}
    body = b'{"dateOfBirth":"1990-04-23"}'
    headers = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk")]
    if method == "PUT":
        headers += [(b"content-type", b"application/json"), (b"content-length", b"28")]

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: object) -> None:
        pass

    async def run() -> None:
        for _ in range(requests):
            await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                       "method": method, "scheme": "http", "path": "/hello/ubcd",
                       "raw_path": b"/hello/ubcd", "query_string": b"", "root_path": "",
                       "headers": headers, "client": ("127.0.0.1", 5000),
                       "server": ("127.0.0.1", 8080), "state": dict(state)}, receive, send)

    import uvloop

    uvloop.run(run())


def count(method: str, requests: int) -> int:
    # One hash seed for every run: with a random one, dict and set layouts
    # moved the count by up to 1.5k between runs of the same code.
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-m", "benchmarks.instructions", method, "--drive", str(requests)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return int(re.search(r"Collected : (\d+)", run.stderr).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("GET", "PUT"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive is not None:
        drive(args.method, args.drive)
        return
    # Start-up and imports cancel out: the same run with 50 requests is subtracted.
    base, loaded = count(args.method, 50), count(args.method, 50 + args.requests)
    print(f"{args.method}: {(loaded - base) / args.requests:,.0f} instructions per request")


if __name__ == "__main__":
    main()
