"""Upkeep of open cases that no moderator decides: the re-ping of old ones (once per case, claimed atomically so
two bot processes never both remind) and the closing of cases whose public message was deleted (status
``closed`` with a note, audited as ``close`` by ``SYSTEM_MODERATOR``)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import select, update

from store.models import (
    SYSTEM_MODERATOR,
    CaseStatus,
    Generation,
    GuildSettings,
    ModAction,
    ModerationAction,
    ModerationCase,
)
from store.repo.base import RepositoryBase


class CaseUpkeepRepository(RepositoryBase):
    """Re-pings and automatic closing of cases."""

    async def cases_due_for_reping(self, default_hours: int, limit: int = 50, *,
                                   own_channel_only: bool = False) -> list[ModerationCase]:
        """Posted open cases never re-pinged, open longer than their guild's ``reping_hours`` (``default_hours``
        where the guild sets none; 0 turns re-pinging off), oldest first. ``own_channel_only`` (there is no global
        review channel): only cases whose guild still has a review channel, so that cases nobody can be reminded
        of do not fill every page and hold back the rest."""
        stmt = (select(ModerationCase, GuildSettings.reping_hours)
                .outerjoin(GuildSettings, GuildSettings.guild_id == ModerationCase.guild_id)
                .where(ModerationCase.status == CaseStatus.OPEN.value, ModerationCase.repinged_at.is_(None),
                       ModerationCase.review_message_id.is_not(None))
                .order_by(ModerationCase.opened_at, ModerationCase.id))
        if own_channel_only:
            stmt = stmt.where(GuildSettings.review_channel_id.is_not(None))
        now = self.now()
        due = []
        async with self._read() as s:
            for case, hours in (await s.execute(stmt)).all():
                hours = default_hours if hours is None else hours
                if hours and hours > 0 and case.opened_at <= now - timedelta(hours=hours):
                    due.append(case)
                    if len(due) >= limit:
                        break
        return due

    async def claim_reping(self, case_id: int) -> bool:
        """Stamp the case re-pinged if it is still open and was not yet; True for the one caller that did."""
        async with self.sessions.begin() as s:
            done = await s.execute(update(ModerationCase).where(
                ModerationCase.id == case_id, ModerationCase.status == CaseStatus.OPEN.value,
                ModerationCase.repinged_at.is_(None)).values(repinged_at=self.now()))
        return done.rowcount == 1

    async def close_cases_of_messages(self, message_ids: Iterable[int], note: str) -> list[int]:
        """Close the open cases on the results posted as these messages (status ``closed``, ``note``), each
        audited as ``close`` by ``SYSTEM_MODERATOR``; returns their ids (none: nothing written). A result its
        author deleted with 🗑 (``mark_result_deleted``) keeps its cases open: that is no way out of a report."""
        ids = sorted({int(m) for m in message_ids})
        if not ids:
            return []
        async with self.sessions.begin() as s:
            cases = list((await s.execute(
                select(ModerationCase)
                .join(Generation, Generation.id == ModerationCase.generation_id)
                .where(Generation.result_message_id.in_(ids), ModerationCase.status == CaseStatus.OPEN.value,
                       Generation.deleted_at.is_(None))  # taken down by its author: the moderators still decide
                .order_by(ModerationCase.id).with_for_update(of=ModerationCase))).scalars())
            now = self.now()
            for case in cases:
                case.status, case.note, case.closed_at = CaseStatus.CLOSED.value, note, now
                s.add(ModerationAction(case_id=case.id, moderator_id=SYSTEM_MODERATOR, guild_id=case.guild_id,
                                       action=ModAction.CLOSE.value, reason=note, created_at=now))
        return [c.id for c in cases]

