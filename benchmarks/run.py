"""`nox -s bench`: the service against its baseline, side by side, in one run.

Both run on PostgreSQL with one uvicorn worker, the same pool size and the
same server settings (app.server.uvicorn_config: uvloop, the bounded HTTP
protocol, no proxy-headers middleware, no Server header):
- the app: python -m app, with its access log, metrics and every check;
- the baseline (benchmarks/baseline.py): a minimal Starlette endpoint with
  the same pool and statements, and nothing else.
wrk drives them in alternation, several rounds, the order rotating, and the
medians are compared:

  app req/s >= 0.9 x the baseline's, app p99 <= 1.2 x  (GET and PUT)
  cold start (exec -> first 200 from /readyz) and RSS after 2000 requests <= 1.5 x

With --interpreters, the app runs once per interpreter given (each with the
locked dependencies installed), side by side in the same rounds, to choose
the image's Python by measurement; with --bounds-cost, the baseline runs with
and without app.server's bounds, to say what they cost. Exit status 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.conftest import migrate
from tests.live_server import free_port, stop_process, wait_ready

ROOT = Path(__file__).resolve().parent.parent
NAMES = 3000
# reference: (minimum throughput ratio, maximum p99 ratio)
THROUGHPUT_FLOOR = 0.9  # x the baseline's req/s
P99_CEILING = 1.2  # x the baseline's p99
START_AND_RSS = 1.5  # x the baseline's

LUA_NAME = """
local function name(i)
  local s = "u"
  while i > 0 do s = s .. string.char(97 + i % 26); i = math.floor(i / 26) end
  return s
end
"""
LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"errors":%d,"bad_status":%d,' ..
    '"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""
LUA = {
    "GET": LUA_NAME + f"""
request = function()
  return wrk.format("GET", "/hello/" .. name(math.random(1, {NAMES})))
end
""" + LUA_DONE,
    "PUT": LUA_NAME + f"""
request = function()
  local body = string.format('{{"dateOfBirth":"19%02d-%02d-%02d"}}',
    math.random(0, 99), math.random(1, 12), math.random(1, 28))
  return wrk.format("PUT", "/hello/" .. name(math.random(1, {NAMES})),
    {{["Content-Type"] = "application/json"}}, body)
end
""" + LUA_DONE,
}


def letters_name(i: int) -> str:
    s = "u"
    while i > 0:
        s += chr(97 + i % 26)
        i //= 26
    return s


def prepare_database(server_url: str) -> tuple[str, str]:
    """A database of this run's own, seeded; its URL and its name (drop it with drop_database)."""
    url = make_url(server_url.replace("postgresql://", "postgresql+psycopg://", 1))
    name = f"hello_birthday_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        # Commits do not wait for the WAL flush. What is compared is the
        # request path of two servers; on a shared VM disk a flush now and
        # then stalls for 100-400 ms, a tail that lands on whichever server
        # is running (docs/performance.md).
        connection.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    admin.dispose()
    bench_url = url.set(database=name).render_as_string(hide_password=False)
    migrate(bench_url)
    engine = sa.create_engine(bench_url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO users (username, date_of_birth) VALUES (:u, :d)"),
            [{"u": letters_name(i), "d": f"19{i % 100:02d}-{1 + i % 12:02d}-{1 + i % 28:02d}"}
             for i in range(1, NAMES + 1)],
        )
    engine.dispose()
    return bench_url, name


def drop_database(server_url: str, name: str) -> None:
    url = make_url(server_url.replace("postgresql://", "postgresql+psycopg://", 1))
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


class Server:
    def __init__(self, label: str, module: str, database_url: str, pool_size: int,
                 python: str = sys.executable) -> None:
        self.label = label
        self.module = module
        self.python = python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(self.port),
                    "HOST": "127.0.0.1", "DB_POOL_SIZE": str(pool_size), "LOG_FORMAT": "json",
                    # the whole pool open from the start, as the baseline's
                    "DB_POOL_MIN_SIZE": str(pool_size)}
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start the process; return seconds from exec to the first 200 from /readyz."""
        started = time.perf_counter()
        self.process = subprocess.Popen([self.python, "-m", self.module], cwd=ROOT,
                                        env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_ready(self.url, 60, lambda: self.process.poll() is None, interval=0.005)
        return time.perf_counter() - started

    def rss_mib(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, timeout=15)


def wrk_run(url: str, method: str, seconds: int, connections: int, script_dir: Path) -> dict:
    script = script_dir / f"{method}.lua"
    script.write_text(LUA[method])
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    return {
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": result["errors"] + result["bad_status"],
    }


async def _client_run(url: str, method: str, seconds: int, connections: int) -> dict:
    import random

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            name = letters_name(random.randint(1, NAMES))  # nosec B311 - load, not security
            began = time.perf_counter()
            if method == "GET":
                response = await client.get(f"/hello/{name}")
            else:
                body = json.dumps({"dateOfBirth": f"19{random.randint(0, 99):02d}-01-01"})
                response = await client.put(f"/hello/{name}", content=body,
                                            headers={"Content-Type": "application/json"})
            latencies.append(time.perf_counter() - began)
            errors += response.status_code >= 400

    began = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(connections)))
    elapsed = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100)
    return {"rps": len(latencies) / elapsed, "p50_ms": quantiles[49] * 1000,
            "p99_ms": quantiles[98] * 1000, "errors": errors}


def load(url: str, method: str, seconds: int, connections: int, script_dir: Path) -> dict:
    if shutil.which("wrk"):
        return wrk_run(url, method, seconds, connections, script_dir)
    return asyncio.run(_client_run(url, method, seconds, connections))


def warm(url: str, requests: int) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(requests):
            client.get(f"/hello/{letters_name(1 + i % NAMES)}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get(
        "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--bounds-cost", action="store_true",
                        help="the baseline with and without app.server's bounds, instead")
    parser.add_argument("--interpreters", nargs="+", metavar="PYTHON",
                        help="run the app under each of these interpreters instead of the "
                             "baseline: which Python serves it best")
    args = parser.parse_args()

    generator = "wrk" if shutil.which("wrk") else (
        "httpx2 async client: it saturates before the servers do, so the ratios say little; "
        "install wrk")
    print(f"load generator: {generator}; {os.cpu_count()} CPUs; {args.rounds} rounds x "
          f"{args.seconds}s x {args.connections} connections; pool {args.pool_size}")
    database_url, database_name = prepare_database(args.database_url)
    try:
        if args.interpreters:
            servers = [Server(f"py{python_version(python)}", "app", database_url,
                              args.pool_size, python) for python in args.interpreters]
        elif args.bounds_cost:
            servers = [Server("bounded", "benchmarks.baseline", database_url, args.pool_size),
                       Server("unbounded", "benchmarks.baseline", database_url, args.pool_size)]
            servers[1].env["BENCH_UNBOUNDED"] = "1"
        else:
            print(f"Python {python_version(sys.executable)}")
            servers = [Server("app", "app", database_url, args.pool_size),
                       Server("baseline", "benchmarks.baseline", database_url, args.pool_size)]
        starts, rss, results = measure(servers, args)
    finally:
        drop_database(args.database_url, database_name)
    if args.interpreters or args.bounds_cost:
        return compare_servers(servers, starts, rss, results)
    return judge(starts, rss, results)


def measure(servers: list[Server], args: argparse.Namespace) -> tuple[
        dict[str, list[float]], dict[str, list[float]], dict[tuple[str, str], list[dict]]]:
    count = len(servers)
    # Cold start and memory: fresh processes, rotating which goes first.
    starts: dict[str, list[float]] = {s.label: [] for s in servers}
    rss: dict[str, list[float]] = {s.label: [] for s in servers}
    for attempt in range(args.starts):
        for server in servers[attempt % count:] + servers[:attempt % count]:
            try:
                starts[server.label].append(server.start())
                if attempt < 2:
                    warm(server.url, 2000)
                    rss[server.label].append(server.rss_mib())
            finally:
                server.stop()

    # Throughput and latency: all up, driven in alternation.
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        script_dir = Path(scratch)
        try:
            for server in servers:
                server.start()
                load(server.url, "GET", 2, args.connections, script_dir)  # warm-up
            for round_number in range(args.rounds):
                for method in ("GET", "PUT"):
                    order = servers[round_number % count:] + servers[:round_number % count]
                    for server in order:
                        result = load(server.url, method, args.seconds, args.connections,
                                      script_dir)
                        results.setdefault((server.label, method), []).append(result)
                        print(f"  round {round_number + 1} {method:3} {server.label:9} "
                              f"{result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.2f} ms  "
                              f"p99 {result['p99_ms']:6.2f} ms  errors {result['errors']}")
        finally:
            for server in servers:
                server.stop()
    return starts, rss, results


def judge(starts: dict[str, list[float]], rss: dict[str, list[float]],
          results: dict[tuple[str, str], list[dict]]) -> int:
    failures = []

    def verdict(name: str, ratio: float, ok: bool, bound: str) -> str:
        if not ok:
            failures.append(name)
        return f"{ratio:5.2f} {bound:7} {'ok' if ok else 'MISSED'}"

    def med(label: str, method: str, key: str) -> float:
        return median([r[key] for r in results[(label, method)]])

    print(f"\nmedians {'':17} {'app':>8} {'baseline':>9}   app / baseline")
    for method in ("GET", "PUT"):
        if sum(r["errors"] for label in ("app", "baseline") for r in results[(label, method)]):
            failures.append(f"{method} errors")
        for key, label in (("rps", "req/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")):
            app, base = med("app", method, key), med("baseline", method, key)
            ratio = app / base
            if key == "rps":
                cell = verdict(f"{method} req/s", ratio, ratio >= THROUGHPUT_FLOOR,
                               f">= {THROUGHPUT_FLOOR}")
            elif key == "p99_ms":
                cell = verdict(f"{method} p99", ratio, ratio <= P99_CEILING, f"<= {P99_CEILING}")
            else:
                cell = f"{ratio:5.2f}"
            print(f"{method} {label:20} {app:8.2f} {base:9.2f}   {cell}")
        paired = " ".join(f"{a['rps'] / b['rps']:.2f}" for a, b in
                          zip(results[("app", method)], results[("baseline", method)]))
        runs = [r["rps"] for r in results[("app", method)]]
        print(f"{'':25}(app spread across rounds {(max(runs) - min(runs)) / median(runs):.0%};"
              f" app / baseline req/s by round: {paired})")
    for name, values, unit, scale in (("cold start", starts, "ms", 1000),
                                      ("RSS after 2000 req", rss, "MiB", 1)):
        app, base = (median(values[label]) * scale for label in ("app", "baseline"))
        print(f"{name + ' ' + unit:24} {app:8.1f} {base:9.1f}   "
              f"{verdict(name, app / base, app <= START_AND_RSS * base, f'<= {START_AND_RSS}')}")
    if failures:
        print(f"\nMISSED: {', '.join(failures)}")
        return 1
    print("\nall targets met")
    return 0


def compare_servers(servers: list[Server], starts: dict[str, list[float]],
                    rss: dict[str, list[float]],
                    results: dict[tuple[str, str], list[dict]]) -> int:
    first = servers[0].label
    print(f"\nmedians, and each against {first}")
    for server in servers:
        cells = []
        for method in ("GET", "PUT"):
            for key in ("rps", "p99_ms"):
                value = median([r[key] for r in results[(server.label, method)]])
                ref = median([r[key] for r in results[(first, method)]])
                cells.append(f"{method} {key} {value:8.2f} ({value / ref:4.2f})")
        start = median(starts[server.label]) * 1000
        memory = median(rss[server.label])
        print(f"{server.label:9} " + "  ".join(cells) +
              f"  start {start:6.1f} ms  RSS {memory:5.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
