"""Moderation: review cases, the moderators' audited actions, each user's state (ban, strikes, quota and
cooldown overrides, training opt-out), and the record of prompts the filters and limits turned away.

A case is a flagged or reported image awaiting (or after) a moderator's decision, at most one open case per
image. Every moderator decision is a :class:`ModerationAction` row written in the same transaction as its effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from store.models import (
    CaseSource,
    CaseStatus,
    Feedback,
    FeedbackKind,
    Generation,
    GuildBan,
    Image,
    ModAction,
    ModerationAction,
    ModerationCase,
    Refusal,
    Strike,
    UserState,
)
from store.repo.base import NotFound, RepositoryBase, check_choice

_USER_FIELDS = frozenset({"banned", "ban_reason", "opted_out", "strikes", "cooldown_until", "daily_quota"})
_CLOSING = {ModAction.APPROVE: CaseStatus.APPROVED, ModAction.REMOVE: CaseStatus.REMOVED,
            ModAction.DISMISS: CaseStatus.DISMISSED}


class CaseClosed(ValueError):
    """The case was already decided (another moderator was quicker): nothing was changed."""


@dataclass(frozen=True)
class UserRecord:
    """A user's record for moderators: in one guild where ``guild_id`` is given (bans and cases), everywhere
    otherwise."""

    user_id: int
    generations: int
    refusals: int
    strikes: int
    globally_banned: bool
    bans: list[GuildBan]  # newest first
    cases: list[ModerationCase]  # cases on their images, newest first
    live_strikes: int = 0  # strikes that still count (``strikes`` is the lifetime count)
    reports_made: int = 0  # images they reported


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
            gen = await s.get(Generation, case_generation_id) if case_generation_id is not None else None
            case = ModerationCase(
                image_id=image_id,
                generation_id=case_generation_id,
                guild_id=gen.guild_id if gen is not None else None,
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
        guild_id: int | None = None,
    ) -> ModerationAction:
        """Record a moderator's action and apply it in the same transaction:

        - approve: case → approved (closed), the image is un-hidden;
        - remove: case → removed (closed), the image is hidden;
        - dismiss: case → dismissed (closed), the image stays as it is;
        - ban / unban: the operator's global ban of the target user (default: the author of the case's
          generation); a ban adds a strike. The case stays as it is. (A guild's ban is :meth:`ban_in_guild`.)
        - settings: only recorded (the change itself went through ``update_guild_settings``).

        Closing a case that is no longer open raises :class:`CaseClosed` and changes nothing. ``guild_id``
        (where the action was taken) defaults to the case's guild.
        """
        check_choice("action", action, ModAction)
        async with self.sessions.begin() as s:
            case = None
            if case_id is not None:
                case = await s.get(ModerationCase, case_id, with_for_update=True)
                if case is None:
                    raise NotFound(f"moderation case {case_id} does not exist")
                if guild_id is None and action in _CLOSING:  # a global ban/unban belongs to no guild
                    guild_id = case.guild_id
            now = self.now()
            if action in _CLOSING:
                if case is None:
                    raise ValueError(f"{action} needs a case")
                if case.status != CaseStatus.OPEN.value:
                    raise CaseClosed(f"case {case_id} is already {case.status}")
                case.status = _CLOSING[ModAction(action)].value
                case.closed_at = now
                if case.image_id is not None and action != ModAction.DISMISS:
                    image = await s.get(Image, case.image_id)
                    if image is not None:
                        image.hidden = action == ModAction.REMOVE
            elif action in (ModAction.BAN, ModAction.UNBAN):
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
                guild_id=guild_id,
                action=str(action),
                target_user_id=target_user_id,
                reason=reason,
                created_at=now,
            )
            s.add(row)
        return row

    async def list_guild_cases(self, guild_id: int, *, open_only: bool = True, limit: int = 20) -> list[ModerationCase]:
        """A guild's cases: the open ones oldest first, or all of them newest first."""
        stmt = select(ModerationCase).where(ModerationCase.guild_id == guild_id).limit(limit)
        if open_only:
            stmt = stmt.where(ModerationCase.status == CaseStatus.OPEN.value).order_by(
                ModerationCase.opened_at, ModerationCase.id)
        else:
            stmt = stmt.order_by(ModerationCase.id.desc())
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def list_unposted_cases(self, generation_id: int | None = None, limit: int = 100) -> list[ModerationCase]:
        """Open cases not yet posted to a review channel (of one generation, or all), oldest first."""
        stmt = (
            select(ModerationCase)
            .where(ModerationCase.status == CaseStatus.OPEN.value, ModerationCase.review_message_id.is_(None))
            .order_by(ModerationCase.opened_at, ModerationCase.id)
            .limit(limit)
        )
        if generation_id is not None:
            stmt = stmt.where(ModerationCase.generation_id == generation_id)
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def case_reports(self, case_id: int) -> list[Feedback]:
        """The reports on the case's image since an earlier case on it was closed (all of them if none was),
        oldest first: the reports this case answers."""
        async with self._read() as s:
            case = await s.get(ModerationCase, case_id)
            if case is None or case.image_id is None:
                return []
            previous = (await s.execute(
                select(func.max(ModerationCase.closed_at)).where(
                    ModerationCase.image_id == case.image_id, ModerationCase.id < case.id))).scalar_one_or_none()
            stmt = (select(Feedback)
                    .where(Feedback.image_id == case.image_id, Feedback.kind == FeedbackKind.REPORT.value)
                    .order_by(Feedback.created_at, Feedback.id))
            if previous is not None:
                stmt = stmt.where(Feedback.created_at >= previous)
            return list((await s.execute(stmt)).scalars())

    async def removed_image_ids(self, generation_id: int) -> set[int]:
        """The generation's images a moderator removed (hidden, with a case closed as removed, or made before a
        ``purge`` of their author in that guild)."""
        stmt = (select(Image.id).join(ModerationCase, ModerationCase.image_id == Image.id)
                .where(Image.generation_id == generation_id, Image.hidden.is_(True),
                       ModerationCase.status == CaseStatus.REMOVED.value))
        purged = (select(Image.id).join(Generation, Generation.id == Image.generation_id)
                  .join(ModerationAction, (ModerationAction.action == ModAction.PURGE.value)
                        & (ModerationAction.target_user_id == Generation.user_id)
                        & (ModerationAction.guild_id == Generation.guild_id)
                        & (ModerationAction.created_at >= Image.created_at))
                  .where(Image.generation_id == generation_id, Image.hidden.is_(True)))
        async with self._read() as s:
            return set((await s.execute(stmt)).scalars()) | set((await s.execute(purged)).scalars())

    # --- guild bans ----------------------------------------------------------------------------------------

    async def ban_in_guild(self, guild_id: int, user_id: int, moderator_id: int, *, reason: str | None,
                           expires_at: datetime | None, case_id: int | None = None) -> GuildBan:
        """Ban a user from generating in a guild until ``expires_at`` (None: permanently); audited as a ``ban``
        action in the same transaction."""
        async with self.sessions.begin() as s:
            now = self.now()
            ban = GuildBan(guild_id=guild_id, user_id=user_id, reason=reason, moderator_id=moderator_id,
                           case_id=case_id, created_at=now, expires_at=expires_at)
            s.add(ban)
            until = expires_at.isoformat(timespec="minutes") if expires_at is not None else "permanent"
            s.add(ModerationAction(case_id=case_id, moderator_id=moderator_id, guild_id=guild_id,
                                   action=ModAction.BAN.value, target_user_id=user_id,
                                   reason=f"{reason or ''} (until {until})".strip(), created_at=now))
        return ban

    async def active_guild_ban(self, guild_id: int, user_id: int) -> GuildBan | None:
        """The user's ban in the guild that holds now (the one ending last), or None."""
        now = self.now()
        stmt = (select(GuildBan)
                .where(GuildBan.guild_id == guild_id, GuildBan.user_id == user_id, GuildBan.lifted_at.is_(None),
                       or_(GuildBan.expires_at.is_(None), GuildBan.expires_at > now))
                .order_by(GuildBan.expires_at.is_(None).desc(), GuildBan.expires_at.desc()).limit(1))
        async with self._read() as s:
            return (await s.execute(stmt)).scalar_one_or_none()

    async def lift_guild_bans(self, guild_id: int, user_id: int, moderator_id: int,
                              reason: str | None = None) -> int:
        """Lift the user's bans in the guild (audited as ``unban``); returns how many were in force."""
        async with self.sessions.begin() as s:
            now = self.now()
            bans = list((await s.execute(select(GuildBan).where(
                GuildBan.guild_id == guild_id, GuildBan.user_id == user_id, GuildBan.lifted_at.is_(None),
                or_(GuildBan.expires_at.is_(None), GuildBan.expires_at > now)))).scalars())
            for ban in bans:
                ban.lifted_at = now
            s.add(ModerationAction(moderator_id=moderator_id, guild_id=guild_id, action=ModAction.UNBAN.value,
                                   target_user_id=user_id, reason=reason, created_at=now))
        return len(bans)

    async def user_record(self, user_id: int, guild_id: int | None = None, limit: int = 10) -> UserRecord:
        """What moderators see of a user: generations, refusals, strikes, bans and cases (newest ``limit``)."""
        async with self._read() as s:
            gens = select(func.count()).select_from(Generation).where(Generation.user_id == user_id)
            refusals = select(func.count()).select_from(Refusal).where(Refusal.user_id == user_id)
            bans = select(GuildBan).where(GuildBan.user_id == user_id).order_by(GuildBan.id.desc()).limit(limit)
            cases = (select(ModerationCase).outerjoin(Generation, Generation.id == ModerationCase.generation_id)
                     .where(or_(Generation.user_id == user_id, ModerationCase.user_id == user_id))
                     .order_by(ModerationCase.id.desc()).limit(limit))
            live = select(func.count()).select_from(Strike).where(
                Strike.user_id == user_id, Strike.cleared_at.is_(None), Strike.expires_at > self.now())
            reports = (select(func.count()).select_from(Feedback).join(Image, Image.id == Feedback.image_id)
                       .join(Generation, Generation.id == Image.generation_id)
                       .where(Feedback.user_id == user_id, Feedback.kind == FeedbackKind.REPORT.value))
            if guild_id is not None:
                live = live.where(Strike.guild_id == guild_id)
                reports = reports.where(Generation.guild_id == guild_id)
                gens = gens.where(Generation.guild_id == guild_id)
                refusals = refusals.where(Refusal.guild_id == guild_id)
                bans = bans.where(GuildBan.guild_id == guild_id)
                cases = cases.where(ModerationCase.guild_id == guild_id)
            state = await s.get(UserState, user_id)
            return UserRecord(
                user_id=user_id, generations=(await s.execute(gens)).scalar_one(),
                refusals=(await s.execute(refusals)).scalar_one(),
                strikes=state.strikes if state is not None else 0,
                globally_banned=bool(state is not None and state.banned),
                bans=list((await s.execute(bans)).scalars()), cases=list((await s.execute(cases)).scalars()),
                live_strikes=(await s.execute(live)).scalar_one(), reports_made=(await s.execute(reports)).scalar_one())

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
