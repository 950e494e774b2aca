"""Shared helpers for the bot tests: a fresh database repository and a recording publisher."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.outcome import Outcome, ProgressUpdate
from store.db import make_sync_engine
from store.models import Base
from store.repository import Repository


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bot.db'}"


def create_schema(url: str) -> None:
    engine = make_sync_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()


def make_repo(url: str) -> Repository:
    return Repository.from_url(url)


class RecordingPublisher:
    """Collects progress updates and outcomes; ``wait_for(n)`` waits until n outcomes were published."""

    def __init__(self) -> None:
        self.progress_updates: list[ProgressUpdate] = []
        self.outcomes: list[Outcome] = []
        self._cond = asyncio.Condition()
        self.fail_next = 0

    async def progress(self, generation, update: ProgressUpdate) -> None:
        self.progress_updates.append(update)

    async def publish(self, outcome: Outcome) -> int | None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("simulated delivery failure")
        async with self._cond:
            self.outcomes.append(outcome)
            self._cond.notify_all()
        return 10_000 + outcome.generation.id

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Outcome]:
        async def _wait():
            async with self._cond:
                await self._cond.wait_for(lambda: len(self.outcomes) >= n)

        await asyncio.wait_for(_wait(), timeout)
        return self.outcomes


async def rows_of(repo: Repository, model) -> list:
    """Every row of ``model``'s table."""
    from sqlalchemy import select

    async with repo.sessions() as s:
        return list((await s.execute(select(model))).scalars())


async def wait_delivered(repo: Repository, generation_id: int):
    """The row once the service has marked it delivered (it does so just after the publisher returns)."""
    for _ in range(200):
        gen = await repo.get_generation(generation_id)
        if gen.delivered_at is not None:
            return gen
        await asyncio.sleep(0.01)
    return gen


async def wait_status(repo: Repository, generation_id: int, want: str, tries: int = 300):
    """The row once its status is ``want`` (or as it is after ``tries`` looks)."""
    for _ in range(tries):
        gen = await repo.get_generation(generation_id)
        if gen.status == want:
            return gen
        await asyncio.sleep(0.01)
    return gen
