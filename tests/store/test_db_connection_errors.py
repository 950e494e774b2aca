"""``store.db.is_connection_error``: what the bot tries again once the database is back, and what it does not."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from store.db import is_connection_error, make_async_engine


def test_refused_and_reset_connections_are_connection_errors():
    assert is_connection_error(ConnectionRefusedError(111, "Connect call failed"))
    assert is_connection_error(ConnectionResetError())
    assert is_connection_error(OSError("Multiple exceptions: [Errno 111] Connect call failed ('127.0.0.1', 5432)"))
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("while claiming") from inner
    except RuntimeError as outer:
        assert is_connection_error(outer)  # found through the cause chain


def test_refused_statements_are_not_connection_errors():
    assert not is_connection_error(IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")))
    assert not is_connection_error(OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x")))
    assert not is_connection_error(ValueError("bad value"))
    assert not is_connection_error(FileNotFoundError(2, "No such file or directory"))  # not the network
    assert not is_connection_error(OSError(28, "No space left on device"))


async def test_a_postgresql_server_that_is_not_there_is_a_connection_error(unused_tcp_port):
    engine = make_async_engine(f"postgresql://postgres@127.0.0.1:{unused_tcp_port}/test")
    try:
        with pytest.raises(Exception) as err:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert is_connection_error(err.value), repr(err.value)
