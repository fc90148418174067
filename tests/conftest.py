"""Fixtures: a throwaway PostgreSQL database per run, a SQLite file per test, a
controllable clock, and an app client per backend."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from starlette.testclient import TestClient

from app.main import create_app
from app.settings import Settings, normalise_database_url

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def alembic_config(database_url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


class FrozenClock:
    """The service's notion of now, set by each test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def set(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _server_url() -> str:
    return normalise_database_url(os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL))


class PostgresServer:
    """Creates and drops databases on the server named by TEST_DATABASE_URL."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT",
                                      poolclass=sa.pool.NullPool)
        self.created: list[str] = []

    def create_database(self) -> str:
        name = f"hello_birthday_test_{secrets.token_hex(4)}"
        with self.admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as connection:
            for name in self.created:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(_server_url())
    try:
        with server.admin.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        message = f"PostgreSQL at TEST_DATABASE_URL is not reachable: {error.orig}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: PostgreSQL tests must run, not skip)")
        pytest.skip(message)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database migrated to head, shared by the run; tests empty the table."""
    url = postgres_server.create_database()
    migrate(url)
    return url


@pytest.fixture
def empty_postgres(postgres_url: str) -> str:
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("TRUNCATE users"))
    engine.dispose()
    return postgres_url


@contextmanager
def users_locked(url: str) -> Iterator[None]:
    """A transaction holding ACCESS EXCLUSIVE on users while the block runs:
    every statement of the service on that table waits behind it."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as locker:
            locker.execute(sa.text("BEGIN"))
            locker.execute(sa.text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
            yield
            locker.execute(sa.text("ROLLBACK"))
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'hello.sqlite3'}"
    migrate(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each API test runs on both backends."""
    if request.param == "postgresql":
        return request.getfixturevalue("empty_postgres")
    return request.getfixturevalue("sqlite_url")


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc))


def make_settings(database_url: str, **overrides) -> Settings:
    return Settings(database_url=database_url, **overrides)


@pytest.fixture
def client(database_url: str, clock: FrozenClock) -> Iterator[TestClient]:
    app = create_app(make_settings(database_url), clock=clock)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
