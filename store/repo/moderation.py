"""Moderation: review cases, the moderators' audited actions, each user's state (ban, strikes, quota and
cooldown overrides, training opt-out), and the record of prompts the filters and limits turned away.

A case is a flagged or reported image awaiting (or after) a moderator's decision, at most one open case per
image. Every moderator decision is a :class:`ModerationAction` row written in the same transaction as its effect.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from store.models import (
    CaseSource,
    CaseStatus,
    Generation,
    Image,
    ModAction,
    ModerationAction,
    ModerationCase,
    Refusal,
    UserState,
)
from store.repo.base import NotFound, RepositoryBase, check_choice

_USER_FIELDS = frozenset({"banned", "ban_reason", "opted_out", "strikes", "cooldown_until", "daily_quota"})


class ModerationRepository(RepositoryBase):
    """Cases, actions, user state and refusals."""

    # --- cases and actions ---------------------------------------------------------------------------------

    async def open_case(
        self,
        source: str,
        *,
        image_id: int | None = None,
        generation_id: int | None = None,
        reason: str | None = None,
    ) -> tuple[ModerationCase, bool]:
        """Open a review case; if the image already has an open case, return that one.
        Returns ``(case, created)``. Of concurrent reports on one image, one opens the case and the others
        return it (the database allows one open case per image)."""
        check_choice("source", source, CaseSource)
        if image_id is None and generation_id is None:
            raise ValueError("a moderation case needs an image_id or a generation_id")

        async def work(s: AsyncSession) -> tuple[tuple[ModerationCase, bool], bool]:
            case_generation_id = generation_id
            if image_id is not None:
                existing = (
                    await s.execute(
                        select(ModerationCase).where(
                            ModerationCase.image_id == image_id,
                            ModerationCase.status == CaseStatus.OPEN.value,
                        )
                    )
                ).scalar_one_or_none()
                if existing is not None:
                    return (existing, False), False
                if case_generation_id is None:
                    image = await s.get(Image, image_id)
                    if image is None:
                        raise NotFound(f"image {image_id} does not exist")
                    case_generation_id = image.generation_id
            case = ModerationCase(
                image_id=image_id,
                generation_id=case_generation_id,
                source=str(source),
                status=CaseStatus.OPEN.value,
                reason=reason,
                opened_at=self.now(),
            )
            s.add(case)
            return (case, True), image_id is not None  # only a case on an image can race another

        return await self._insert_race(work)

    async def set_case_review_message(self, case_id: int, message_id: int) -> ModerationCase:
        async with self.sessions.begin() as s:
            case = await s.get(ModerationCase, case_id)
            if case is None:
                raise NotFound(f"moderation case {case_id} does not exist")
            case.review_message_id = message_id
        return case

    async def get_case(self, case_id: int) -> ModerationCase | None:
        stmt = select(ModerationCase).where(ModerationCase.id == case_id).options(selectinload(ModerationCase.actions))
        async with self._read() as s:
            return (await s.execute(stmt)).scalar_one_or_none()

    async def list_open_cases(self, limit: int = 50) -> list[ModerationCase]:
        """Open cases, oldest first."""
        stmt = (
            select(ModerationCase)
            .where(ModerationCase.status == CaseStatus.OPEN.value)
            .order_by(ModerationCase.opened_at, ModerationCase.id)
            .limit(limit)
        )
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def add_action(
        self,
        case_id: int | None,
        moderator_id: int,
        action: str,
        *,
        reason: str | None = None,
        target_user_id: int | None = None,
    ) -> ModerationAction:
        """Record a moderator's action and apply it in the same transaction:

        - approve: case → approved (closed), the image is un-hidden;
        - remove: case → removed (closed), the image is hidden;
        - ban / unban: the target user (default: the author of the case's generation) is (un)banned;
          a ban adds a strike. The case stays as it is.
        """
        check_choice("action", action, ModAction)
        async with self.sessions.begin() as s:
            case = None
            if case_id is not None:
                case = await s.get(ModerationCase, case_id)
                if case is None:
                    raise NotFound(f"moderation case {case_id} does not exist")
            now = self.now()
            if action in (ModAction.APPROVE, ModAction.REMOVE):
                if case is None:
                    raise ValueError(f"{action} needs a case")
                case.status = CaseStatus.APPROVED.value if action == ModAction.APPROVE else CaseStatus.REMOVED.value
                case.closed_at = now
                if case.image_id is not None:
                    image = await s.get(Image, case.image_id)
                    if image is not None:
                        image.hidden = action == ModAction.REMOVE
            else:
                if target_user_id is None and case is not None and case.generation_id is not None:
                    gen = await s.get(Generation, case.generation_id)
                    target_user_id = gen.user_id if gen is not None else None
                if target_user_id is None:
                    raise ValueError(f"{action} needs a target_user_id (or a case with a generation)")
                state = await s.get(UserState, target_user_id)
                if state is None:
                    state = UserState(user_id=target_user_id, banned=False, opted_out=False, strikes=0)
                    s.add(state)
                if action == ModAction.BAN:
                    state.banned = True
                    state.ban_reason = reason
                    state.strikes = (state.strikes or 0) + 1
                else:
                    state.banned = False
                    state.ban_reason = None
                state.updated_at = now
            row = ModerationAction(
                case_id=case_id,
                moderator_id=moderator_id,
                action=str(action),
                target_user_id=target_user_id,
                reason=reason,
                created_at=now,
            )
            s.add(row)
        return row

    # --- user state ----------------------------------------------------------------------------------------

    async def get_user_state(self, user_id: int) -> UserState | None:
        async with self._read() as s:
            return await s.get(UserState, user_id)

    async def update_user_state(self, user_id: int, **fields: Any) -> UserState:
        """Create or update a user's state (banned, ban_reason, opted_out, strikes, cooldown_until, daily_quota)."""
        unknown = set(fields) - _USER_FIELDS
        if unknown:
            raise ValueError(f"unknown user state field(s): {', '.join(sorted(unknown))}")
        return await self._upsert(UserState, user_id, fields, {"banned": False, "opted_out": False, "strikes": 0})


    async def add_strike(self, user_id: int) -> int:
        """Increment a user's strike count atomically; returns the new count."""

        async def work(s: AsyncSession) -> tuple[UserState, bool]:
            state = await s.get(UserState, user_id, with_for_update=True)
            created = state is None
            if state is None:
                state = UserState(user_id=user_id, banned=False, opted_out=False, strikes=0)
                s.add(state)
            state.strikes = (state.strikes or 0) + 1
            state.updated_at = self.now()
            return state, created

        return (await self._insert_race(work)).strikes

    # --- refusals ------------------------------------------------------------------------------------------

    async def record_refusal(
        self,
        *,
        user_id: int,
        prompt: str,
        reason: str,
        guild_id: int | None = None,
        normalized: str | None = None,
    ) -> Refusal:
        row = Refusal(
            user_id=user_id, guild_id=guild_id, prompt=prompt, normalized=normalized, reason=reason,
            created_at=self.now(),
        )
        async with self.sessions.begin() as s:
            s.add(row)
        return row

    async def list_refusals(
        self, *, user_id: int | None = None, since: datetime | None = None, limit: int = 100
    ) -> list[Refusal]:
        """Newest first."""
        stmt = select(Refusal).order_by(Refusal.created_at.desc(), Refusal.id.desc()).limit(limit)
        if user_id is not None:
            stmt = stmt.where(Refusal.user_id == user_id)
        if since is not None:
            stmt = stmt.where(Refusal.created_at >= since)
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())
