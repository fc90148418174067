"""The schema's history on PostgreSQL: no drift from the models, reversible, serialised."""

from __future__ import annotations

import os
import subprocess
import sys

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

from app import models  # noqa: F401
from app.schema import REVISIONS
from tests.conftest import ROOT, alembic_config, migrate


def columns(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return {column["name"] for column in sa.inspect(engine).get_columns("users")} \
            if sa.inspect(engine).has_table("users") else set()
    finally:
        engine.dispose()


def test_migrations_match_the_models_exactly(postgres_url):
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []
    engine.dispose()


def test_upgrade_downgrade_upgrade(postgres_server):
    url = postgres_server.create_database()
    config = alembic_config(url)
    command.upgrade(config, "head")
    assert columns(url) == {"username", "date_of_birth", "created_at", "updated_at"}
    command.downgrade(config, "base")
    assert columns(url) == set()
    command.upgrade(config, "head")
    assert columns(url) == {"username", "date_of_birth", "created_at", "updated_at"}


def test_one_head_and_the_package_knows_the_whole_chain():
    """app/schema.py carries the chain inside the package (a wheel has no
    migrations/ beside it); adding a migration without it fails here."""
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(scripts.get_heads()) == 1
    chain = [script.revision for script in scripts.walk_revisions()][::-1]
    assert REVISIONS == tuple(chain)


def test_two_migration_jobs_at_once_do_not_collide(postgres_server):
    url = postgres_server.create_database()
    env = {**os.environ, "DATABASE_URL": url}
    runs = [subprocess.Popen([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(4)]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0, 0], outputs
    # Exactly one of them created the table; the others found it at head.
    assert sum("Running upgrade  -> 0001" in output for output in outputs) == 1
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        versions = connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    engine.dispose()
    assert versions == [("0001",)]


def test_embedded_sqlite_migrates_too(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.sqlite3'}"
    migrate(url)
    assert "date_of_birth" in columns(url)
