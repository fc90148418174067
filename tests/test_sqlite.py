"""The embedded SQLite mode when its file misbehaves: a statement the service gave
up on changes nothing afterwards, and a corrupt or missing file is a 503 that
readiness reports. docs/api.md, sections Errors and Recovery."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from app.database import DatabaseLost, DatabaseUnavailable, SqliteDatabase, _SqliteCall
from app.main import create_app
from tests.conftest import make_settings

JSON = {"Content-Type": "application/json"}
BODY = '{"dateOfBirth": "1991-02-03"}'


def stored(url: str) -> dict[str, str]:
    connection = sqlite3.connect(url.split(":///", 1)[1])
    try:
        return dict(connection.execute("SELECT username, date_of_birth FROM users").fetchall())
    finally:
        connection.close()


@contextmanager
def file_locked(url: str, seconds: float) -> Iterator[None]:
    """Another process's transaction holds the file's exclusive lock for ``seconds``
    from entry (released by a timer, so the block can wait past it)."""
    holder = sqlite3.connect(url.split(":///", 1)[1], isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(seconds, holder.rollback)
    release.start()
    try:
        yield
    finally:
        release.join()
        holder.close()


def test_a_write_answered_unavailable_is_never_carried_out_later(sqlite_url):
    """Writes queue for worker threads behind a locked file (here one worker, so
    the queue is certain). Each call has a deadline; one that passed it answers
    503 (DatabaseUnavailable), and its statement must not run once the lock is
    gone. Before, the thread of a call that timed out kept waiting on the lock
    and committed after the 503."""
    seed = sqlite3.connect(sqlite_url.split(":///", 1)[1])
    seed.executemany("INSERT INTO users (username, date_of_birth) VALUES (?, '1990-01-01')",
                     [(f"Keep{i}",) for i in range(3)])
    seed.commit()
    seed.close()
    # A call may take 0.25 + 0.5 s; the file is locked for 0.85 s.
    database = SqliteDatabase(make_settings(sqlite_url, db_pool_timeout=0.25,
                                            db_statement_timeout=0.5))

    async def scenario() -> list[tuple[str, str, object]]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
        calls = [("PUT", f"New{i}", database.upsert(f"New{i}", date(1991, 2, 3)))
                 for i in range(3)]
        calls += [("DELETE", f"Keep{i}", database.delete(f"Keep{i}")) for i in range(3)]
        with file_locked(sqlite_url, 0.85):
            outcomes = await asyncio.gather(*(call for _, _, call in calls),
                                            return_exceptions=True)
        await asyncio.sleep(1.0)  # any thread still waiting has had the lock by now
        return [(method, name, outcome) for (method, name, _), outcome in zip(calls, outcomes)]

    outcomes = asyncio.run(scenario())
    after = stored(sqlite_url)
    unavailable = [(method, name) for method, name, outcome in outcomes
                   if isinstance(outcome, DatabaseUnavailable)]
    assert len(unavailable) == 6, outcomes  # the lock outlived every deadline
    for method, name in unavailable:
        if method == "PUT":
            assert name not in after, f"PUT {name} answered 503 and was stored afterwards"
        else:
            assert name in after, f"DELETE {name} answered 503 and was carried out afterwards"


def test_a_write_that_got_the_lock_in_time_is_stored_and_answered(sqlite_url):
    """The other side of the deadline: a write that waits on the lock but gets it
    before its deadline is committed and answered, never reported lost."""
    database = SqliteDatabase(make_settings(sqlite_url, db_pool_timeout=0.5,
                                            db_statement_timeout=1.0))

    async def scenario() -> None:
        with file_locked(sqlite_url, 0.4):
            await database.upsert("Patient", date(1990, 5, 6))

    asyncio.run(scenario())
    assert stored(sqlite_url) == {"Patient": "1990-05-06"}


def test_giving_up_interrupts_a_running_statement(sqlite_url):
    """sqlite3's Connection.interrupt(): a statement still running when the call
    is given up stops in the database, in well under its own run time."""
    database = SqliteDatabase(make_settings(sqlite_url))
    call = _SqliteCall(time.monotonic() + 60)
    slow = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < 1000000000) SELECT count(*) FROM n")
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(database._run(call, slow, (), fetch=True, write=False))
        except sqlite3.Error as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    while call.connection is None:
        time.sleep(0.01)
    time.sleep(0.2)
    started = time.monotonic()
    assert call.abandon()
    thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - started < 1.0
    assert isinstance(outcome[0], sqlite3.OperationalError) and "interrupt" in str(outcome[0])


@pytest.fixture
def sqlite_client(sqlite_url: str) -> Iterator[tuple[TestClient, Path]]:
    app = create_app(make_settings(sqlite_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        assert client.put("/hello/Alice", headers=JSON, content=BODY).status_code == 204
        yield client, Path(sqlite_url.split(":///", 1)[1])


def assert_all_unavailable(client: TestClient, reason: str) -> None:
    for method, kwargs in [("GET", {}), ("PUT", {"headers": JSON, "content": BODY}),
                           ("DELETE", {})]:
        response = client.request(method, "/hello/Alice", **kwargs)
        assert response.status_code == 503, (method, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"].isdigit()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert reason in ready.json()["detail"]
    assert "/" not in ready.json()["detail"]  # never the file's path


def test_a_corrupt_file_is_503_and_readiness_says_so(sqlite_client):
    client, path = sqlite_client
    path.write_bytes(b"not a database, " * 512)
    # Readiness caches a good answer for its recheck interval: ask past it.
    client.app.state.readiness.recheck_seconds = 0
    assert_all_unavailable(client, "damaged")


def test_a_deleted_file_is_503_never_recreated_and_readiness_says_so(sqlite_client):
    client, path = sqlite_client
    path.unlink()
    client.app.state.readiness.recheck_seconds = 0
    assert_all_unavailable(client, "missing")
    assert not path.exists(), "the service recreated the deleted file"


def test_a_restored_file_makes_readiness_ready_again(sqlite_client):
    client, path = sqlite_client
    saved = path.read_bytes()
    path.unlink()
    client.app.state.readiness.recheck_seconds = 0
    assert client.get("/readyz").status_code == 503
    path.write_bytes(saved)
    assert client.get("/readyz").status_code == 200
    assert client.get("/hello/Alice").status_code == 200


def test_a_missing_file_at_start_up_is_lost_not_created(tmp_path):
    database = SqliteDatabase(make_settings(f"sqlite:///{tmp_path / 'never.sqlite3'}"))
    with pytest.raises(DatabaseLost, match="missing"):
        asyncio.run(database.schema_revisions())
    assert not (tmp_path / "never.sqlite3").exists()
