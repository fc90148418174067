"""`nox -s capacity`: what a request costs here, the inputs of docs/capacity.md.

On a PostgreSQL cluster of its own and a real PgBouncer (tests/pgbouncer.py),
with wrk as the load generator, it measures and prints:

1. per process, direct to PostgreSQL (DB_POOLER=none) and with the statement
   timeout set per statement (DB_POOLER=transaction, SET LOCAL): requests per
   second, p50/p99, the service's CPU per request (so requests per CPU second),
   and the database's: server CPU and statements per request, GET, PUT and the
   9:1 mix;
2. scale-out: 1, 2 and 4 processes behind one PgBouncer, the 9:1 mix on all of
   them, with where the machine's CPU went (2 cores here: the curve bends where
   the machine, not the service, is full);
3. growing the pool: the first requests after an idle spell, a burst as wide as
   the pool, with DB_POOL_MIN_SIZE 1 and equal to DB_POOL_SIZE, and with the
   process frozen while idle (SIGSTOP), as Cloud Run throttles an idle instance's
   CPU: how many connections the idle spell gave back, and what the burst paid.

The figures go to build/capacity.json too. Nothing here is a pass/fail gate; a
run with any error or 5xx exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx2 as httpx
import psycopg

from benchmarks.run import LUA, LUA_DONE, LUA_NAME, NAMES, letters_name, wrk_run
from tests.conftest import migrate
from tests.live_server import free_port, stop_process, wait_ready
from tests.pgbouncer import PgBouncer, ThrowawayPostgres

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LUA["MIX"] = LUA_NAME + f"""
request = function()
  local path = "/hello/" .. name(math.random(1, {NAMES}))
  if math.random(1, 10) == 1 then
    local body = string.format('{{"dateOfBirth":"19%02d-%02d-%02d"}}',
      math.random(0, 99), math.random(1, 12), math.random(1, 28))
    return wrk.format("PUT", path, {{["Content-Type"] = "application/json"}}, body)
  end
  return wrk.format("GET", path)
end
""" + LUA_DONE


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class App:
    """python -m app, its output discarded (its access log would cost the run)."""

    def __init__(self, database_url: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": database_url, "HOST": "127.0.0.1",
                    "PORT": str(self.port), "METRICS_PORT": "0", "LOG_LEVEL": "WARNING",
                    "LOG_FORMAT": "json", **env}
        self.process = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.url, 60, lambda: self.process.poll() is None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case a test froze it
        stop_process(self.process, timeout=20)


@contextmanager
def apps(count: int, database_url: str, **env: str) -> Iterator[list[App]]:
    started: list[App] = []
    try:
        for _ in range(count):
            started.append(App(database_url, **env))
        yield started
    finally:
        for app in started:
            app.stop()


class Database:
    """The service's database as the benchmark watches it, on its own connection."""

    def __init__(self, url: str) -> None:
        self.connection = psycopg.connect(url, autocommit=True)

    def backends(self, application: str = "%") -> list[int]:
        return [row[0] for row in self.connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
            "AND application_name LIKE %s", (application,)).fetchall()]

    def statements(self) -> dict[tuple[int, str], int]:
        """pg_stat_statements' calls: updated when each statement ends, so exact now.
        By queryid: a prepared and a client-bound statement share their text."""
        rows = self.connection.execute(
            "SELECT queryid, query, calls FROM pg_stat_statements s JOIN pg_database d "
            "ON d.oid = s.dbid WHERE d.datname = current_database()").fetchall()
        return {(queryid, query): calls for queryid, query, calls in rows}


def statements_per_request(before: dict[tuple[int, str], int],
                           after: dict[tuple[int, str], int], requests: int) -> tuple[float, float]:
    """(statements of the service, SET LOCALs riding in the same message) per request."""
    moved = {key: calls - before.get(key, 0) for key, calls in after.items()}
    service = sum(calls for (_, query), calls in moved.items()
                  if query.lstrip().upper().startswith(("SELECT DATE_OF_BIRTH", "INSERT INTO USERS",
                                                        "DELETE FROM USERS")))
    set_local = sum(calls for (_, query), calls in moved.items()
                    if query.upper().startswith("SET LOCAL"))
    return service / requests, set_local / requests


def measure(targets: list[App], method: str, seconds: int, connections: int, scratch: Path,
            database: Database, extra_pids: tuple[int, ...] = ()) -> dict:
    """wrk against every target at once; CPU of each party over the same window."""
    backends = database.backends()
    pids = {"service": [t.process.pid for t in targets], "postgres": backends,
            "pgbouncer": list(extra_pids)}
    before_cpu = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
    before_statements = database.statements()
    started = time.monotonic()
    outcomes: list[dict] = []
    load_cpu_before = os.times()
    # A script directory per wrk: each writes its script there.
    directories = [Path(tempfile.mkdtemp(dir=scratch)) for _ in targets]

    async def together() -> list[dict]:
        return await asyncio.gather(*(
            asyncio.to_thread(wrk_run, t.url, method, seconds, connections, directory)
            for t, directory in zip(targets, directories)))

    outcomes = asyncio.run(together())
    wall = time.monotonic() - started
    load_cpu_after = os.times()
    after_cpu = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
    requests = sum(o["rps"] for o in outcomes) * seconds
    cpu = {name: after_cpu[name] - before_cpu[name] for name in pids}
    cpu["wrk"] = load_cpu_after.children_user + load_cpu_after.children_system - (
        load_cpu_before.children_user + load_cpu_before.children_system)
    statements, set_local = statements_per_request(before_statements, database.statements(),
                                                   int(requests))
    return {
        "method": method, "processes": len(targets),
        "rps": sum(o["rps"] for o in outcomes),
        "p50_ms": statistics.median(o["p50_ms"] for o in outcomes),
        "p99_ms": max(o["p99_ms"] for o in outcomes),
        "errors": sum(o["errors"] for o in outcomes),
        "service_cpu_ms": 1000 * cpu["service"] / requests,
        "postgres_cpu_ms": 1000 * cpu["postgres"] / requests,
        "pgbouncer_cpu_ms": 1000 * cpu["pgbouncer"] / requests,
        "machine_busy": sum(cpu.values()) / (wall * (os.cpu_count() or 1)),
        "statements": statements, "set_local": set_local,
    }


def row(label: str, r: dict) -> str:
    per_cpu = 1000 / r["service_cpu_ms"] if r["service_cpu_ms"] else 0
    return (f"{label:34} {r['rps']:7.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
            f"{r['service_cpu_ms']:7.3f} {per_cpu:7.0f} {r['postgres_cpu_ms']:7.3f} "
            f"{r['pgbouncer_cpu_ms']:7.3f} {r['statements']:5.2f} {r['set_local']:5.2f} "
            f"{r['machine_busy']:5.0%} "
            f"{r['errors']:4d}")


HEADER = (f"{'':34} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'app':>7} {'req/':>7} "
          f"{'pg':>7} {'bouncer':>7} {'stmt/':>5} {'SET/':>5} {'busy':>5} {'err':>4}\n"
          f"{'':34} {'':>7} {'':>7} {'':>7} {'ms/req':>7} {'cpu·s':>7} {'ms/req':>7} "
          f"{'ms/req':>7} {'req':>5} {'req':>5} {'':>5} {'':>4}")


async def burst(url: str, width: int) -> list[float]:
    """``width`` GETs at once, each on its own connection; their latencies."""
    async def one(client: httpx.AsyncClient, i: int) -> float:
        began = time.perf_counter()
        response = await client.get(f"/hello/{letters_name(1 + i)}")
        assert response.status_code == 200, response.text  # nosec B101
        return time.perf_counter() - began

    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        await asyncio.gather(*(client.get("/healthz") for _ in range(width)))  # HTTP warm
        return list(await asyncio.gather(*(one(client, i) for i in range(width))))


class DelayingRelay:
    """A TCP relay to PostgreSQL that holds every chunk ``delay`` seconds each way, as
    the network to Cloud SQL does, so a burst keeps statements in flight long enough
    to need the whole pool, and a new connection pays its round trips."""

    def __init__(self, port: int, delay: float) -> None:
        self.target_port, self.delay = port, delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),),
                                       daemon=True)
        self.thread.start()
        self.ready.wait(10)

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        self.relays: set[asyncio.Task] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.ready.set()
        async with server:
            await self.stop.wait()
        for writer in self.writers:  # each pipe then sees its end and returns
            writer.close()
        await asyncio.wait(self.relays, timeout=5) if self.relays else None

    async def _relay(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # nosec B101
        self.relays.add(task)
        task.add_done_callback(self.relays.discard)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.update((client_writer, writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    await asyncio.sleep(self.delay)
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=10)


# One way; a round trip to Cloud SQL in the same region, through the Auth Proxy, is
# about a millisecond.
RELAY_DELAY = 0.0005


def growth(database_url: str, database: Database, pool: int, rounds: int) -> dict:
    """The first requests after an idle spell, with and without a pool to grow; and how
    many connections the spell gave back, running or frozen (Cloud Run's throttling)."""
    idle_spell = pool + 2.0  # DB_POOL_MAX_IDLE=1: one connection given back a second
    cases = {"min = size (no growth)": {"min": pool, "freeze": False, "idle": 2.0},
             "min 1 (grows on demand)": {"min": 1, "freeze": False, "idle": idle_spell},
             "min 1, frozen while idle": {"min": 1, "freeze": True, "idle": idle_spell}}
    results = {}
    relay = DelayingRelay(int(database_url.rsplit(":", 1)[1].split("/", 1)[0]), RELAY_DELAY)
    relayed = database_url.replace(f":{relay.target_port}/", f":{relay.port}/")
    for label, case in cases.items():
        latencies: list[float] = []
        before: list[int] = []
        after: list[int] = []
        with apps(1, relayed, DB_POOL_SIZE=str(pool), DB_POOL_MIN_SIZE=str(case["min"]),
                  DB_POOL_MAX_IDLE="1") as (app,):
            asyncio.run(burst(app.url, pool))  # grown once
            for _ in range(rounds):
                before.append(len(database.backends("hello-birthday")))  # the pool's only
                if case["freeze"]:
                    app.process.send_signal(signal.SIGSTOP)
                time.sleep(float(case["idle"]))
                after.append(len(database.backends("hello-birthday")))
                if case["freeze"]:
                    app.process.send_signal(signal.SIGCONT)  # a request arrives: CPU again
                latencies += asyncio.run(burst(app.url, pool))
        ordered = sorted(latencies)
        results[label] = {
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[math.ceil(len(ordered) * 0.99) - 1],  # nearest rank
            "max_ms": 1000 * ordered[-1],
            "held_before_idle": statistics.median(before),
            "held_after_idle": statistics.median(after),
            "samples": len(ordered),
        }
    relay.close()
    return results


def statement_forms(url: str, samples: int) -> dict:
    """One connection per form, one statement at a time: the round trip seen by the
    client and the server's CPU per statement (its backend's), for the GET's select.
    The forms alternate in chunks, so a slow spell of the machine hits them all."""
    select = "SELECT date_of_birth FROM users WHERE username = %s"
    forms = {
        "prepared (DB_POOLER none/session)": (psycopg.AsyncCursor, select, True),
        "client-bound, no SET LOCAL": (psycopg.AsyncClientCursor, select, None),
        "client-bound + SET LOCAL (transaction)": (
            psycopg.AsyncClientCursor, "SET LOCAL statement_timeout = 5000; " + select, None),
    }

    async def run() -> dict:
        connections = {}
        for label, (factory, _, _) in forms.items():
            connection = await psycopg.AsyncConnection.connect(
                url, autocommit=True, prepare_threshold=None, cursor_factory=factory)
            pid = (await (await connection.execute("SELECT pg_backend_pid()")).fetchone())[0]
            connections[label] = (connection, pid)
        wall = {label: 0.0 for label in forms}
        cpu = {label: 0.0 for label in forms}
        chunk = 250
        for start in range(0, samples, chunk):
            for label, (_, query, prepare) in forms.items():
                connection, pid = connections[label]
                cpu_before = cpu_seconds(pid)
                began = time.perf_counter()
                for i in range(start, start + chunk):
                    cursor = await connection.execute(query, (letters_name(1 + i % NAMES),),
                                                      prepare=prepare)
                    if "SET LOCAL" in query:
                        cursor.nextset()
                    await cursor.fetchall()
                wall[label] += time.perf_counter() - began
                cpu[label] += cpu_seconds(pid) - cpu_before
        for connection, _ in connections.values():
            await connection.close()
        return {label: {"round_trip_us": 1e6 * wall[label] / samples,
                        "server_cpu_us": 1e6 * cpu[label] / samples} for label in forms}

    return asyncio.run(run())


def connect_cost(url: str, samples: int = 100) -> dict:
    """One new connection as the pool makes it (connect, then SET statement_timeout)."""
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        with psycopg.connect(url, autocommit=True, application_name="capacity") as connection:
            connection.execute("SET statement_timeout = 5000")
        times.append(time.perf_counter() - began)
    times.sort()
    return {"p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[int(samples * 0.99)]}


def seed(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO users (username, date_of_birth) VALUES (%s, %s)",
                [(letters_name(i), f"19{i % 100:02d}-{1 + i % 12:02d}-{1 + i % 28:02d}")
                 for i in range(1, NAMES + 1)])
        connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--growth-rounds", type=int, default=13)  # 104 samples a case
    parser.add_argument("--statements", type=int, default=5000)
    parser.add_argument("--parts", default="single,growth,scale",
                        help="which of the three to run, comma-separated")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    # Stopped from outside (a timeout, CI), it still stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not shutil.which("wrk"):
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    print(f"{os.cpu_count()} CPUs; wrk, {args.seconds}s x {args.connections} connections per "
          f"process; pools of {args.pool_size}; os load {os.getloadavg()[0]:.1f} at start")
    results: dict = {"cpus": os.cpu_count()}
    postgres = ThrowawayPostgres(max_connections=100,
                                 settings={"shared_preload_libraries": "pg_stat_statements"})
    bouncer = None
    try:
        url = postgres.create_database("hello")
        migrate(url.replace("postgresql://", "postgresql+psycopg://", 1))
        seed(url)
        database = Database(url)
        scratch = Path(tempfile.mkdtemp(prefix="hb-capacity-"))
        pool = {"DB_POOL_SIZE": str(args.pool_size), "DB_POOL_MIN_SIZE": str(args.pool_size)}

        if "single" in parts:
            results["single"] = single_process(args, url, database, scratch, pool)
        if "growth" in parts:
            results.update(growth_part(args, url, database))
        if "scale" in parts:
            bouncer = PgBouncer(postgres.port, server_connections=args.pool_size)
            results["scale_out"] = scale_out(args, bouncer, database, scratch, pool)
        shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if bouncer is not None:
            bouncer.stop()
        postgres.stop()
    return finish(results)


def median_of(measured: list[dict]) -> dict:
    """Each figure's median over the rounds; errors summed."""
    r = {key: statistics.median(m[key] for m in measured) if isinstance(value, float) else value
         for key, value in measured[0].items()}
    r["errors"] = sum(m["errors"] for m in measured)
    return r


def single_process(args: argparse.Namespace, url: str, database: Database, scratch: Path,
                   pool: dict[str, str]) -> list[dict]:
    print(f"\n1. One process, medians of {args.rounds} rounds, the two modes in alternation "
          "(the mix is 9 GET : 1 PUT)\n" + HEADER)
    runs: dict[tuple[str, str], list[dict]] = {}
    with apps(1, url, DB_POOLER="none", **pool) as direct, \
            apps(1, url, DB_POOLER="transaction", **pool) as per_statement:
        for targets in (direct, per_statement):
            wrk_run(targets[0].url, "GET", 1, args.connections, scratch)  # warm-up
        for round_number in range(args.rounds):
            for method in ("GET", "PUT", "MIX"):
                order = [("none", direct), ("transaction", per_statement)]
                for pooler, targets in order[round_number % 2:] + order[:round_number % 2]:
                    runs.setdefault((pooler, method), []).append(measure(
                        targets, method, args.seconds, args.connections, scratch, database))
    single = []
    for (pooler, method), measured in runs.items():
        r = median_of(measured)
        r["pooler"] = pooler
        single.append(r)
    for pooler, label in (("none", "direct"), ("transaction", "SET LOCAL per statement")):
        for r in single:
            if r["pooler"] == pooler:
                print(row(f"{r['method']} {label}", r))
    return single


def growth_part(args: argparse.Namespace, url: str, database: Database) -> dict:
    relay = DelayingRelay(int(url.rsplit(":", 1)[1].split("/", 1)[0]), RELAY_DELAY)
    results: dict = {"connect": connect_cost(url.replace(f":{relay.target_port}/",
                                                         f":{relay.port}/"))}
    relay.close()
    print(f"\n2. Growing the pool, with {2000 * RELAY_DELAY:.0f} ms of network round trip "
          f"added (a relay): a new connection costs p50 {results['connect']['p50_ms']:.2f} ms, "
          f"p99 {results['connect']['p99_ms']:.2f} ms. A burst of {args.pool_size} GETs after "
          f"an idle spell ({args.growth_rounds} rounds; DB_POOL_MAX_IDLE=1):")
    results["growth"] = growth(url, database, args.pool_size, args.growth_rounds)
    print(f"{'':28} {'pool before':>11} {'after idle':>10} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7}")
    for label, g in results["growth"].items():
        print(f"{label:28} {g['held_before_idle']:11.0f} {g['held_after_idle']:10.0f} "
              f"{g['p50_ms']:7.2f} {g['p99_ms']:7.2f} {g['max_ms']:7.2f}")
    results["forms"] = statement_forms(url, args.statements)
    print(f"\n   The GET's statement alone, {args.statements} times on one connection per form "
          f"(one round trip each):\n{'':42} {'round trip us':>13} {'server CPU us':>13}")
    for label, f in results["forms"].items():
        print(f"{label:42} {f['round_trip_us']:13.1f} {f['server_cpu_us']:13.1f}")
    return results


def scale_out(args: argparse.Namespace, bouncer: PgBouncer, database: Database, scratch: Path,
              pool: dict[str, str]) -> list[dict]:
    print(f"\n3. Scale-out behind one PgBouncer, medians of {args.rounds} rounds "
          f"({args.pool_size} server connections), the 9:1 mix; busy: the share of the "
          f"machine's {os.cpu_count()} CPUs these processes, PostgreSQL, PgBouncer and wrk used"
          "\n" + HEADER)
    scale = []
    for count in (1, 2, 4):
        with apps(count, bouncer.url("hello"), DB_POOLER="transaction", **pool) as targets:
            for target in targets:
                wrk_run(target.url, "GET", 1, 4, scratch)
            measured = [measure(targets, "MIX", args.seconds, args.connections, scratch,
                                database, extra_pids=(bouncer.pid,)) for _ in range(args.rounds)]
            r = median_of(measured)
            scale.append(r)
            print(row(f"{count} process{'es' if count > 1 else ''}", r))
    return scale


def finish(results: dict) -> int:
    out = ROOT / "build" / "capacity.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}; os load {os.getloadavg()[0]:.1f} at the end")
    failed = sum(r["errors"] for r in results.get("single", []) + results.get("scale_out", []))
    if failed:
        print(f"{failed} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
