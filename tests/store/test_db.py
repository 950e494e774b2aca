"""Database URLs, engines, SQLite pragmas and the constraints the database itself enforces."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from store.db import DatabaseURLError, async_url, make_async_engine, make_sync_engine, parse_url, redact_url, sync_url
from store.models import Image, UserState


@pytest.mark.parametrize(
    ("url", "sync", "async_"),
    [
        ("sqlite:///data/x.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:////abs/x.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+psycopg", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+psycopg", "postgresql+asyncpg"),
    ],
)
def test_url_mapping(url, sync, async_):
    assert sync_url(url).drivername == sync
    assert async_url(url).drivername == async_
    assert sync_url(url).database == async_url(url).database == parse_url(url).database


@pytest.mark.parametrize("url", ["not a url", "mysql://u@h/db", "postgresql://u@h", ""])
def test_bad_urls(url):
    with pytest.raises(DatabaseURLError):
        parse_url(url)


def test_redact_url_hides_password():
    shown = redact_url("postgresql://bot:hunter2@db.example:5432/dalle")
    assert "hunter2" not in shown and "bot" in shown and "dalle" in shown


def test_sqlite_pragmas(sqlite_url):
    engine = make_sync_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    engine.dispose()


async def test_sqlite_async_pragmas(sqlite_url):
    engine = make_async_engine(sqlite_url)
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
    await engine.dispose()


async def test_foreign_keys_enforced(repo):
    with pytest.raises(IntegrityError):
        async with repo.sessions.begin() as s:
            s.add(Image(generation_id=10**9, index=0))
    with pytest.raises(IntegrityError):
        async with repo.sessions.begin() as s:
            s.add(UserState(user_id=1, strikes=0, daily_quota=-5))
