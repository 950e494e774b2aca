"""Engines and sessions from ONE ``DATABASE_URL``, and the "is the schema current?" gate.

``sqlite:///x`` becomes ``sqlite+pysqlite`` (sync: Alembic, training scripts) and ``sqlite+aiosqlite``
(async: the bot); ``postgresql://`` becomes ``postgresql+psycopg`` and ``postgresql+asyncpg``.

SQLite is made safe for several concurrent async writers: WAL journal (readers never block the writer),
foreign keys on, a busy timeout, and every transaction opened with ``BEGIN IMMEDIATE`` so a transaction that
reads and then writes cannot fail with "database is locked" when another writer got in between (a deferred
transaction's lock upgrade fails at once, without waiting for the busy timeout). Read-only sessions can opt
out with the execution option ``sqlite_begin="DEFERRED"`` (the repository's reads do).
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000

_SQLITE_DRIVERS = {"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"}
_PG_DRIVERS = {
    "postgres",
    "postgresql",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "postgresql+asyncpg",
    "postgresql+pg8000",
}


class DatabaseURLError(ValueError):
    """DATABASE_URL is malformed or names a database we don't support."""


class MigrationRequired(RuntimeError):
    """The database schema is not at the code's Alembic head and automatic migration is off."""


class DatabaseUnavailable(RuntimeError):
    """The database could not be opened or read; the message is one line, with any password hidden."""


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be reached (refused, reset, restarting, a dropped connection),
    as opposed to a statement the database refused: the former is worth trying again once it is back."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if isinstance(exc, OSError) and (exc.errno in _NETWORK_ERRNOS or "Connect call failed" in str(exc)):
            return True  # asyncpg: "Multiple exceptions: [Errno 111] Connect call failed ..." carries no errno
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, (OperationalError, InterfaceError)) and not isinstance(exc.orig, sqlite3.Error):
            return True  # PostgreSQL drivers: connection lost, server shutting down or starting up
        if type(exc).__name__ in _PG_UNAVAILABLE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                             errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})

# asyncpg / psycopg errors raised while the server restarts (by name: store is the only place they are known)
_PG_UNAVAILABLE = frozenset({"CannotConnectNowError", "ConnectionDoesNotExistError", "ConnectionFailureError",
                             "AdminShutdownError", "CrashShutdownError", "PostgresConnectionError",
                             "ConnectionRejectionError", "AdminShutdown", "CannotConnectNow", "CrashShutdown"})


def default_sqlite_url(cwd: str | Path | None = None) -> str:
    """``sqlite:///./data/dalle.db`` if ``./data`` is (or can be made) writable, else the user data dir."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    data = base / "data"
    try:
        data.mkdir(parents=True, exist_ok=True)
        if os.access(data, os.W_OK):
            return f"sqlite:///{data.resolve() / 'dalle.db'}"
    except OSError:
        pass
    from platformdirs import user_data_dir

    fallback = Path(user_data_dir("dalle-bot", appauthor=False))
    fallback.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{fallback / 'dalle.db'}"


def parse_url(url: str | URL) -> URL:
    """Parse and check a database URL; raise :class:`DatabaseURLError` with a readable reason."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError) as exc:
        raise DatabaseURLError(f"not a database URL (expected e.g. sqlite:///data/dalle.db or "
                               f"postgresql://user@host/db): {exc}") from None
    name = parsed.drivername
    if name in _SQLITE_DRIVERS:
        return parsed
    if name in _PG_DRIVERS:
        if not parsed.database:
            raise DatabaseURLError("postgresql URL has no database name (postgresql://user@host:5432/dbname)")
        return parsed
    raise DatabaseURLError(f"unsupported database {name!r}: use sqlite:///path or postgresql://...")


def sync_url(url: str | URL) -> URL:
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+pysqlite")
    return parsed.set(drivername="postgresql+psycopg")


def async_url(url: str | URL) -> URL:
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    return parsed.set(drivername="postgresql+asyncpg")


_SECRET_KEY_PARTS = ("password", "passwd", "token", "secret")
_SECRET_KEYS = frozenset({"pwd", "apikey", "api_key", "auth"})


def is_secret_key(name: str) -> bool:
    """Whether a URL query parameter (or setting) of this name holds a secret: ``password``, ``sslpassword``,
    ``token``, ``access_token``, ``client_secret``, ``pwd``, ``api_key``…"""
    low = name.lower()
    return low in _SECRET_KEYS or any(part in low for part in _SECRET_KEY_PARTS)


def redact_url(url: str | URL) -> str:
    """The URL with any password masked, in its user part and in its query (``?password=``, ``sslpassword``,
    ``token``…), safe for logs and error messages."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError):
        return "<unparseable database URL>"
    if any(is_secret_key(k) for k in parsed.query):
        parsed = parsed.set(query={k: "***" if is_secret_key(k) else v for k, v in parsed.query.items()})
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def url_secrets(url: str | URL) -> list[str]:
    """The secret values a database URL holds (its password and secret query values), for log redaction."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError):
        return []
    found = [parsed.password] if parsed.password else []
    for key, value in parsed.query.items():
        if is_secret_key(key):
            found += [value] if isinstance(value, str) else list(value)
    return [str(v) for v in found if v]


def _sqlite_file(url: URL) -> Path | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def _install_sqlite_pragmas(sync_engine: Engine) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # take transaction control away from the driver so we can issue BEGIN IMMEDIATE ourselves
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # read-only work may ask for a deferred transaction (execution option sqlite_begin="DEFERRED"):
        # in WAL mode readers then never hold the write lock
        mode = str(conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")).upper()
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"sqlite_begin must be DEFERRED, IMMEDIATE or EXCLUSIVE; got {mode!r}")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _prepare(url: URL) -> None:
    path = _sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def make_sync_engine(url: str | URL, **kwargs: Any) -> Engine:
    """A sync engine (psycopg / pysqlite) for Alembic, scripts and training."""
    target = sync_url(url)
    _prepare(target)
    kwargs.setdefault("hide_parameters", True)  # bound values (user text, tokens) stay out of errors and logs
    engine = create_engine(target, **kwargs)
    if target.get_backend_name() == "sqlite":
        _install_sqlite_pragmas(engine)
    return engine


def make_async_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An async engine (asyncpg / aiosqlite) for the bot."""
    target = async_url(url)
    _prepare(target)
    if target.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("hide_parameters", True)  # bound values (user text, tokens) stay out of errors and logs
    engine = create_async_engine(target, **kwargs)
    if target.get_backend_name() == "sqlite":
        _install_sqlite_pragmas(engine.sync_engine)
    return engine


def sync_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def async_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (the bot hands rows around after the transaction)."""
    return async_sessionmaker(engine, expire_on_commit=False)


# --- migrations ---------------------------------------------------------------------------------------------


def migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str | URL | None = None, *, configure_logging: bool = False):  # -> alembic.config.Config
    """An Alembic config that works without ``alembic.ini`` (installed package) and points at ``url``.

    ``configure_logging``: let env.py apply alembic.ini's logging setup (the CLI wants it; the bot, which
    configured its own logging, does not).
    """
    from alembic.config import Config

    ini = migrations_dir().parent / "alembic.ini"
    cfg = Config(str(ini)) if ini.is_file() else Config()
    cfg.attributes["skip_logging_config"] = not configure_logging
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        # ConfigParser interpolates '%': escape it so passwords with % survive
        rendered = sync_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def _has_app_tables(url: str | URL) -> bool:
    from sqlalchemy import inspect

    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return bool(set(inspect(conn).get_table_names()) - {"alembic_version"})
    finally:
        engine.dispose()


def schema_revisions(url: str | URL) -> tuple[set[str], set[str]]:
    """(current revisions in the database, head revisions of the code)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    return current, heads


def upgrade(url: str | URL, revision: str = "head", *, configure_logging: bool = False) -> None:
    from alembic import command

    command.upgrade(alembic_config(url, configure_logging=configure_logging), revision)


def downgrade(url: str | URL, revision: str = "-1", *, configure_logging: bool = False) -> None:
    from alembic import command

    command.downgrade(alembic_config(url, configure_logging=configure_logging), revision)


def ensure_migrated(url: str | URL, auto: bool) -> bool:
    """Make sure the schema is at head. Returns True if a migration ran.

    ``auto``: upgrade now. Otherwise raise :class:`MigrationRequired` naming the exact command to run.
    A database that is *ahead* of the code (newer revision than we know) is always an error. A database that
    cannot be reached raises :class:`DatabaseUnavailable`, so callers need not know SQLAlchemy's errors.
    """
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _ensure_migrated(url, auto)
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        for secret in url_secrets(url):  # a driver may echo what it was given
            reason = reason.replace(secret, "***")
        raise DatabaseUnavailable(f"cannot open {redact_url(url)}: {reason}") from exc


def check_writable(url: str | URL) -> None:
    """Commit one real write, so a database the process can read but not write (a read-only file or one owned by
    another user, a full disk, a read-only PostgreSQL role, database or replica) is refused at start-up rather than
    failing every request later. The write changes nothing: ``alembic_version`` set to itself (the schema is at
    head by then, so the row exists; SQLite and PostgreSQL both really write and commit it).

    Raises :class:`DatabaseUnavailable` with one line, the password hidden.
    """
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = make_sync_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
        finally:
            engine.dispose()
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        for secret in url_secrets(url):
            reason = reason.replace(secret, "***")
        raise DatabaseUnavailable(f"cannot write to {redact_url(url)}: {reason}") from exc


def _ensure_migrated(url: str | URL, auto: bool) -> bool:
    current, heads = schema_revisions(url)
    if current == heads:
        return False
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = current - known
    shown = redact_url(url)
    if unknown:
        raise MigrationRequired(
            f"database {shown} is at revision {', '.join(sorted(unknown))}, which this code does not know "
            f"(newer code migrated it?); run a matching version of dalle-bot"
        )
    if not current and _has_app_tables(url):
        raise MigrationRequired(
            f"database {shown} has tables but no Alembic revision (created outside migrations?); if its schema "
            f"matches the code run `alembic stamp head`, otherwise point DATABASE_URL at an empty database"
        )
    if not auto:
        now = ", ".join(sorted(current)) or "empty"
        raise MigrationRequired(
            f"database {shown} schema is not current (at {now}, code expects {', '.join(sorted(heads))}); "
            f"run `python -m store upgrade` (it uses the same DATABASE_URL) or set AUTO_MIGRATE=true"
        )
    upgrade(url, "head")
    return True
