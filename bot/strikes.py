"""Strikes that expire and what they lead to: escalating cooldowns, bans, and a case for the moderators.

A refused prompt or a moderator's removal of an image adds a strike to the user in that guild, counted for the
guild's ``strike_days``. When the live strikes reach ``strikes_to_cooldown`` the user gets a cooldown of
``cooldown_minutes``, doubled by each further strike (capped at a day); at ``strikes_to_ban`` a ban of ``ban_days``
(0: permanent). Both are rows in the database (``store.repo.strikes``), audited as the bot's own actions, so a
restart forgets nothing; the admission path reads them back (``ModerationService.ban_message``). Crossing the
cooldown threshold also opens one ``refusals`` case per user and guild in the review channel, listing the prompts
that were refused.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bot.moderation import ModerationService, Moderator, NotModerator, format_until
from bot.ratelimit import human_duration
from store.models import BanKind, StrikeSource
from store.repository import Escalation, Repository, StrikeResult

log = logging.getLogger(__name__)

MAX_COOLDOWN = timedelta(days=1)


@dataclass(frozen=True)
class StrikeRules:
    """A guild's thresholds (``guild_settings`` columns; None there means these defaults). 0 turns a rule off."""

    strike_days: int = 7
    strikes_to_cooldown: int = 3
    cooldown_minutes: int = 10
    strikes_to_ban: int = 6
    ban_days: int = 7  # 0: permanent
    appeal_days: int = 7

    @classmethod
    def of(cls, settings: Any, defaults: StrikeRules | None = None) -> StrikeRules:
        """The rules of a guild's settings row (or the defaults where a column is NULL, or there is no row)."""
        base = defaults or cls()
        values = {name: getattr(settings, name, None) for name in cls.__dataclass_fields__}
        return cls(**{k: (v if v is not None else getattr(base, k)) for k, v in values.items()})

    def escalation(self, live: int, guild: bool) -> Escalation | None:
        """What ``live`` strikes impose: a ban at ``strikes_to_ban`` (in a guild), else a cooldown from
        ``strikes_to_cooldown`` on, doubling with each strike past it."""
        if guild and self.strikes_to_ban and live >= self.strikes_to_ban:
            length = timedelta(days=self.ban_days) if self.ban_days else None
            return Escalation(BanKind.BAN.value, length, f"{live} strikes within {self.strike_days} days")
        if self.strikes_to_cooldown and self.cooldown_minutes and live >= self.strikes_to_cooldown:
            # in whole minutes, capped before a timedelta is made: doubling past the cap must not overflow
            minutes = self.cooldown_minutes * 2 ** min(live - self.strikes_to_cooldown, 32)
            length = timedelta(minutes=min(minutes, MAX_COOLDOWN // timedelta(minutes=1)))
            return Escalation(BanKind.COOLDOWN.value, length, f"{live} strikes within {self.strike_days} days")
        return None


class StrikeService:
    """Adds strikes, applies the guild's thresholds, opens the refusal-pattern case; moderators reset strikes."""

    def __init__(self, repo: Repository, moderation: ModerationService, *,
                 guild_settings: Callable[[int | None], Awaitable[Any]], defaults: StrikeRules | None = None) -> None:
        self.repo = repo
        self.moderation = moderation
        self.guild_settings = guild_settings
        self.defaults = defaults or StrikeRules()

    async def rules(self, guild_id: int | None) -> StrikeRules:
        return StrikeRules.of(await self.guild_settings(guild_id), self.defaults) if guild_id is not None \
            else self.defaults

    async def add(self, user_id: int, guild_id: int | None, source: str, *, reason: str | None = None,
                  case_id: int | None = None) -> StrikeResult:
        """Add a strike and impose what the thresholds say; a new cooldown or ban opens (or refreshes) the user's
        refusal-pattern case in the review channel."""
        rules = await self.rules(guild_id)
        result = await self.repo.add_strike_expiring(
            user_id, guild_id, source, days=max(rules.strike_days, 1), reason=reason, case_id=case_id,
            escalate=lambda live: rules.escalation(live, guild_id is not None))
        if result.imposed is not None:
            log.info("user %s reached %s strikes in guild %s: %s %s", user_id, result.live, guild_id,
                     result.imposed, format_until(result.until))
            if guild_id is not None:
                case, created = await self.repo.open_refusals_case(
                    user_id, guild_id, f"{result.live} strikes within {rules.strike_days} days: {result.imposed} "
                                       f"{format_until(result.until)}")
                await self.moderation.case_opened(case.id, created)
        return result

    async def refusal(self, user_id: int, guild_id: int | None, reason: str) -> str:
        """A prompt the filter refused: a strike; returns what to add to the refusal message (the cooldown or ban
        it caused), or ""."""
        result = await self.add(user_id, guild_id, StrikeSource.REFUSAL.value, reason=reason[:300])
        if result.imposed is None:
            return ""
        if result.imposed == BanKind.BAN.value:
            return f" You're banned from generating here {format_until(result.until)} after {result.live} strikes."
        left = (result.until - self.repo.now()).total_seconds() if result.until is not None else 0
        count = f"{result.live} strike{'s' if result.live != 1 else ''}"
        return f" You're on a cooldown for {human_duration(left)} after {count}."

    async def removal(self, case: Any, author_id: int, reason: str | None) -> None:
        """A moderator removed one of the author's images: a strike in the case's guild."""
        try:
            await self.add(author_id, case.guild_id, StrikeSource.REMOVAL.value, case_id=case.id,
                           reason=f"image removed (case #{case.id})" + (f": {reason}" if reason else ""))
        except Exception:  # noqa: BLE001 - the removal is done and audited; the strike must not undo it
            log.warning("could not add the removal strike of case %s", case.id, exc_info=True)

    async def _guild_of(self, actor: Moderator) -> int | None:
        """The guild the actor moderates here (the operator: the one they named, or None outside guilds)."""
        if not actor.operator and (actor.guild_id is None or not await self.moderation.is_moderator(
                actor.guild_id, actor.role_ids, actor.can_manage_messages)):
            raise NotModerator()
        return actor.guild_id

    async def record(self, actor: Moderator, user_id: int) -> Any:
        """A member's record in the actor's guild (the operator's: everywhere unless they named a guild)."""
        return await self.repo.user_record(user_id, guild_id=await self._guild_of(actor))

    async def reset(self, actor: Moderator, user_id: int, reason: str | None = None) -> str:
        """``/dalle-mod strikes reset``: clear the member's live strikes here and lift their cooldowns (audited)."""
        guild_id = await self._guild_of(actor)
        cleared, lifted = await self.repo.reset_strikes(user_id, guild_id, actor.user_id, reason)
        lifted_text = f" and {lifted} cooldown(s) lifted" if lifted else ""
        return f"<@{user_id}>: {cleared} strike(s) cleared{lifted_text}."

    async def purge(self, actor: Moderator, user_id: int, reason: str | None = None) -> str:
        """``/dalle-mod purge``: take every image the member made here out of the public messages (audited)."""
        guild_id = await self._guild_of(actor)
        if guild_id is None:
            raise ValueError("purge needs the server whose public messages to clean")
        public, hidden = await self.repo.purge_user(user_id, guild_id, actor.user_id, reason)
        for generation_id in public:
            await self.moderation.refresh_public(generation_id)  # best effort: logged when an edit fails
        return f"<@{user_id}>: {hidden} image(s) taken down from {len(public)} public message(s)."
