"""The database: engine, connection pool and the queries the service runs.

Every call is bounded by ``Settings.db_call_timeout`` on the client side (and
by ``statement_timeout`` on PostgreSQL), and every way the database can fail
surfaces as ``DatabaseUnavailable`` so the API answers 503, never 500 or a hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.models import users
from app.settings import Settings

logger = logging.getLogger("app.database")

_SELECT_DOB = sa.select(users.c.date_of_birth).where(users.c.username == sa.bindparam("username"))
_DELETE = sa.delete(users).where(users.c.username == sa.bindparam("username"))
_SCHEMA_REVISION = sa.text("SELECT version_num FROM alembic_version")


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time."""


def _upsert_statement(dialect_insert) -> sa.Insert:
    insert = dialect_insert(users).values(
        username=sa.bindparam("username"), date_of_birth=sa.bindparam("date_of_birth")
    )
    # One statement, so concurrent PUTs for one name can neither duplicate nor fail.
    return insert.on_conflict_do_update(
        index_elements=[users.c.username],
        set_={"date_of_birth": insert.excluded.date_of_birth, "updated_at": sa.func.now()},
    )


def create_engine(settings: Settings) -> AsyncEngine:
    if settings.is_sqlite:
        return create_async_engine(
            settings.async_database_url,
            connect_args={"timeout": settings.db_statement_timeout},
        )
    statement_timeout_ms = int(settings.db_statement_timeout * 1000)
    return create_async_engine(
        settings.async_database_url,
        pool_size=settings.db_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout,
        # Stale connections (a database restart, a dropped TCP path) are found
        # and replaced before a request gets them.
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={
            "connect_timeout": max(2, int(settings.db_pool_timeout + 0.999)),
            "options": f"-c statement_timeout={statement_timeout_ms}",
            "application_name": "hello-birthday",
        },
    )


class Database:
    def __init__(self, settings: Settings, engine: AsyncEngine | None = None) -> None:
        self.engine = engine or create_engine(settings)
        self.timeout = settings.db_call_timeout
        dialect_insert = sqlite.insert if settings.is_sqlite else postgresql.insert
        self._upsert = _upsert_statement(dialect_insert)

    @asynccontextmanager
    async def _connection(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        try:
            async with asyncio.timeout(self.timeout):
                opener = self.engine.begin() if write else self.engine.connect()
                async with opener as connection:
                    yield connection
        except (TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError,
                sa_exc.TimeoutError, OSError) as error:
            logger.warning("database unavailable: %s", type(error).__name__)
            raise DatabaseUnavailable from error
        except sa_exc.DBAPIError as error:
            if error.connection_invalidated:
                logger.warning("database connection lost: %s", type(error).__name__)
                raise DatabaseUnavailable from error
            raise

    async def upsert(self, username: str, date_of_birth: date) -> None:
        async with self._connection(write=True) as connection:
            await connection.execute(
                self._upsert, {"username": username, "date_of_birth": date_of_birth}
            )

    async def date_of_birth(self, username: str) -> date | None:
        async with self._connection(write=False) as connection:
            result = await connection.execute(_SELECT_DOB, {"username": username})
            return result.scalar_one_or_none()

    async def delete(self, username: str) -> bool:
        async with self._connection(write=True) as connection:
            result = await connection.execute(_DELETE, {"username": username})
            return result.rowcount > 0

    async def schema_revisions(self) -> set[str]:
        """The alembic revisions the database is at (empty before the first migration)."""
        async with self._connection(write=False) as connection:
            try:
                result = await connection.execute(_SCHEMA_REVISION)
            except sa_exc.ProgrammingError:  # no alembic_version table yet (PostgreSQL)
                return set()
            return set(result.scalars())

    async def dispose(self) -> None:
        await self.engine.dispose()
