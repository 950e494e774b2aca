"""Alembic environment: one DATABASE_URL (env / .env / default SQLite file), always the sync driver.

A caller may hand in a live connection via ``config.attributes["connection"]`` (tests) or a URL via the
``sqlalchemy.url`` main option (``store.db.alembic_config(url)``); otherwise DATABASE_URL is read the same way
the bot reads it.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from store.db import default_sqlite_url, make_sync_engine
from store.models import Base, UTCDateTime

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    url = os.environ.get("DATABASE_URL")
    if not url:
        from dotenv import dotenv_values

        url = dotenv_values(".env").get("DATABASE_URL") if os.path.exists(".env") else None
    return url or default_sqlite_url()


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render our UTCDateTime as a plain ``sa.DateTime(timezone=True)`` so migrations don't import app code."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=render_item,
    )


def run_migrations_offline() -> None:
    from store.db import sync_url

    context.configure(
        url=sync_url(_database_url()).render_as_string(hide_password=False),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_sync_engine(_database_url())
    try:
        with engine.connect() as conn:
            is_sqlite = conn.dialect.name == "sqlite"
            if is_sqlite:
                # Batch migrations rebuild a table by copy + DROP; with foreign keys on, that DROP would fire
                # ON DELETE CASCADE / SET NULL on the child tables. The pragma only takes effect outside a
                # transaction, so it goes straight to the driver before SQLAlchemy begins one.
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = OFF")
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
            if is_sqlite:
                problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                conn.rollback()
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = ON")
                if problems:
                    raise RuntimeError(f"migration left broken foreign keys (table, rowid, parent, fk): {problems[:5]}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
