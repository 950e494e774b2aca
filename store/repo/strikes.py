"""Strikes that expire, the cooldowns and bans their thresholds impose, and appeals.

A strike counts while it is live (not past ``expires_at`` and not cleared). Adding one, counting the live ones and
imposing what the caller's threshold asks for happen in one transaction under the user's ``user_state`` row lock,
so two strikes at once see each other and a restart forgets nothing. Every restriction the bot imposes by itself
is audited with ``moderator_id = SYSTEM_MODERATOR``. Outside a guild (DMs, the terminal) a cooldown is the user's
``user_state.cooldown_until``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from store.models import (
    SYSTEM_MODERATOR,
    BanKind,
    CaseSource,
    CaseStatus,
    Generation,
    GuildBan,
    Image,
    ModAction,
    ModerationAction,
    ModerationCase,
    Refusal,
    Strike,
    StrikeSource,
    UserState,
)
from store.repo.base import NotFound, RepositoryBase, check_choice
from store.repo.moderation import CaseClosed


@dataclass(frozen=True)
class Escalation:
    """What a threshold imposes: a cooldown or a ban, for ``length`` (None: permanent)."""

    kind: str
    length: timedelta | None
    reason: str


@dataclass(frozen=True)
class StrikeResult:
    strike: Strike
    live: int  # the user's live strikes in that guild, this one included
    imposed: str | None = None  # BanKind imposed by the threshold, if any
    until: datetime | None = None  # when it ends (None with ``imposed``: permanent)


class AppealTooSoon(ValueError):
    """The user appealed in this guild less than the guild's appeal period ago; nothing was recorded."""

    def __init__(self, next_at: datetime) -> None:
        super().__init__(f"you can appeal again after {next_at.strftime('%Y-%m-%d %H:%M')} UTC")
        self.next_at = next_at


#: refusal reasons (``bot.service``) that say nothing about the prompt itself
_NOT_ABOUT_THE_PROMPT = ("rate", "banned", "queue", "settings", "invalid", "closing")


def _same_guild(column, guild_id: int | None):
    return column.is_(None) if guild_id is None else column == guild_id


class StrikeRepository(RepositoryBase):
    """Strikes, threshold cooldowns and bans, strike resets, user cases (refusal patterns, appeals)."""

    async def _ensure_user(self, user_id: int) -> None:
        """Create the user's state row if it is missing (a transaction of its own), so it can be locked."""

        async def create(s: AsyncSession) -> tuple[None, bool]:
            if await s.get(UserState, user_id) is not None:
                return None, False
            s.add(UserState(user_id=user_id, banned=False, opted_out=False, strikes=0))
            return None, True

        await self._insert_race(create)

    async def _lock_user(self, s: AsyncSession, user_id: int) -> UserState:
        """The user's state row, locked for this transaction: one user's strikes, cases and appeals are
        serialised on it (``_ensure_user`` first)."""
        state = await s.get(UserState, user_id, with_for_update=True)
        if state is None:
            raise NotFound(f"user state {user_id} vanished")
        return state

    def _live(self, user_id: int, guild_id: int | None, now: datetime):
        return (select(func.count()).select_from(Strike)
                .where(Strike.user_id == user_id, _same_guild(Strike.guild_id, guild_id), Strike.cleared_at.is_(None),
                       Strike.expires_at > now))

    async def add_strike_expiring(
        self, user_id: int, guild_id: int | None, source: str, *, days: float, reason: str | None = None,
        case_id: int | None = None, escalate: Callable[[int], Escalation | None] | None = None,
    ) -> StrikeResult:
        """Add a strike that counts for ``days``; ``escalate(live strikes)`` says what the threshold imposes (a
        cooldown or ban in the guild, audited as ``cooldown``/``ban`` by ``SYSTEM_MODERATOR``)."""
        check_choice("source", source, StrikeSource)
        if days <= 0:
            raise ValueError(f"strikes must count for a positive number of days; got {days}")

        async def work(s: AsyncSession) -> tuple[StrikeResult, bool]:
            state = await self._lock_user(s, user_id)
            now = self.now()
            strike = Strike(guild_id=guild_id, user_id=user_id, source=str(source), reason=reason, case_id=case_id,
                            created_at=now, expires_at=now + timedelta(days=days))
            s.add(strike)
            state.strikes = (state.strikes or 0) + 1  # the lifetime count
            state.updated_at = now
            await s.flush()
            live = (await s.execute(self._live(user_id, guild_id, now))).scalar_one()
            step = escalate(live) if escalate is not None else None
            if step is None:
                return StrikeResult(strike, live), False
            check_choice("kind", step.kind, BanKind)
            until = now + step.length if step.length is not None else None
            if guild_id is None:  # outside a guild only a cooldown exists: the user's own row
                until = until or now + timedelta(days=3650)
                state.cooldown_until = max(until, state.cooldown_until) if state.cooldown_until else until
            else:
                s.add(GuildBan(guild_id=guild_id, user_id=user_id, reason=step.reason, moderator_id=SYSTEM_MODERATOR,
                               created_at=now, expires_at=until, kind=str(step.kind)))
            action = ModAction.BAN if step.kind == BanKind.BAN else ModAction.COOLDOWN
            s.add(ModerationAction(moderator_id=SYSTEM_MODERATOR, guild_id=guild_id, action=action.value,
                                   target_user_id=user_id, reason=step.reason, created_at=now))
            return StrikeResult(strike, live, str(step.kind), until), False

        await self._ensure_user(user_id)
        async with self.sessions.begin() as s:
            return (await work(s))[0]

    async def live_strikes(self, user_id: int, guild_id: int | None) -> int:
        async with self._read() as s:
            return (await s.execute(self._live(user_id, guild_id, self.now()))).scalar_one()

    async def list_strikes(self, user_id: int, guild_id: int | None, limit: int = 20) -> list[Strike]:
        """The user's strikes in the guild, live or not, newest first."""
        stmt = (select(Strike).where(Strike.user_id == user_id, _same_guild(Strike.guild_id, guild_id))
                .order_by(Strike.id.desc()).limit(limit))
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def _clear(self, s: AsyncSession, user_id: int, guild_id: int | None, now: datetime,
                     kinds: tuple[str, ...]) -> tuple[int, int]:
        """Clear the user's live strikes and lift their restrictions of ``kinds`` in force; returns the counts."""
        strikes = list((await s.execute(select(Strike).where(
            Strike.user_id == user_id, _same_guild(Strike.guild_id, guild_id), Strike.cleared_at.is_(None),
            Strike.expires_at > now))).scalars())
        for strike in strikes:
            strike.cleared_at = now
        lifted = 0
        if guild_id is None:
            state = await s.get(UserState, user_id)
            if state is not None and state.cooldown_until is not None and state.cooldown_until > now:
                state.cooldown_until, lifted = None, 1
        else:
            bans = list((await s.execute(select(GuildBan).where(
                GuildBan.guild_id == guild_id, GuildBan.user_id == user_id, GuildBan.lifted_at.is_(None),
                GuildBan.kind.in_(kinds), or_(GuildBan.expires_at.is_(None), GuildBan.expires_at > now)))).scalars())
            for ban in bans:
                ban.lifted_at = now
            lifted = len(bans)
        return len(strikes), lifted

    async def reset_strikes(self, user_id: int, guild_id: int | None, moderator_id: int,
                            reason: str | None = None) -> tuple[int, int]:
        """A moderator clears the user's live strikes in the guild and lifts the cooldowns they caused (bans
        stay); audited as ``strikes_reset``. Returns (strikes cleared, cooldowns lifted)."""
        async with self.sessions.begin() as s:
            now = self.now()
            counts = await self._clear(s, user_id, guild_id, now, (BanKind.COOLDOWN.value,))
            s.add(ModerationAction(moderator_id=moderator_id, guild_id=guild_id, action=ModAction.STRIKES_RESET.value,
                                   target_user_id=user_id, reason=reason or f"{counts[0]} strike(s) cleared",
                                   created_at=now))
        return counts

    # --- cases about a user (no image) ---------------------------------------------------------------------

    async def open_refusals_case(self, user_id: int, guild_id: int | None, reason: str) -> tuple[ModerationCase, bool]:
        """The user's open refusal-pattern case in the guild, or a new one. Returns ``(case, created)``."""

        async def work(s: AsyncSession) -> tuple[tuple[ModerationCase, bool], bool]:
            await self._lock_user(s, user_id)  # one case when two refusals cross the threshold at once
            existing = (await s.execute(select(ModerationCase).where(
                ModerationCase.user_id == user_id, ModerationCase.source == CaseSource.REFUSALS.value,
                _same_guild(ModerationCase.guild_id, guild_id), ModerationCase.status == CaseStatus.OPEN.value)
                .limit(1))).scalar_one_or_none()
            if existing is not None:
                return (existing, False), False
            case = ModerationCase(source=CaseSource.REFUSALS.value, status=CaseStatus.OPEN.value, guild_id=guild_id,
                                  user_id=user_id, reason=reason, opened_at=self.now())
            s.add(case)
            return (case, True), False

        await self._ensure_user(user_id)
        async with self.sessions.begin() as s:
            return (await work(s))[0]

    async def recent_refusals(self, user_id: int, guild_id: int | None, limit: int = 5) -> list[Refusal]:
        """The user's latest prompts refused for what they asked (a filter or AutoMod), newest first: not those
        refused for who or when (a ban, a cooldown, a rate limit, a full queue, the channel, bad options)."""
        stmt = (select(Refusal).where(Refusal.user_id == user_id, _same_guild(Refusal.guild_id, guild_id),
                                      *(Refusal.reason.not_like(f"{p}%") for p in _NOT_ABOUT_THE_PROMPT))
                .order_by(Refusal.created_at.desc(), Refusal.id.desc()).limit(limit))
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def open_appeal(self, user_id: int, guild_id: int | None, text: str, *, period: timedelta) -> ModerationCase:
        """Open an appeal case unless the user opened one in the guild within ``period`` (:class:`AppealTooSoon`,
        nothing recorded)."""
        if not text or not text.strip():
            raise ValueError("an appeal needs a text")

        async def work(s: AsyncSession) -> tuple[ModerationCase, bool]:
            await self._lock_user(s, user_id)
            now = self.now()
            last = (await s.execute(select(func.max(ModerationCase.opened_at)).where(
                ModerationCase.user_id == user_id, ModerationCase.source == CaseSource.APPEAL.value,
                _same_guild(ModerationCase.guild_id, guild_id)))).scalar_one_or_none()
            if last is not None and last + period > now:
                raise AppealTooSoon(last + period)
            case = ModerationCase(source=CaseSource.APPEAL.value, status=CaseStatus.OPEN.value, guild_id=guild_id,
                                  user_id=user_id, reason=text.strip(), opened_at=now)
            s.add(case)
            return case, False

        await self._ensure_user(user_id)
        async with self.sessions.begin() as s:
            return (await work(s))[0]

    async def decide_appeal(self, case_id: int, moderator_id: int, *, accept: bool,
                            reason: str | None = None) -> tuple[ModerationCase, int]:
        """Accept (lift the appellant's bans and cooldowns in the guild and clear their strikes) or reject an open
        appeal, audited as ``accept``/``reject``. Returns (case, restrictions lifted). A decided appeal raises
        :class:`CaseClosed` and changes nothing."""
        async with self.sessions.begin() as s:
            case = await s.get(ModerationCase, case_id, with_for_update=True)
            if case is None:
                raise NotFound(f"moderation case {case_id} does not exist")
            if case.source != CaseSource.APPEAL.value or case.user_id is None:
                raise ValueError(f"case #{case_id} is not an appeal")
            if case.status != CaseStatus.OPEN.value:
                raise CaseClosed(f"case {case_id} is already {case.status}")
            now = self.now()
            lifted = 0
            if accept:
                _, lifted = await self._clear(s, case.user_id, case.guild_id, now,
                                              (BanKind.BAN.value, BanKind.COOLDOWN.value))
            case.status = (CaseStatus.ACCEPTED if accept else CaseStatus.REJECTED).value
            case.closed_at = now
            s.add(ModerationAction(case_id=case.id, moderator_id=moderator_id, guild_id=case.guild_id,
                                   action=(ModAction.ACCEPT if accept else ModAction.REJECT).value,
                                   target_user_id=case.user_id, reason=reason, created_at=now))
        return case, lifted

    # --- purge ---------------------------------------------------------------------------------------------

    async def purge_user(self, user_id: int, guild_id: int, moderator_id: int,
                         reason: str | None = None) -> tuple[list[int], int]:
        """Hide every image the member made in the guild (``removed_image_ids`` then counts them as removed),
        audited as ``purge``. Returns (their public, posted generations to re-render, images newly hidden)."""
        async with self.sessions.begin() as s:
            now = self.now()
            images = list((await s.execute(
                select(Image).join(Generation, Generation.id == Image.generation_id)
                .where(Generation.user_id == user_id, Generation.guild_id == guild_id))).scalars())
            hidden = 0
            for image in images:
                hidden += not image.hidden
                image.hidden = True
            public = list((await s.execute(select(Generation.id).where(
                Generation.user_id == user_id, Generation.guild_id == guild_id, Generation.private.is_(False),
                Generation.result_message_id.is_not(None)).order_by(Generation.id))).scalars())
            s.add(ModerationAction(moderator_id=moderator_id, guild_id=guild_id, action=ModAction.PURGE.value,
                                   target_user_id=user_id, created_at=now,
                                   reason=reason or f"{len(images)} image(s) in {len(public)} public message(s)"))
        return public, hidden
