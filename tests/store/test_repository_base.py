"""What every repository method relies on: the database clock and read sessions that never block writers."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import text

from store.models import utcnow
from store.repository import Repository


async def test_now_keeps_the_database_clock_when_the_local_clock_steps(migrated_url):
    """After a sync, ``now()`` runs on the monotonic clock from the database time it read: the host's wall clock
    stepping back 90 s (NTP, a resumed VM) right after leaves it on the database's time, not 90 s behind."""
    step = [timedelta(0)]
    host = Repository.from_url(migrated_url, clock=lambda: utcnow() + step[0])
    try:
        await host.sync_clock()
        step[0] = timedelta(seconds=-90)
        assert abs(host.now() - utcnow()) < timedelta(seconds=2)
        assert abs(await host.sync_clock() - timedelta(seconds=90)) < timedelta(seconds=2)  # what it measured
        assert abs(host.now() - utcnow()) < timedelta(seconds=2)
    finally:
        await host.close()


async def test_a_clock_sample_with_a_slow_round_trip_does_not_replace_a_good_one(migrated_url):
    """A reading of the database's clock that took over a second to come back is too uncertain: the first one is
    used (there is nothing better), a later one keeps the anchor it had; a quick one replaces it."""
    ticks = {"t": 0.0, "per_call": 0.0}

    def monotonic() -> float:
        ticks["t"] += ticks["per_call"]
        return ticks["t"]

    host = Repository.from_url(migrated_url, monotonic=monotonic)
    try:
        ticks["per_call"] = 2.0  # every reading of the monotonic clock sees 2 s more: a 2 s round trip
        await host.sync_clock()
        first = host._anchor
        assert first is not None
        await host.sync_clock()
        assert host._anchor == first
        ticks["per_call"] = 0.0
        await host.sync_clock()
        assert host._anchor != first and host._anchor[1] == ticks["t"]
    finally:
        await host.close()


async def test_open_read_session_does_not_block_writers(repo):
    """Repository reads use deferred transactions on SQLite: a long read never holds the write lock."""
    await repo.create_generation(user_id=1, prompt="a")
    async with repo._read() as s:
        assert (await s.execute(text("SELECT count(*) FROM generations"))).scalar_one() == 1
        await asyncio.wait_for(repo.create_generation(user_id=2, prompt="b"), timeout=5)
    assert len(await repo.queued_generations()) == 2
