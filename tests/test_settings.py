"""Configuration: read once, validated, a bad value named in one line."""

from __future__ import annotations

import dataclasses

import subprocess
import sys

import pytest

from app.settings import Settings, SettingsError, load_settings
from tests.conftest import ROOT


def test_defaults_use_the_embedded_sqlite_file():
    settings = load_settings({})
    assert settings.is_sqlite
    assert settings.database_url == "sqlite:///hello-birthday.sqlite3"
    assert settings.sqlite_path == "hello-birthday.sqlite3"
    assert (settings.host, settings.port, settings.shutdown_drain_seconds) == ("0.0.0.0", 8080, 0)


@pytest.mark.parametrize(
    "raw",
    ["postgres://u:p@db:5432/app", "postgresql://u:p@db:5432/app",
     "postgresql+psycopg://u:p@db:5432/app", "POSTGRESQL://u:p@db:5432/app"],
)
def test_postgres_urls_use_psycopg_3(raw):
    settings = load_settings({"DATABASE_URL": raw})
    assert settings.database_url == "postgresql+psycopg://u:p@db:5432/app"
    assert settings.libpq_url == "postgresql://u:p@db:5432/app"
    assert not settings.is_sqlite


def test_every_variable_is_read():
    settings = load_settings({
        "HOST": "127.0.0.1", "PORT": "9000", "LOG_LEVEL": "debug", "LOG_FORMAT": "JSON",
        "DB_POOL_SIZE": "4", "DB_POOL_TIMEOUT": "1.5", "DB_STATEMENT_TIMEOUT": "3",
        "DB_POOL_MIN_SIZE": "3", "DB_POOL_MAX_IDLE": "30", "DB_POOLER": "Transaction",
        "SHUTDOWN_DRAIN_SECONDS": "5", "SHUTDOWN_TIMEOUT_SECONDS": "7",
        "GOOGLE_CLOUD_PROJECT": "proj",
        "BODY_READ_TIMEOUT": "2.5", "KEEP_ALIVE_SECONDS": "620",
        "MAX_CONCURRENT_REQUESTS": "50", "FORWARDED_HOPS": "2", "METRICS_PORT": "9191",
        "BUILD_VERSION": "1.2.3", "BUILD_REVISION": "abc1234",
        "DATABASE_URL": "postgresql://u@db/app",
    })
    # Every field of Settings is read from some variable: none kept its default.
    for field in dataclasses.fields(Settings):
        assert getattr(settings, field.name) != field.default, field.name
    assert (settings.host, settings.port, settings.log_level, settings.log_format) == (
        "127.0.0.1", 9000, "DEBUG", "json")
    assert (settings.db_pool_size, settings.db_pool_timeout, settings.db_statement_timeout) == (
        4, 1.5, 3.0)
    assert (settings.db_pool_min_size, settings.db_pool_max_idle, settings.db_pooler) == (
        3, 30.0, "transaction")
    assert settings.shutdown_drain_seconds == 5.0
    assert settings.google_cloud_project == "proj"
    assert settings.db_call_timeout == 4.5
    assert (settings.body_read_timeout, settings.keep_alive_seconds) == (2.5, 620.0)
    assert (settings.max_concurrent_requests, settings.forwarded_hops) == (50, 2)
    assert (settings.metrics_port, settings.build_version, settings.build_revision) == (
        9191, "1.2.3", "abc1234")


def test_metrics_are_on_by_default_and_never_on_the_public_port():
    assert load_settings({}).metrics_port == 9090
    assert load_settings({"METRICS_PORT": "0"}).metrics_port == 0
    with pytest.raises(SettingsError, match="METRICS_PORT"):
        load_settings({"PORT": "9090"})


@pytest.mark.parametrize(
    ("name", "value"),
    [("PORT", "eighty"), ("PORT", "0"), ("PORT", "70000"), ("DB_POOL_SIZE", "0"),
     ("DB_POOL_TIMEOUT", "-1"), ("DB_STATEMENT_TIMEOUT", "nan"), ("SHUTDOWN_DRAIN_SECONDS", "x"),
     ("LOG_LEVEL", "LOUD"), ("LOG_FORMAT", "xml"), ("DATABASE_URL", "mysql://db/app"),
     ("DATABASE_URL", "not a url"), ("DATABASE_URL", "sqlite://relative.db"),
     ("KEEP_ALIVE_SECONDS", "0"), ("MAX_CONCURRENT_REQUESTS", "-1"), ("FORWARDED_HOPS", "x"),
     ("METRICS_PORT", "70000"), ("DB_POOL_MIN_SIZE", "-1"), ("DB_POOL_MAX_IDLE", "0"),
     ("DB_POOLER", "pgbouncer"),
     # the server closes a body 10 s after its head: the 408 must come first
     ("BODY_READ_TIMEOUT", "10")],
)
def test_a_bad_value_is_refused_by_name(name, value):
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})


def test_a_number_that_is_not_one_is_named_by_its_kind():
    with pytest.raises(SettingsError, match="DB_POOL_SIZE must be an integer, got 'ten'"):
        load_settings({"DB_POOL_SIZE": "ten"})
    with pytest.raises(SettingsError, match="DB_POOL_TIMEOUT must be a number, got 'soon'"):
        load_settings({"DB_POOL_TIMEOUT": "soon"})


def test_the_pool_keeps_a_small_minimum_within_its_size():
    assert (load_settings({}).db_pool_min_size, load_settings({}).db_pool_size) == (
        Settings.db_pool_min_size, Settings.db_pool_size)
    assert load_settings({"DB_POOL_SIZE": "1"}).db_pool_min_size == 1  # all of a smaller pool
    assert load_settings({"DB_POOL_SIZE": "8", "DB_POOL_MIN_SIZE": "8"}).db_pool_min_size == 8
    with pytest.raises(SettingsError, match="DB_POOL_MIN_SIZE must be at most DB_POOL_SIZE"):
        load_settings({"DB_POOL_SIZE": "4", "DB_POOL_MIN_SIZE": "5"})


def test_python_m_app_stops_with_one_line_naming_the_variable():
    result = subprocess.run(
        [sys.executable, "-m", "app"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PORT": "eighty", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "PORT" in lines[0] and "eighty" in lines[0]
