"""Readiness as docs/api.md defines it: the rules, then each on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from app.database import DatabaseUnavailable
from app.health import Readiness
from app.main import create_app
from app.schema import HEAD, schema_verdict
from tests.conftest import ROOT, make_settings, migrate, users_locked
from tests.live_server import LiveServer, free_port, wait_ready

CHAIN = ("a1", "b2", "c3")


# --- the rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("stored, ready", [
    ({"c3"}, True),            # at head
    ({"zz9"}, True),           # a revision this code does not know: a later release's
    ({"c3", "zz9"}, True),
    ({"b2"}, False),           # a known ancestor: older than this code needs
    ({"a1"}, False),
    (set(), False),            # no alembic_version row: never migrated
])
def test_schema_verdict(stored, ready):
    assert (schema_verdict(stored, CHAIN) is None) is ready


class Schema:
    """What read_schema returns next: revisions, or an outage."""

    def __init__(self, revisions: set[str]) -> None:
        self.revisions: set[str] | None = revisions
        self.reads = 0
        self.delay = 0.0

    async def __call__(self) -> set[str]:
        self.reads += 1
        await asyncio.sleep(self.delay)
        if self.revisions is None:
            raise DatabaseUnavailable("down")
        return self.revisions


def run(coroutine):
    return asyncio.run(coroutine)


def test_ready_at_head_and_the_answer_is_cached():
    schema = Schema({HEAD})

    async def scenario():
        readiness = Readiness(schema, recheck_seconds=60)
        return [await readiness.check() for _ in range(20)]

    assert run(scenario()) == [None] * 20
    assert schema.reads == 1, "probe traffic must not reach the database on every call"


def test_a_good_answer_is_cached_for_10_seconds_by_default(monkeypatch):
    """docs/api.md: /readyz "caches a good answer for 10 s"."""
    now = [1000.0]
    monkeypatch.setattr("app.health.time.monotonic", lambda: now[0])
    schema = Schema({HEAD})

    async def scenario():
        readiness = Readiness(schema)
        answers = [await readiness.check()]
        schema.revisions = set()  # the schema is gone: seen only once the cache runs out
        now[0] += 9.9
        answers.append(await readiness.check())
        now[0] += 0.2
        answers.append(await readiness.check())
        return answers

    cached, still_cached, rechecked = run(scenario())
    assert cached is None and still_cached is None
    assert rechecked and "no schema" in rechecked
    assert schema.reads == 2


def test_not_ready_until_migrated_then_ready_at_once():
    schema = Schema(set())

    async def scenario():
        readiness = Readiness(schema, recheck_seconds=60)
        before = await readiness.check()
        schema.revisions = {HEAD}
        return before, await readiness.check()

    before, after = run(scenario())
    assert before and "no schema" in before
    assert after is None


def test_an_outage_after_the_schema_was_seen_keeps_it_ready():
    schema = Schema({HEAD})

    async def scenario():
        readiness = Readiness(schema, recheck_seconds=0)
        first = await readiness.check()
        schema.revisions = None  # the database goes away
        return first, [await readiness.check() for _ in range(3)]

    first, during = run(scenario())
    assert first is None and during == [None] * 3
    assert schema.reads >= 3  # it did look, and kept its verdict


def test_an_outage_before_the_schema_was_seen_is_not_ready():
    schema = Schema(None)
    reason = run(Readiness(schema).check())
    assert reason and "unreachable" in reason


def test_a_schema_rolled_back_below_head_turns_it_unready():
    schema = Schema({HEAD})

    async def scenario():
        readiness = Readiness(schema, recheck_seconds=0)
        first = await readiness.check()
        schema.revisions = set()  # someone ran `alembic downgrade base`
        return first, await readiness.check()

    first, after = run(scenario())
    assert first is None and after is not None


def test_draining_is_unready_at_once_whatever_the_schema():
    schema = Schema({HEAD})

    async def scenario():
        readiness = Readiness(schema)
        assert await readiness.check() is None
        readiness.draining = True
        return await readiness.check()

    assert run(scenario()) == "shutting down"


def test_a_slow_schema_read_never_holds_the_probe():
    schema = Schema({HEAD})
    schema.delay = 5.0

    async def scenario():
        readiness = Readiness(schema, answer_within=0.2)
        started = time.monotonic()
        reason = await readiness.check()
        return reason, time.monotonic() - started

    reason, elapsed = run(scenario())
    assert elapsed < 0.5
    assert reason == "starting"  # nothing seen yet: not ready, and said quickly


# --- on PostgreSQL ------------------------------------------------------------------------

def set_revision(url: str, *revisions: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM alembic_version"))
        for revision in revisions:
            connection.execute(sa.text("INSERT INTO alembic_version VALUES (:r)"), {"r": revision})
    engine.dispose()


def test_ready_on_a_schema_a_later_release_migrated(postgres_server):
    url = postgres_server.create_database()
    migrate(url)
    set_revision(url, "9999_from_a_later_release")
    with TestClient(create_app(make_settings(url))) as client:
        assert client.get("/readyz").status_code == 200


def test_unready_with_no_alembic_version_row(postgres_server):
    url = postgres_server.create_database()
    migrate(url)
    set_revision(url)
    with TestClient(create_app(make_settings(url))) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "no schema yet" in response.json()["detail"]


@pytest.mark.slow
def test_readyz_answers_within_a_second_while_the_pool_is_saturated(empty_postgres):
    """Every pooled connection is held by a request stuck behind a table lock;
    /readyz reads the schema on its own connection and answers at once."""
    live = LiveServer(empty_postgres, DB_POOL_SIZE="1", DB_STATEMENT_TIMEOUT="4",
                      DB_POOL_TIMEOUT="3").start()
    blocked: list[int] = []
    try:
        with users_locked(empty_postgres):
            def stuck_request() -> None:
                blocked.append(httpx.get(live.url + "/hello/Stuck", timeout=20).status_code)

            requests = [threading.Thread(target=stuck_request) for _ in range(6)]
            for thread in requests:
                thread.start()
            time.sleep(0.5)  # the one pooled connection now waits on the lock
            timings = []
            with httpx.Client(base_url=live.url, timeout=5) as client:
                for _ in range(5):
                    started = time.monotonic()
                    status = client.get("/readyz").status_code
                    timings.append((status, time.monotonic() - started))
                    time.sleep(0.2)
        for thread in requests:
            thread.join(timeout=20)
    finally:
        live.stop()
    assert all(status == 200 for status, _ in timings), timings
    assert max(elapsed for _, elapsed in timings) < 1.0, timings
    assert blocked and set(blocked) <= {404, 503}


@pytest.mark.slow
def test_the_package_alone_knows_its_head(postgres_server, tmp_path):
    """As installed from a wheel: app/ with no migrations/ beside it. It must
    still refuse an unmigrated database and accept a migrated one."""
    shutil.copytree(ROOT / "app", tmp_path / "app",
                    ignore=shutil.ignore_patterns("__pycache__"))
    url = postgres_server.create_database()  # never migrated
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "HOST": "127.0.0.1", "PORT": str(port),
           "PYTHONPATH": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status = httpx.get(base + "/readyz", timeout=2).status_code
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        assert status == 503
        migrate(url)
        wait_ready(base, timeout=15)
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_the_migration_job_of_an_older_release_succeeds_on_a_newer_schema(postgres_server):
    """helm rollback and an ArgoCD sync to an older commit run the older image's
    `alembic upgrade head` on a schema a later release migrated."""
    url = postgres_server.create_database()
    migrate(url)
    set_revision(url, "9999_from_a_later_release")
    result = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT,
                            env={**os.environ, "DATABASE_URL": url},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "newer than this release's migrations: nothing to do" in result.stdout
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    engine.dispose()
    assert stored == [("9999_from_a_later_release",)]
