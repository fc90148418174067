"""A real PgBouncer (tests/test_pooler.py, `nox -s capacity`), and a throwaway
PostgreSQL cluster of the benchmark's own (`nox -s capacity`: initdb in a
temporary directory, so what it measures is nobody else's load).

Both run as the `postgres` user when started by root: pg_ctl and PgBouncer
refuse to run as root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.live_server import free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def find_pgbouncer() -> str | None:
    candidates = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")  # root's PATH has sbin
    return shutil.which("pgbouncer") or next(
        (path for path in candidates if os.access(path, os.X_OK)), None)


def _pg_tool(name: str) -> str:
    for directory in PG_BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found (Debian: the postgresql package)")
    return found


class ThrowawayPostgres:
    """initdb, start, restart and remove a PostgreSQL cluster of the test's own."""

    def __init__(self, max_connections: int = 50, settings: dict[str, str] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hb-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   f"-c max_connections={max_connections} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off" + "".join(
                       f" -c {name}={value}" for name, value in (settings or {}).items()))
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-w", "-l",
                  str(self.root / "postgres.log"), "start")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*_as_postgres(), _pg_tool(tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def restart(self) -> None:
        """A fast restart: every backend is told to go (57P01), then the server is back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class PgBouncer:
    """A real PgBouncer (Debian's, 1.18 here) in front of ``target_port``."""

    def __init__(self, target_port: int, pool_mode: str = "transaction",
                 server_connections: int = 6, user: str = "postgres", password: str = "") -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError("pgbouncer not found (Debian: apt-get install pgbouncer)")
        self.root = Path(tempfile.mkdtemp(prefix="hb-pgbouncer-"))
        self.port = free_port()
        self.server_connections = server_connections
        self.user = user
        # Clients log in by trust; PgBouncer logs in to the server with this password.
        (self.root / "users.txt").write_text(f'"{user}" "{password}"\n')
        self.ini = self.root / "pgbouncer.ini"
        self.ini.write_text(PGBOUNCER_INI.format(
            target_port=target_port, port=self.port, root=self.root, pool_mode=pool_mode,
            size=server_connections, user=user))
        if os.geteuid() == 0:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        subprocess.run([*_as_postgres(), binary, "-d", str(self.ini)], check=True, timeout=30)
        self.pid = self._wait_for_pid()
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {self.log()}") from None
                time.sleep(0.05)

    def _wait_for_pid(self) -> int:
        pidfile = self.root / "pgbouncer.pid"
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer wrote no pid file: {self.log()}")
            time.sleep(0.02)
        return int(pidfile.read_text())

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/pgbouncer"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def show(self, what: str) -> list[dict]:
        """SHOW <what> on the admin console (simple protocol, as it requires)."""
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            cursor = psycopg.ClientCursor(connection)
            cursor.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description or []]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        except ProcessLookupError:
            pass
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# PgBouncer's own settings for the tests; docs/capacity.md's deployment uses the
# same pooling ones. auth trust and loopback only: a test fixture.
PGBOUNCER_INI = """\
[databases]
* = host=127.0.0.1 port={target_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/users.txt
admin_users = {user}
pool_mode = {pool_mode}
default_pool_size = {size}
max_db_connections = {size}
max_client_conn = 500
; a failed server login is retried after this many seconds (default 15): the
; service's recovery within 2 s after a restart depends on it
server_login_retry = 1
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
"""
