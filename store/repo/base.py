"""What every part of the repository shares: the session factory, the database clock, read-only sessions, the
retry of an insert that raced a concurrent one, the create-or-update of a keyed settings row, and value checks.

Every repository method is one short transaction on its own session and returns detached rows whose columns
stay readable (``expire_on_commit=False``). Rows are snapshots: change them through the repository, not by
mutating the returned objects.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from store.db import async_session_factory, make_async_engine
from store.models import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how often a transaction that lost an insert race is run again before its IntegrityError is raised
INSERT_RACE_ATTEMPTS = 3


class NotFound(LookupError):
    """The row the caller named does not exist."""


def check_choice(name: str, value: Any, allowed: type[enum.Enum], nullable: bool = False) -> str | None:
    """``value`` as a string if it is one of the enum's values (None too when ``nullable``); else ValueError."""
    if value is None and nullable:
        return None
    values = [v.value for v in allowed]
    if value not in values:
        raise ValueError(f"{name} must be one of {', '.join(values)}; got {value!r}")
    return str(value)


class RepositoryBase:
    """Sessions, the clock and the shared transaction patterns; construct with a session factory or
    :meth:`from_url`.

    Timestamps the repository writes, and the leases processes compare, are on the *database's* clock once
    :meth:`sync_clock` has run: ``now()`` is the database time read at the last sync plus the time elapsed since
    on a monotonic clock, so processes on hosts whose clocks disagree still agree on whose lease ran out, and a
    step of the local wall clock (NTP, a resumed VM) changes nothing. ``clock`` is the local wall clock, used
    until the first sync; ``monotonic`` measures elapsed time (tests replace both)."""

    #: a clock sample whose round trip took longer than this is too uncertain to replace a good one
    MAX_SYNC_ROUND_TRIP_S = 1.0

    def __init__(self, sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine | None = None,
                 clock: Callable[[], datetime] = utcnow, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self._engine = engine
        self._clock = clock
        self._monotonic = monotonic
        self._anchor: tuple[datetime, float] | None = None  # (database time, monotonic time) of the last sync
        self.clock_offset = timedelta(0)  # database minus local wall clock, as last measured (for logs)

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], datetime] = utcnow,
                 monotonic: Callable[[], float] = time.monotonic, **engine_kwargs: Any) -> Self:
        engine = make_async_engine(url, **engine_kwargs)
        return cls(async_session_factory(engine), engine, clock=clock, monotonic=monotonic)

    async def close(self) -> None:
        """Dispose the engine if this repository created it."""
        if self._engine is not None:
            await self._engine.dispose()

    @property
    def single_process(self) -> bool:
        """True on SQLite: a bot process holds the database file's lock (``bot.preflight``), so no other bot runs
        on it and every running job at start-up was left by a dead process."""
        bind = self._engine or self.sessions.kw.get("bind")
        return bind is not None and bind.dialect.name == "sqlite"

    # --- the database clock --------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The database's current time, as this process best knows it (the local clock before any sync)."""
        if self._anchor is None:
            return self._clock()
        db_then, mono_then = self._anchor
        return db_then + timedelta(seconds=self._monotonic() - mono_then)

    async def sync_clock(self) -> timedelta:
        """Read the database's clock and anchor :meth:`now` on it (taken at the middle of the round trip);
        returns how far the database's clock is ahead of the local wall clock. A sample whose round trip took
        over ``MAX_SYNC_ROUND_TRIP_S`` is dropped when an earlier one exists. PostgreSQL: ``clock_timestamp()``;
        SQLite: the host's clock, which corrects nothing on a real host but keeps one code path."""
        async with self._read() as s:
            start = self._monotonic()
            if s.bind.dialect.name == "postgresql":
                db_now = (await s.execute(text("SELECT clock_timestamp()"))).scalar_one()
            else:
                raw = (await s.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))).scalar_one()
                db_now = datetime.fromisoformat(raw).replace(tzinfo=UTC)
            end = self._monotonic()
        if end - start > self.MAX_SYNC_ROUND_TRIP_S and self._anchor is not None:
            log.info("database clock sample dropped: its round trip took %.1f s", end - start)
            return self.clock_offset
        mid = (start + end) / 2
        self._anchor = (db_now, mid)
        self.clock_offset = db_now - (self._clock() - timedelta(seconds=self._monotonic() - mid))
        return self.clock_offset

    # --- transaction patterns ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only: on SQLite its transaction is DEFERRED, so it never blocks writers."""
        async with self.sessions() as s:
            await s.connection(execution_options={"sqlite_begin": "DEFERRED"})
            yield s

    async def _insert_race(self, work: Callable[[AsyncSession], Awaitable[tuple[T, bool]]]) -> T:
        """Run ``work`` in a transaction of its own and return its result. ``work`` returns ``(result, inserted)``:
        whether it added a row that a concurrent transaction may have added first (both wanted the same unique
        key). When committing such a row fails with IntegrityError, the other transaction won: ``work`` runs
        again and finds that row. Any other IntegrityError, or the last attempt's, is raised."""
        for attempt in range(INSERT_RACE_ATTEMPTS):
            inserted = False
            try:
                async with self.sessions.begin() as s:
                    result, inserted = await work(s)
                return result
            except IntegrityError:
                if not inserted or attempt == INSERT_RACE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _upsert(self, model: type, key: int, fields: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
        """Create (with ``defaults``) or update the ``model`` row of primary key ``key``, setting ``fields`` and
        stamping ``updated_at``; quotas must not be negative (the database's CHECK constraints agree)."""
        for quota in ("daily_quota", "max_queue_per_user"):
            if fields.get(quota) is not None and int(fields[quota]) < 0:
                raise ValueError(f"{quota} must be >= 0; got {fields[quota]}")

        async def work(s: AsyncSession) -> tuple[Any, bool]:
            row = await s.get(model, key, with_for_update=True)
            created = row is None
            if row is None:
                row = model(**{model.__mapper__.primary_key[0].key: key}, **defaults)  # type: ignore[attr-defined]
                s.add(row)
            for name, value in fields.items():
                setattr(row, name, value)
            row.updated_at = self.now()
            return row, created

        return await self._insert_race(work)
