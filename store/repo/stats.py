"""Counts for the bot's metrics endpoint: the shared queue and the moderation backlog, across every process."""

from __future__ import annotations

from sqlalchemy import func, select

from store.models import CaseStatus, Generation, ModerationCase
from store.repo.base import RepositoryBase


class StatsRepository(RepositoryBase):
    async def generation_counts(self) -> dict[str, int]:
        """How many generations are in each status (statuses with none are absent)."""
        stmt = select(Generation.status, func.count()).group_by(Generation.status)
        async with self._read() as s:
            return {status: int(n) for status, n in (await s.execute(stmt)).all()}

    async def open_case_count(self) -> int:
        stmt = select(func.count()).select_from(ModerationCase).where(ModerationCase.status == CaseStatus.OPEN.value)
        async with self._read() as s:
            return int((await s.execute(stmt)).scalar_one())
