"""Configuration, read once from the environment and validated before start-up.

A missing or malformed value raises ``SettingsError`` whose message names the
variable; ``python -m app`` prints it on one line and exits 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar
from dataclasses import dataclass

from app import __version__
from app.limits import BODY_TIMEOUT_SECONDS

DEFAULT_SQLITE_PATH = "hello-birthday.sqlite3"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("auto", "json", "text")
# DB_POOLER: nothing between the service and PostgreSQL, or a pooler (PgBouncer,
# Cloud SQL Managed Connection Pooling) in session or transaction mode.
POOLERS = ("none", "session", "transaction")
KIND_NAMES: dict[object, str] = {int: "an integer", float: "a number"}


N = TypeVar("N", int, float)


class SettingsError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    # A container must listen on all its interfaces.
    host: str = "0.0.0.0"  # nosec B104
    port: int = 8080
    log_level: str = "INFO"
    log_format: str = "auto"
    # PostgreSQL connections per process: at most db_pool_size, and
    # db_pool_min_size kept while idle; one unused for db_pool_max_idle seconds
    # above the minimum is closed (docs/capacity.md chooses the figures).
    db_pool_size: int = 10
    db_pool_min_size: int = 2
    db_pool_max_idle: float = 60.0
    # What sits between the service and PostgreSQL: none, or a pooler in
    # session or transaction mode (POOLERS).
    db_pooler: str = "none"
    db_pool_timeout: float = 2.0
    db_statement_timeout: float = 5.0
    shutdown_drain_seconds: float = 0.0
    # After the drain, in-flight requests get this long before their connections are cut.
    shutdown_timeout_seconds: float = 10.0
    body_read_timeout: float = 5.0
    google_cloud_project: str | None = None
    # Idle keep-alive connections are kept this long. Behind the Google load
    # balancer (600 s to its backends) this must be longer, or the balancer
    # reuses a connection the server is closing and answers 502 itself.
    keep_alive_seconds: float = 5.0
    # Requests served at once by one process; more answer 503 at once instead
    # of queueing for a pooled connection (0: no limit).
    max_concurrent_requests: int = 100
    # How many X-Forwarded-For entries, counted from the right, the platform's
    # own proxies added: the client address is the left-most of those. 0 trusts
    # no header and logs the TCP peer. Cloud Run: 1; the Google load balancer: 2.
    forwarded_hops: int = 0
    # Prometheus metrics on this port (app.metrics); 0 turns them off, the
    # default for a Settings built in code. From the environment: 9090.
    metrics_port: int = 0
    # The build, baked into the image (Dockerfile): build_info and the start-up line.
    build_version: str = "dev"
    build_revision: str = "unknown"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def libpq_url(self) -> str:
        """The PostgreSQL URL in the form psycopg's pool takes."""
        return "postgresql://" + self.database_url.split("://", 1)[1]

    @property
    def sqlite_path(self) -> str:
        """The file of the embedded database (sqlite:///relative or sqlite:////absolute)."""
        return self.database_url.split(":///", 1)[1]

    @property
    def db_call_timeout(self) -> float:
        """Upper bound on one database call seen from the client side.

        Waiting for a pooled (or new) connection plus running the statement;
        this is what keeps a request from hanging on a dead database. On
        PostgreSQL a statement whose connection died is retried, at most
        twice, so a request may take three times this, plus half a second
        each time that the client deadline sits above the server's
        statement_timeout.
        """
        return self.db_pool_timeout + self.db_statement_timeout


def normalise_database_url(raw: str) -> str:
    """Map the URL forms people paste to one SQLAlchemy URL that uses psycopg 3.

    alembic uses it as is; the service derives psycopg's form (libpq_url).
    """
    url = raw.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise SettingsError(f"DATABASE_URL must look like postgresql://user@host/db, got {raw!r}")
    scheme = scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg_async"):
        return "postgresql+psycopg://" + rest
    if scheme in ("sqlite", "sqlite+pysqlite"):
        if not rest.startswith("/") or len(rest) < 2:
            raise SettingsError(
                f"DATABASE_URL for SQLite must be sqlite:///relative/path or "
                f"sqlite:////absolute/path, got {raw!r}"
            )
        return "sqlite://" + rest
    raise SettingsError(
        f"DATABASE_URL scheme {scheme!r} is not supported; use postgresql:// (or sqlite:// for "
        "the embedded mode)"
    )


def _number(env: Mapping[str, str], name: str, default: N, kind: Callable[[str], N],
            minimum: N, maximum: N | None = None) -> N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(
            f"{name} must be {KIND_NAMES.get(kind, 'a number')}, got {raw!r}") from None
    if value != value or value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SettingsError(f"{name} must be {bounds}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: Sequence[str],
            upper: bool) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = raw.upper() if upper else raw.lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise SettingsError naming the first bad one."""
    env = os.environ if env is None else env
    raw_url = env.get("DATABASE_URL", "").strip()
    database_url = (
        normalise_database_url(raw_url) if raw_url else f"sqlite:///{DEFAULT_SQLITE_PATH}"
    )
    host = env.get("HOST", "").strip() or Settings.host
    pool = _number(env, "DB_POOL_SIZE", Settings.db_pool_size, int, 1, 1000)
    settings = Settings(
        database_url=database_url,
        host=host,
        port=_number(env, "PORT", 8080, int, 1, 65535),
        log_level=_choice(env, "LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        log_format=_choice(env, "LOG_FORMAT", "auto", LOG_FORMATS, upper=False),
        db_pool_size=pool,
        # Unset, the default minimum, or all of a smaller pool.
        db_pool_min_size=_number(env, "DB_POOL_MIN_SIZE", min(Settings.db_pool_min_size, pool),
                                 int, 0, 1000),
        db_pool_max_idle=_number(env, "DB_POOL_MAX_IDLE", Settings.db_pool_max_idle, float, 1,
                                 86400),
        db_pooler=_choice(env, "DB_POOLER", Settings.db_pooler, POOLERS, upper=False),
        db_pool_timeout=_number(env, "DB_POOL_TIMEOUT", 2.0, float, 0.1, 300),
        db_statement_timeout=_number(env, "DB_STATEMENT_TIMEOUT", 5.0, float, 0.1, 3600),
        shutdown_drain_seconds=_number(env, "SHUTDOWN_DRAIN_SECONDS", 0.0, float, 0, 3600),
        shutdown_timeout_seconds=_number(env, "SHUTDOWN_TIMEOUT_SECONDS",
                                         Settings.shutdown_timeout_seconds, float, 0, 3600),
        # Below the server's own body deadline, so the client hears its 408.
        body_read_timeout=_number(env, "BODY_READ_TIMEOUT", 5.0, float, 0.1,
                                  BODY_TIMEOUT_SECONDS - 1),
        google_cloud_project=env.get("GOOGLE_CLOUD_PROJECT", "").strip() or None,
        keep_alive_seconds=_number(env, "KEEP_ALIVE_SECONDS", 5.0, float, 1, 3600),
        max_concurrent_requests=_number(env, "MAX_CONCURRENT_REQUESTS", 100, int, 0, 100_000),
        forwarded_hops=_number(env, "FORWARDED_HOPS", 0, int, 0, 10),
        metrics_port=_number(env, "METRICS_PORT", 9090, int, 0, 65535),
        build_version=env.get("BUILD_VERSION", "").strip() or __version__,
        build_revision=env.get("BUILD_REVISION", "").strip() or "unknown",
    )
    if settings.db_pool_min_size > settings.db_pool_size:
        raise SettingsError(f"DB_POOL_MIN_SIZE must be at most DB_POOL_SIZE "
                            f"({settings.db_pool_size}), got {settings.db_pool_min_size}")
    if settings.metrics_port == settings.port:
        raise SettingsError(f"METRICS_PORT must differ from PORT ({settings.port}): the metrics "
                            "never share the public port; 0 turns them off")
    return settings
