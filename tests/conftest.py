"""Shared fixtures: database URLs for SQLite and PostgreSQL, migrated databases, a ready Repository.

- ``sqlite_url``: a fresh SQLite file in the test's tmp dir (empty: no schema).
- ``pg_url``: one database per test session on 127.0.0.1:5432 (user postgres or root), dropped at the end;
  its ``public`` schema is emptied before every test that uses it. Skipped with the reason when the server is
  unreachable, a failure instead when ``DALLE_REQUIRE_POSTGRES=1``.
- ``db_url``: parametrised over both (test ids ``[sqlite]`` / ``[postgresql]``).
- ``migrated_url``: ``db_url`` upgraded to the Alembic head.
- ``repo`` / ``sqlite_repo``: an async :class:`store.repository.Repository` on a migrated database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

# XLA's persistent compilation cache stays off in tests (and the processes they start) unless a test turns it on
# (tests/engine/test_compile_cache.py): every test compiles as a fresh machine would, and nothing is written to ~/.cache
os.environ.setdefault("XLA_CACHE_DIR", "off")

PG_HOST = os.environ.get("DALLE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DALLE_TEST_PG_PORT", "5432"))


def _pg_admin() -> tuple[str, str] | str:
    """(user, maintenance db) that can create databases, or a string saying why none could connect."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        return f"psycopg not importable: {exc}"
    errors = []
    for user in ("postgres", "root"):
        for dbname in ("postgres", "test"):
            try:
                with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=dbname, connect_timeout=3):
                    return user, dbname
            except Exception as exc:  # any failure means "not usable"
                errors.append(f"{user}@{dbname}: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}")
    return f"PostgreSQL at {PG_HOST}:{PG_PORT} unreachable ({'; '.join(errors[:2])})"


@pytest.fixture(scope="session")
def _pg_database() -> Iterator[str]:
    admin = _pg_admin()
    if isinstance(admin, str):
        if os.environ.get("DALLE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"DALLE_REQUIRE_POSTGRES=1 but {admin}")
        pytest.skip(admin)
    import psycopg

    user, maintenance = admin
    name = f"dalle_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=maintenance, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=maintenance, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(_pg_database: str) -> str:
    """The session's PostgreSQL database with an empty ``public`` schema."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(_pg_database)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return _pg_database


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'dalle.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def migrated_url(db_url: str) -> str:
    from store.db import upgrade

    upgrade(db_url, "head")
    return db_url


@pytest.fixture
async def repo(migrated_url: str) -> AsyncIterator:
    from store.repository import Repository

    r = Repository.from_url(migrated_url)
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
async def sqlite_repo(sqlite_url: str) -> AsyncIterator:
    from store.db import upgrade
    from store.repository import Repository

    upgrade(sqlite_url, "head")
    r = Repository.from_url(sqlite_url)
    try:
        yield r
    finally:
        await r.close()
