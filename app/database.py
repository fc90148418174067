"""The database: connection pool and the three queries the service runs.

The request path talks to PostgreSQL through a psycopg 3 async pool, and to
the embedded SQLite file through the standard library in a worker thread.
SQLAlchemy and SQLModel define the table (app/models.py) and drive the
migrations, but are not imported here: the ORM layer cost most of the
per-request time in `nox -s bench` (docs/performance.md). Tests run these
statements on both databases and check the table against the model.

Every call is bounded on the client side by ``DB_POOL_TIMEOUT`` plus
``DB_STATEMENT_TIMEOUT`` (``Settings.db_call_timeout``; on PostgreSQL also by
the server's ``statement_timeout``), and every way the database can fail
surfaces as ``DatabaseUnavailable``, so the API answers 503, never 500 or a
hang. A statement the service gave up on is cancelled, never left to take
effect later (docs/api.md, "Recovery").
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from app.settings import Settings

if TYPE_CHECKING:  # imported lazily at run time: see PostgresDatabase
    from psycopg import AsyncConnection

Params = tuple[object, ...]

logger = logging.getLogger("app.database")


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time."""


class DatabaseLost(DatabaseUnavailable):
    """This process's own database is gone or damaged (the embedded SQLite file
    missing or corrupt): not an outage that passes, so readiness turns 503 too."""


class StatementRefused(Exception):
    """PostgreSQL refused one of our statements on a healthy connection (a
    constraint nobody expected): a bug, a 500 with its traceback in the log.

    It names the server's error by class, SQLSTATE and schema object, never by
    its message: a message may quote the row (``DETAIL: Failing row contains
    (..., 1991-02-03)``), and a date of birth never reaches a log."""

    @classmethod
    def of(cls, error: Exception) -> StatementRefused:
        diag = getattr(error, "diag", None)
        where = [f"{name} {value}" for name, value in (
            ("table", getattr(diag, "table_name", None)),
            ("column", getattr(diag, "column_name", None)),
            ("constraint", getattr(diag, "constraint_name", None))) if value]
        return cls(", ".join([_describe(error), *where]))


@dataclass
class DatabaseStats:
    """Counts app.metrics reads when scraped; plain numbers, the event loop's only."""

    calls: dict[str, int] = field(default_factory=dict)  # ok, unavailable, error
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by SQLSTATE class

    def outcome(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def error(self, error: BaseException) -> None:
        sqlstate = getattr(error, "sqlstate", None)
        key = sqlstate[:2] if sqlstate else "none"
        self.errors[key] = self.errors.get(key, 0) + 1


class Database(Protocol):
    stats: DatabaseStats

    def pool_stats(self) -> dict[str, int] | None: ...
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


def _sever(connection: AsyncConnection[Any]) -> None:
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


# SQLSTATE classes (PostgreSQL manual, appendix A) in which the server says it
# cannot do the work now, whatever the client sent: the request answers 503.
# Every other class (data, integrity, syntax) is a bug of ours: one 500.
UNAVAILABLE_SQLSTATE_CLASSES = {
    "08": "connection exception",
    "25": "invalid transaction state (read-only during a failover or maintenance)",
    "40": "transaction rollback (serialization failure, deadlock)",
    "53": "insufficient resources (too many connections, disk full, out of memory)",
    "55": "object not in prerequisite state (lock not available)",
    "57": "operator intervention (shutdown, cannot connect now, statement timeout)",
    "58": "system error",
    "XX": "internal error",
}
UNDEFINED_TABLE = "42P01"  # not migrated yet: nothing to serve from, not a bug
READ_ONLY_SQLSTATE_CLASS = "25"
# Worth a retry on a fresh connection: the connection died under the
# statement (restart, failover, pg_terminate_backend), or the server rolled it
# back for a conflict. All three statements are idempotent. Twice at most: a
# server going down ends its connections one by one, and one it had not
# reached yet can pass the retry's check and die under the retried statement.
MAX_RETRIES = 2
RETRY_SQLSTATE_CLASSES = ("08", "40")
RETRY_SQLSTATES = ("57P01", "57P02")  # admin_shutdown, crash_shutdown


def is_unavailable(error: BaseException) -> bool:
    """Whether a database error means "not now" (503) rather than a bug (500)."""
    import psycopg
    from psycopg_pool import PoolTimeout

    if isinstance(error, (PoolTimeout, TimeoutError, OSError, psycopg.InterfaceError)):
        return True
    if isinstance(error, psycopg.Error):
        sqlstate = error.sqlstate
        if sqlstate is None:  # raised by libpq itself: the connection is gone
            return isinstance(error, psycopg.OperationalError)
        return sqlstate[:2] in UNAVAILABLE_SQLSTATE_CLASSES or sqlstate == UNDEFINED_TABLE
    return False


def _describe(error: BaseException) -> str:
    sqlstate = getattr(error, "sqlstate", None)
    return f"{type(error).__name__} (SQLSTATE {sqlstate})" if sqlstate else type(error).__name__


class PostgresDatabase:
    # The client's deadline on a statement sits this far above the server's
    # statement_timeout: the server's cancel arrives first and the connection
    # survives; only a dead network path is left for the client to cut.
    CLIENT_DEADLINE_MARGIN = 0.5
    # Readiness reads the schema on its own connection, bounded by this.
    READINESS_TIMEOUT = 1.0
    # psycopg_pool retries a failed connection attempt with a doubling delay
    # for reconnect_timeout seconds, then gives the slot up; a request that
    # finds no connection then opens one at once. Kept short, the delay never
    # grows past a second, so requests succeed within 2 s of the database's
    # return after an outage of any length (docs/api.md, "Recovery").
    RECONNECT_TIMEOUT = 1.0
    # A connection that reported the read-only state (SQLSTATE class 25) is not
    # trusted for writes afterwards, nor are its siblings opened under the same
    # setting: the pool is drained, at most this often during a read-only spell.
    READ_ONLY_DRAIN_INTERVAL = 1.0
    # A connection used this recently is known good; checking it would cost a
    # round trip on every request (HikariCP's aliveBypassWindowMs, same idea).
    # One that died within the window fails its statement, which is retried.
    CHECK_AFTER_IDLE_SECONDS = 1.0

    def __init__(self, settings: Settings) -> None:
        import psycopg
        from psycopg.pq import TransactionStatus
        from psycopg_pool import AsyncConnectionPool

        self._psycopg = psycopg
        self._idle = TransactionStatus.IDLE
        self.pool_timeout = settings.db_pool_timeout
        self.pool_size = settings.db_pool_size
        self.statement_timeout = settings.db_statement_timeout
        self.url = settings.libpq_url
        self._readiness_connection: AsyncConnection[Any] | None = None
        self._loop: asyncio.AbstractEventLoop  # set by open()
        self._drained_at = float("-inf")
        self.stats = DatabaseStats()
        # When each pooled connection last proved good; weak, so a connection
        # the pool drops is forgotten with it.
        self._last_good: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        # Behind a transaction-mode pooler every statement may run on another
        # server connection: no session state, no server-side prepared
        # statement (PgBouncer before 1.21 cannot route them), and the statement
        # timeout is set for each statement's own transaction, in the same
        # message (one round trip: a multi-statement query is one transaction).
        # Otherwise the session keeps the timeout, and statements are prepared.
        self.per_statement_timeout = settings.db_pooler == "transaction"
        self._prepare: bool | None = None if self.per_statement_timeout else True
        self._set_timeout = f"statement_timeout = {int(settings.db_statement_timeout * 1000)}"
        self._prefix = f"SET LOCAL {self._set_timeout}; " if self.per_statement_timeout else ""
        # No startup parameter but those every pooler accepts (PgBouncer
        # refuses `options`, which once carried the statement timeout).
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(2, int(settings.db_pool_timeout + 0.999)),
            "application_name": "hello-birthday",
        }
        if self.per_statement_timeout:
            # Client-side binding: the parameters travel inside the one simple
            # query that carries SET LOCAL; psycopg never prepares on its own.
            kwargs.update(prepare_threshold=None, cursor_factory=psycopg.AsyncClientCursor)
        self._connect_kwargs = kwargs
        self.pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            settings.libpq_url,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_size,
            max_idle=settings.db_pool_max_idle,
            open=False,
            timeout=settings.db_pool_timeout,
            max_lifetime=1800,
            reconnect_timeout=self.RECONNECT_TIMEOUT,
            name="hello-birthday",
            configure=self._configure,
            kwargs=kwargs,
        )

    async def _configure(self, connection: AsyncConnection[Any]) -> None:
        if not self.per_statement_timeout:  # the session is ours: set it once
            await connection.execute(f"SET {self._set_timeout}")
        # Just connected: known good, so its first request skips the check.
        self._last_good[connection] = time.monotonic()

    async def _checked_connection(self, always_check: bool) -> AsyncConnection[Any]:
        """A pooled connection that is known to work.

        Stale connections (a database restart, a dropped TCP path) are found
        here and replaced, never handed to a request. Done here rather than
        with the pool's ``check`` hook, which waits a second after each
        failed check and so turned one restart into a PoolTimeout.
        """
        deadline = time.monotonic() + self.pool_timeout
        for _ in range(self.pool_size + 1):
            connection = await self.pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
            last_good = self._last_good.get(connection, 0.0)
            if not always_check and time.monotonic() - last_good <= self.CHECK_AFTER_IDLE_SECONDS:
                return connection
            watchdog = self._loop.call_later(
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

    async def _discard(self, connection: AsyncConnection[Any]) -> None:
        """Close a connection and hand it back: the pool drops it and opens a new one."""
        await connection.close()
        await self.pool.putconn(connection)

    async def open(self) -> None:
        # The loop every statement's watchdog is set on, looked up once.
        self._loop = asyncio.get_running_loop()
        # Do not wait: a database that is down at start-up shows in /readyz.
        await self.pool.open(wait=False)

    async def close(self) -> None:
        if self._readiness_connection is not None:
            await self._readiness_connection.close()
        await self.pool.close(timeout=5)

    def pool_stats(self) -> dict[str, int]:
        return dict(self.pool.get_stats())

    async def _execute(self, query: str, params: Params, fetch: bool) -> Any:
        """The statement, retried on a fresh connection up to MAX_RETRIES times."""
        failure: Exception | None = None
        for _ in range(MAX_RETRIES + 1):
            if failure is not None:
                logger.info("retrying on a fresh connection after %s", _describe(failure))
                self.stats.retries += 1
            try:
                result = await self._attempt(query, params, fetch, retry=failure is not None)
            except _Retry as retry:
                failure = retry.error
                continue
            except DatabaseUnavailable:
                self.stats.outcome("unavailable")
                raise
            except Exception:
                self.stats.outcome("error")
                raise
            self.stats.outcome("ok")
            return result
        assert failure is not None  # nosec B101: the loop ran and every attempt failed
        self.stats.outcome("unavailable")
        raise self._unavailable(failure) from failure

    def _unavailable(self, error: BaseException) -> DatabaseUnavailable:
        logger.warning("database unavailable: %s", _describe(error))
        return DatabaseUnavailable(_describe(error))

    async def _distrust_read_only(self) -> None:
        """Replace the pool's connections: opened while the database was
        read-only, they would refuse writes after it is writable again."""
        now = time.monotonic()
        if now - self._drained_at >= self.READ_ONLY_DRAIN_INTERVAL:
            self._drained_at = now
            await self.pool.drain()

    async def _attempt(self, query: str, params: Params, fetch: bool, retry: bool) -> Any:
        try:
            connection = await self._checked_connection(always_check=retry)
        except Exception as error:
            self.stats.error(error)
            if is_unavailable(error):
                raise self._unavailable(error) from error
            raise
        watchdog = self._loop.call_later(
            self.statement_timeout + self.CLIENT_DEADLINE_MARGIN, _sever, connection
        )
        try:
            cursor = await connection.execute(self._prefix + query, params, prepare=self._prepare)
            if self.per_statement_timeout:
                cursor.nextset()  # past SET LOCAL's result, to the statement's
            result = await cursor.fetchall() if fetch else cursor.rowcount
        except BaseException as error:
            self.stats.error(error)
            sqlstate = getattr(error, "sqlstate", None) or ""
            if sqlstate[:2] == READ_ONLY_SQLSTATE_CLASS:
                await self._distrust_read_only()  # before the return below: it closes it
            # The server refused the statement on a healthy connection, or the
            # connection died (or is in a state nobody knows): then not reused.
            reusable = (
                isinstance(error, Exception)
                and not connection.broken
                and connection.pgconn.transaction_status == self._idle
            )
            if reusable:
                await self.pool.putconn(connection)
            else:
                await self._discard(connection)
            if isinstance(error, Exception) and is_unavailable(error):
                conflict = sqlstate[:2] in RETRY_SQLSTATE_CLASSES or sqlstate in RETRY_SQLSTATES
                if not reusable or conflict:
                    raise _Retry(error) from error
                raise self._unavailable(error) from error
            if isinstance(error, self._psycopg.Error):
                raise StatementRefused.of(error) from None
            raise
        finally:
            watchdog.cancel()
        # Marked here, not in a pool reset hook: a hook sends every return
        # through the pool's worker task, a measurable cost.
        self._last_good[connection] = time.monotonic()
        await self.pool.putconn(connection)
        return result

    async def upsert(self, username: str, date_of_birth: date) -> None:
        await self._execute(PG_UPSERT, (username, date_of_birth), fetch=False)

    async def date_of_birth(self, username: str) -> date | None:
        rows = await self._execute(PG_SELECT, (username,), fetch=True)
        return rows[0][0] if rows else None

    async def delete(self, username: str) -> bool:
        return bool(await self._execute(PG_DELETE, (username,), fetch=False) > 0)

    async def schema_revisions(self) -> set[str]:
        """The alembic revisions stored, read on readiness's own connection.

        Never a pooled connection: a pool saturated by requests must not make
        the probe wait (and the pod unready). Its timeout is set for the
        query's own transaction, which every pooler mode keeps.
        """
        psycopg = self._psycopg
        connection = self._readiness_connection
        try:
            if connection is None or connection.closed:
                fresh: AsyncConnection[Any] = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(
                        self.url, **{**self._connect_kwargs, "connect_timeout": 2,
                                     "application_name": "hello-birthday-readiness",
                                     "prepare_threshold": None,
                                     "cursor_factory": psycopg.AsyncClientCursor},
                    ),
                    self.READINESS_TIMEOUT + 2,
                )
                connection = self._readiness_connection = fresh
            watchdog = asyncio.get_running_loop().call_later(
                self.READINESS_TIMEOUT + self.CLIENT_DEADLINE_MARGIN, _sever, connection
            )
            try:
                cursor = await connection.execute(
                    f"SET LOCAL statement_timeout = {int(self.READINESS_TIMEOUT * 1000)}; "
                    + SCHEMA_REVISION)
                cursor.nextset()
                rows = await cursor.fetchall()
            finally:
                watchdog.cancel()
        except psycopg.errors.UndefinedTable:
            return set()  # reachable, but never migrated
        except Exception as error:
            if connection is not None:
                await connection.close()
            if is_unavailable(error):
                raise DatabaseUnavailable(_describe(error)) from error
            raise
        return {row[0] for row in rows}


class _Retry(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


SQLITE_UPSERT = (
    "INSERT INTO users (username, date_of_birth) VALUES (?, ?) "
    "ON CONFLICT (username) DO UPDATE "
    "SET date_of_birth = excluded.date_of_birth, updated_at = CURRENT_TIMESTAMP"
)
SQLITE_SELECT = "SELECT date_of_birth FROM users WHERE username = ?"
SQLITE_DELETE = "DELETE FROM users WHERE username = ?"
# sqlite3's exceptions for a statement of ours that is wrong: a bug, one 500.
# Every other sqlite3 error (locked, I/O, full, interrupted, corrupt) is a 503.
SQLITE_BUGS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError,
               sqlite3.InterfaceError, sqlite3.NotSupportedError)
SQLITE_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class _SqliteCall:
    """One statement's life across the thread boundary.

    The event loop gives up on it at ``deadline`` (a 503); the thread then
    must change nothing. Before the thread commits it checks, under the lock,
    that nobody gave up; once it is committing, the commit's outcome is the
    answer. The lock makes those two moments exclusive.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.lock = threading.Lock()
        self.abandoned = False
        self.committing = False
        self.connection: sqlite3.Connection | None = None

    def abandon(self) -> bool:
        """Give the statement up; False when its commit had already begun."""
        with self.lock:
            if self.committing:
                return False
            self.abandoned = True
            if self.connection is not None:
                self.connection.interrupt()  # a statement running now stops
            return True

    def remaining(self) -> float:
        """Seconds left, at least a millisecond (sqlite's smallest wait)."""
        return max(0.001, self.deadline - time.monotonic())


class SqliteDatabase:
    """The embedded mode: one short-lived stdlib connection per call, in a thread.

    The file is created by the migrations only: a deleted file is a lost
    database (503, and readiness says so), never silently recreated empty.
    """

    def __init__(self, settings: Settings) -> None:
        self.path = settings.sqlite_path
        self.uri = Path(self.path).absolute().as_uri() + "?mode=rw"
        self.timeout = settings.db_call_timeout
        self.stats = DatabaseStats()

    def pool_stats(self) -> None:
        return None  # no pool: a connection per call

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _run(self, call: _SqliteCall, query: str, params: Params, fetch: bool,
             write: bool) -> Any:
        # Every wait on a lock (sqlite's busy timeout) ends by the deadline.
        connection = sqlite3.connect(self.uri, uri=True, timeout=call.remaining(),
                                     isolation_level=None)
        try:
            with call.lock:
                if call.abandoned:  # queued for a thread past the deadline
                    raise TimeoutError("given up before the statement ran")
                call.connection = connection
            if not write:
                cursor = connection.execute(query, params)
                return cursor.fetchall() if fetch else cursor.rowcount
            connection.execute("BEGIN IMMEDIATE")
            rowcount = connection.execute(query, params).rowcount
            with call.lock:
                if call.abandoned:
                    raise TimeoutError("given up before the commit")  # rolled back by close
                call.committing = True
            # The commit waits for readers at most until the deadline, too.
            connection.execute(f"PRAGMA busy_timeout = {max(1, int(call.remaining() * 1000))}")
            connection.execute("COMMIT")
            return rowcount
        finally:
            with call.lock:
                call.connection = None
            connection.close()  # an open transaction is rolled back

    def _lost(self, error: sqlite3.Error) -> DatabaseLost | None:
        code = getattr(error, "sqlite_errorcode", None)
        if code in SQLITE_DAMAGED:
            return DatabaseLost("the embedded SQLite database file is damaged")
        if code == sqlite3.SQLITE_CANTOPEN and not os.path.exists(self.path):
            return DatabaseLost("the embedded SQLite database file is missing")
        return None

    async def _execute(self, query: str, params: Params, fetch: bool, write: bool) -> Any:
        call = _SqliteCall(time.monotonic() + self.timeout)
        work = asyncio.ensure_future(asyncio.to_thread(self._run, call, query, params, fetch,
                                                       write))
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    result = await asyncio.shield(work)
            except TimeoutError:
                if call.abandon():
                    raise
                result = await work  # committing: its outcome is the answer
            except BaseException:  # the request itself was cancelled
                call.abandon()
                raise
        except (sqlite3.Error, TimeoutError) as error:
            self.stats.error(error)
            if isinstance(error, SQLITE_BUGS):
                self.stats.outcome("error")
                raise
            self.stats.outcome("unavailable")
            logger.warning("database unavailable: %s", getattr(error, "sqlite_errorname", None)
                           or type(error).__name__)
            if isinstance(error, sqlite3.Error) and (lost := self._lost(error)):
                raise lost from error
            raise DatabaseUnavailable(type(error).__name__) from error
        except Exception as error:
            self.stats.error(error)
            self.stats.outcome("error")
            raise
        self.stats.outcome("ok")
        return result

    async def upsert(self, username: str, date_of_birth: date) -> None:
        await self._execute(SQLITE_UPSERT, (username, date_of_birth.isoformat()), fetch=False,
                            write=True)

    async def date_of_birth(self, username: str) -> date | None:
        rows = await self._execute(SQLITE_SELECT, (username,), fetch=True, write=False)
        return date.fromisoformat(rows[0][0]) if rows else None

    async def delete(self, username: str) -> bool:
        return bool(await self._execute(SQLITE_DELETE, (username,), fetch=False, write=True) > 0)

    async def schema_revisions(self) -> set[str]:
        try:
            rows = await self._execute(SCHEMA_REVISION, (), fetch=True, write=False)
        except DatabaseLost:
            raise
        except DatabaseUnavailable as error:
            if "no such table" in str(error.__cause__):
                return set()  # never migrated
            raise
        return {row[0] for row in rows}


def open_database(settings: Settings) -> Database:
    """The database the settings name (not yet opened)."""
    if settings.is_sqlite:
        return SqliteDatabase(settings)
    return PostgresDatabase(settings)
