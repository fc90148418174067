"""Behaviour only PostgreSQL can prove: atomic upserts under concurrency."""

from __future__ import annotations

import asyncio
from datetime import date

import sqlalchemy as sa

from app.database import open_database
from tests.conftest import make_settings


def rows(url: str) -> list[tuple]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        result = connection.execute(sa.text("SELECT username, date_of_birth FROM users")).all()
    engine.dispose()
    return [tuple(row) for row in result]


def test_concurrent_upserts_for_one_name_leave_one_row(empty_postgres):
    async def scenario():
        database = open_database(make_settings(empty_postgres, db_pool_size=20))
        await database.open()
        births = [date(1990, 1, 1 + i % 28) for i in range(60)]
        try:
            results = await asyncio.gather(
                *(database.upsert("same", birth) for birth in births), return_exceptions=True
            )
        finally:
            await database.close()
        return births, results

    births, results = asyncio.run(scenario())
    assert [r for r in results if r is not None] == []
    stored = rows(empty_postgres)
    assert len(stored) == 1
    assert stored[0][0] == "same" and stored[0][1] in births


def test_upsert_updates_the_timestamp_not_the_creation_time(empty_postgres):
    async def scenario():
        database = open_database(make_settings(empty_postgres))
        await database.open()
        try:
            await database.upsert("tim", date(1990, 1, 1))
            await asyncio.sleep(0.05)
            await database.upsert("tim", date(1991, 1, 1))
        finally:
            await database.close()

    asyncio.run(scenario())
    engine = sa.create_engine(empty_postgres, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        created, updated, born = connection.execute(
            sa.text("SELECT created_at, updated_at, date_of_birth FROM users")).one()
    engine.dispose()
    assert updated > created
    assert born == date(1991, 1, 1)


def test_readyz_tells_an_unmigrated_database_from_an_unreachable_one(postgres_server):
    from starlette.testclient import TestClient

    from app.main import create_app

    url = postgres_server.create_database()  # reachable, never migrated
    with TestClient(create_app(make_settings(url))) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "no schema yet" in response.json()["detail"]


def test_readyz_turns_200_once_migrated_to_head(postgres_server):
    from starlette.testclient import TestClient

    from app.main import create_app
    from tests.conftest import migrate

    url = postgres_server.create_database()
    migrate(url, "base")
    with TestClient(create_app(make_settings(url))) as client:
        assert client.get("/readyz").status_code == 503
        migrate(url)
        assert client.get("/readyz").status_code == 200
