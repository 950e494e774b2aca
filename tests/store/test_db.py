"""Database URLs, engines, SQLite pragmas and the constraints the database itself enforces."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from store.db import (
    DatabaseUnavailable,
    DatabaseURLError,
    async_url,
    ensure_migrated,
    is_secret_key,
    make_async_engine,
    make_sync_engine,
    parse_url,
    redact_url,
    sync_url,
    url_secrets,
)
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


@pytest.mark.parametrize("url,shown", [
    ("postgresql://bot:pw1@db:5432/dalle?password=pw2&sslmode=require&sslpassword=pw3",
     "postgresql://bot:***@db:5432/dalle?password=***&sslmode=require&sslpassword=***"),
    ("postgresql://bot@db/dalle?token=tk1&application_name=dalle",  # SQLAlchemy renders the query sorted
     "postgresql://bot@db/dalle?application_name=dalle&token=***"),
    ("sqlite:///data/dalle.db?mode=rwc", "sqlite:///data/dalle.db?mode=rwc"),
    ("postgresql://bot:pw@db:xx/dalle", "<unparseable database URL>"),
])
def test_redact_url_hides_query_passwords_and_tokens(url, shown):
    assert redact_url(url) == shown
    for secret in ("pw1", "pw2", "pw3", "tk1"):
        assert secret not in redact_url(url)


def test_url_secrets_lists_every_secret_value():
    assert sorted(url_secrets("postgresql://bot:pw1@db/dalle?password=pw2&sslpassword=pw3&sslmode=require")) == [
        "pw1", "pw2", "pw3"]
    assert url_secrets("sqlite:///x.db") == [] and url_secrets("::nonsense::") == []
    assert is_secret_key("SSLPASSWORD") and is_secret_key("access_token") and not is_secret_key("sslmode")


def test_engines_hide_bound_parameters(sqlite_url):
    """A failing statement's error names the SQL, never the values bound to it (user text, tokens)."""
    from sqlalchemy import text
    from sqlalchemy.exc import StatementError

    engine = make_sync_engine(sqlite_url)
    try:
        assert engine.hide_parameters and make_async_engine(sqlite_url).sync_engine.hide_parameters
        with pytest.raises(StatementError) as caught, engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table WHERE x = :x"), {"x": "bound-secret-value"})
        assert "bound-secret-value" not in str(caught.value)
        assert "hidden due to hide_parameters" in str(caught.value)
    finally:
        engine.dispose()


def test_ensure_migrated_error_never_shows_a_query_password(tmp_path):
    url = "postgresql://bot:pw-a@127.0.0.1:1/dalle?password=pw-b&sslpassword=pw-c"
    with pytest.raises(DatabaseUnavailable) as caught:
        ensure_migrated(url, auto=True)
    message = str(caught.value)
    assert message.startswith("cannot open postgresql://bot:***@127.0.0.1:1/dalle?password=***")
    assert "pw-" not in message


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


def test_python_m_store_never_prints_a_password(tmp_path, pg_url):
    """``python -m store``: its status line and its one-line error show the URL redacted, query included."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("DATABASE_URL", None)
    user = pg_url.split("://", 1)[1].split("@", 1)[0]
    good = pg_url.replace(f"://{user}@", f"://{user}:pw-user-1@") + "?password=pw-query-2"
    bad = "postgresql://bot:pw-user-1@127.0.0.1:1/dalle?password=pw-query-2&sslpassword=pw-ssl-3"
    for url, code in ((good, 0), (bad, 2)):
        out = subprocess.run([sys.executable, "-m", "store", "current"], cwd=tmp_path, env={**env, "DATABASE_URL": url},
                             capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        assert out.returncode == code, text
        assert "Traceback" not in text and "pw-" not in text, text
        shown = (out.stdout if code == 0 else out.stderr).strip().splitlines()
        assert len(shown) == 1 and "password=***" in shown[0] and ":***@" in shown[0], text
