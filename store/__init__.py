"""Durable state for the bot and training: SQLAlchemy models, engines/sessions, the async repository."""

from store.db import (
    DatabaseUnavailable,
    DatabaseURLError,
    MigrationRequired,
    async_url,
    default_sqlite_url,
    ensure_migrated,
    make_async_engine,
    make_sync_engine,
    redact_url,
    sync_url,
)

__all__ = [
    "DatabaseURLError",
    "DatabaseUnavailable",
    "MigrationRequired",
    "async_url",
    "default_sqlite_url",
    "ensure_migrated",
    "make_async_engine",
    "make_sync_engine",
    "redact_url",
    "sync_url",
]
