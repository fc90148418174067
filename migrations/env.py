"""alembic environment: the URL from app.settings, the models' metadata, and a
PostgreSQL advisory lock so two migration jobs started at once run one after
the other instead of colliding."""

from __future__ import annotations

from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from sqlmodel import SQLModel

from app import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from app.settings import load_settings

# Any constant works as long as every migration runner uses the same one.
MIGRATION_LOCK_ID = 0x68656C6C6F  # "hello"

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or load_settings().database_url


def written_by_a_later_release(current: tuple[str, ...]) -> list[str]:
    """The stored revisions these scripts do not know."""
    script = context.script
    unknown = []
    for revision in current:
        try:
            if script.get_revision(revision) is None:
                unknown.append(revision)
        except Exception:  # alembic raises ResolutionError/CommandError for unknown ids
            unknown.append(revision)
    return unknown


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = sa.create_engine(database_url(), poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Held until this transaction commits; a second runner waits
                # here, then finds the schema already at head.
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"),
                                   {"id": MIGRATION_LOCK_ID})
            newer = written_by_a_later_release(context.get_context().get_current_heads())
            if newer:
                # A rollback (helm rollback, an ArgoCD sync to an older commit)
                # runs this older release's job on a schema a later release
                # migrated. Expand/contract keeps that schema readable by this
                # release, so there is nothing to do: say so and succeed.
                print(f"schema is at {', '.join(newer)}, newer than this release's "
                      "migrations: nothing to do", flush=True)
            else:
                context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
