"""The database: connection pool and the three queries the service runs.

The request path talks to PostgreSQL through a psycopg 3 async pool with
prepared statements, and to the embedded SQLite file through the standard
library in a worker thread. SQLAlchemy and SQLModel define the table
(app/models.py) and drive the migrations, but are not imported here: the ORM
layer cost most of the per-request time and half the start-up time in
`nox -s bench`. Tests run these statements on both databases and check the
table against the model.

Every call is bounded on the client side by ``DB_POOL_TIMEOUT`` plus
``DB_STATEMENT_TIMEOUT`` (``Settings.db_call_timeout``; on PostgreSQL also by
the server's ``statement_timeout``), and every way the database can fail
surfaces as ``DatabaseUnavailable``, so the API answers 503, never 500 or a hang.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import time
from datetime import date
from typing import Protocol

from app.settings import Settings

logger = logging.getLogger("app.database")


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time."""


class Database(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def upsert(self, username: str, date_of_birth: date) -> None: ...
    async def date_of_birth(self, username: str) -> date | None: ...
    async def delete(self, username: str) -> bool: ...
    async def schema_revisions(self) -> set[str]: ...


# One statement, so concurrent PUTs for one name can neither duplicate nor fail.
PG_UPSERT = (
    "INSERT INTO users (username, date_of_birth) VALUES (%s, %s) "
    "ON CONFLICT (username) DO UPDATE "
    "SET date_of_birth = excluded.date_of_birth, updated_at = now()"
)
PG_SELECT = "SELECT date_of_birth FROM users WHERE username = %s"
PG_DELETE = "DELETE FROM users WHERE username = %s"
SCHEMA_REVISION = "SELECT version_num FROM alembic_version"


def _sever(connection) -> None:
    """Shut the connection's socket down so that whatever waits on it fails now.

    The deadline on a query is enforced this way rather than by cancelling the
    awaiting task: on cancellation psycopg sends a cancel request and waits for
    the server, up to 10 s more, which on a dead network path is a hang.
    """
    try:
        sock = socket.fromfd(connection.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM)
    except Exception:  # already closed: nothing left to sever
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()  # the duplicate only; the connection's own fd stays with libpq


class PostgresDatabase:
    def __init__(self, settings: Settings) -> None:
        import psycopg
        from psycopg_pool import AsyncConnectionPool, PoolTimeout

        self._undefined_table = psycopg.errors.UndefinedTable
        self._unavailable_errors = (
            psycopg.OperationalError,
            psycopg.InterfaceError,
            psycopg.errors.UndefinedTable,  # not migrated yet: the service cannot serve
            PoolTimeout,
            TimeoutError,
            OSError,
        )
        self.pool_timeout = settings.db_pool_timeout
        self.pool_size = settings.db_pool_size
        self.statement_timeout = settings.db_statement_timeout
        self.pool = AsyncConnectionPool(
            settings.libpq_url,
            min_size=settings.db_pool_size,
            max_size=settings.db_pool_size,
            open=False,
            timeout=settings.db_pool_timeout,
            max_lifetime=1800,
            # Keep trying to reconnect for as long as the database is away.
            reconnect_timeout=365 * 24 * 3600,
            name="hello-birthday",
            configure=self._mark_fresh,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(2, int(settings.db_pool_timeout + 0.999)),
                "options": f"-c statement_timeout={int(settings.db_statement_timeout * 1000)}",
                "application_name": "hello-birthday",
            },
        )

    # A connection used this recently is known good; checking it would cost a
    # round trip on every request (HikariCP's aliveBypassWindowMs, same idea).
    CHECK_AFTER_IDLE_SECONDS = 1.0

    @staticmethod
    async def _mark_fresh(connection) -> None:
        # Just connected: known good, so its first request skips the check.
        connection.info_last_used = time.monotonic()

    async def _checked_connection(self):
        """A pooled connection that is known to work.

        Stale connections (a database restart, a dropped TCP path) are found
        here and replaced, never handed to a request. Done here rather than
        with the pool's ``check`` hook, which backs off a second after each
        failed check and so turned one restart into a PoolTimeout.
        """
        deadline = time.monotonic() + self.pool_timeout
        for _ in range(self.pool_size + 1):
            connection = await self.pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
            last_used = getattr(connection, "info_last_used", 0.0)
            if time.monotonic() - last_used <= self.CHECK_AFTER_IDLE_SECONDS:
                return connection
            watchdog = asyncio.get_running_loop().call_later(
                max(0.001, deadline - time.monotonic()), _sever, connection
            )
            try:
                await connection.execute("")
            except BaseException as error:
                # Dropped, never leaked, even when the request is being cancelled.
                await self._discard(connection)
                if not isinstance(error, Exception):
                    raise
                continue
            finally:
                watchdog.cancel()
            return connection
        raise TimeoutError("no working database connection")

    async def _discard(self, connection) -> None:
        """Close a connection and hand it back: the pool drops it and opens a new one."""
        await connection.close()
        await self.pool.putconn(connection)

    async def open(self) -> None:
        # Do not wait: a database that is down at start-up shows in /readyz.
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close(timeout=5)

    async def _execute(self, query: str, params: tuple, fetch: bool):
        try:
            connection = await self._checked_connection()
        except self._unavailable_errors as error:
            logger.warning("no database connection: %s", type(error).__name__)
            raise DatabaseUnavailable from error
        watchdog = asyncio.get_running_loop().call_later(
            self.statement_timeout, _sever, connection
        )
        try:
            cursor = await connection.execute(query, params, prepare=True)
            result = await cursor.fetchall() if fetch else cursor.rowcount
        except BaseException as error:
            # Whatever state it is in, this connection is not reused.
            await self._discard(connection)
            if isinstance(error, self._unavailable_errors):
                logger.warning("database unavailable: %s", type(error).__name__)
                raise DatabaseUnavailable from error
            raise
        finally:
            watchdog.cancel()
        # Marked here, not in a pool reset hook: a hook sends every return
        # through the pool's worker task, a measurable cost.
        connection.info_last_used = time.monotonic()
        await self.pool.putconn(connection)
        return result

    async def upsert(self, username: str, date_of_birth: date) -> None:
        await self._execute(PG_UPSERT, (username, date_of_birth), fetch=False)

    async def date_of_birth(self, username: str) -> date | None:
        rows = await self._execute(PG_SELECT, (username,), fetch=True)
        return rows[0][0] if rows else None

    async def delete(self, username: str) -> bool:
        return await self._execute(PG_DELETE, (username,), fetch=False) > 0

    async def schema_revisions(self) -> set[str]:
        try:
            rows = await self._execute(SCHEMA_REVISION, (), fetch=True)
        except DatabaseUnavailable as error:
            if isinstance(error.__cause__, self._undefined_table):
                return set()  # reachable, but never migrated
            raise
        return {row[0] for row in rows}


SQLITE_UPSERT = (
    "INSERT INTO users (username, date_of_birth) VALUES (?, ?) "
    "ON CONFLICT (username) DO UPDATE "
    "SET date_of_birth = excluded.date_of_birth, updated_at = CURRENT_TIMESTAMP"
)
SQLITE_SELECT = "SELECT date_of_birth FROM users WHERE username = ?"
SQLITE_DELETE = "DELETE FROM users WHERE username = ?"


class SqliteDatabase:
    """The embedded mode: one short-lived stdlib connection per call, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.sqlite_path
        self.busy_timeout = settings.db_statement_timeout
        self.timeout = settings.db_call_timeout

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _run(self, query: str, params: tuple, fetch: bool):
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            cursor = connection.execute(query, params)
            return cursor.fetchall() if fetch else cursor.rowcount
        finally:
            connection.close()

    async def _execute(self, query: str, params: tuple, fetch: bool):
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.to_thread(self._run, query, params, fetch)
        except (sqlite3.OperationalError, TimeoutError) as error:
            logger.warning("database unavailable: %s", type(error).__name__)
            raise DatabaseUnavailable from error

    async def upsert(self, username: str, date_of_birth: date) -> None:
        await self._execute(SQLITE_UPSERT, (username, date_of_birth.isoformat()), fetch=False)

    async def date_of_birth(self, username: str) -> date | None:
        rows = await self._execute(SQLITE_SELECT, (username,), fetch=True)
        return date.fromisoformat(rows[0][0]) if rows else None

    async def delete(self, username: str) -> bool:
        return await self._execute(SQLITE_DELETE, (username,), fetch=False) > 0

    async def schema_revisions(self) -> set[str]:
        rows = await self._execute(SCHEMA_REVISION, (), fetch=True)
        return {row[0] for row in rows}


def open_database(settings: Settings) -> Database:
    """The database the settings name (not yet opened)."""
    if settings.is_sqlite:
        return SqliteDatabase(settings)
    return PostgresDatabase(settings)
