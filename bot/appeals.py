"""Appeals: a member asks the server's moderators to lift a ban, a cooldown or their strikes.

``/dalle-appeal`` (or any front end) calls :meth:`AppealService.appeal`: at most one appeal per member and guild
every ``appeal_days`` (the guild's strike rules), recorded as an ``appeal`` case about the member and posted once
to the review channel with Accept and Reject. Accept lifts the member's bans and cooldowns in that guild and clears
their strikes; Reject changes nothing. Both are audited, and the member is told the outcome (on their appeal's
interaction while Discord allows and the guild's notify_mode is ephemeral, else by DM).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from bot.guildrules import notify_privately
from bot.moderation import ActionResult, ModerationService, Moderator
from bot.outcome import Delivery
from bot.strikes import StrikeService
from store.models import ModAction
from store.repository import AppealTooSoon, CaseClosed, Repository

log = logging.getLogger(__name__)

MAX_APPEAL = 1000  # characters: the form's limit, the same for every front end


class AppealService:
    def __init__(self, repo: Repository, moderation: ModerationService, strikes: StrikeService) -> None:
        self.repo = repo
        self.moderation = moderation
        self.strikes = strikes
        self.contacts: dict[int, Delivery | None] = {}  # appellants' interactions (lost on a restart: a DM then)

    async def appeal(self, user_id: int, guild_id: int | None, text: str, contact: Delivery | None = None) -> str:
        """Open an appeal case and post it; returns what to tell the member. Refusals raise ValueError with a
        message the member can act on (nothing is recorded then)."""
        if guild_id is None:
            raise ValueError("Appeals are made in the server whose moderators should read them.")
        text = (text or "").strip()
        if not text:
            raise ValueError("Please say why the moderators should reconsider.")
        if len(text) > MAX_APPEAL:
            raise ValueError(f"Please keep the appeal under {MAX_APPEAL} characters.")
        rules = await self.strikes.rules(guild_id)
        try:
            case = await self.repo.open_appeal(user_id, guild_id, text, period=timedelta(days=rules.appeal_days))
        except AppealTooSoon as exc:
            raise ValueError(f"You appealed recently: {exc}.") from exc
        self.contacts[case.id] = contact
        await self.moderation.case_opened(case.id, True)
        return f"Your appeal (case #{case.id}) was sent to this server's moderators; you will be told their decision."

    async def accept(self, case_id: int, actor: Moderator, reason: str | None = None) -> ActionResult:
        """Lift the appellant's bans and cooldowns here and clear their strikes."""
        return await self._decide(case_id, actor, True, reason)

    async def reject(self, case_id: int, actor: Moderator, reason: str | None = None) -> ActionResult:
        return await self._decide(case_id, actor, False, reason)

    async def _decide(self, case_id: int, actor: Moderator, accept: bool, reason: str | None) -> ActionResult:
        view = await self.moderation.case(actor, case_id)  # the moderator check; CaseNotFound
        if view.source != "appeal":
            raise ValueError(f"Case #{case_id} is not an appeal.")
        try:
            case, lifted = await self.repo.decide_appeal(case_id, actor.user_id, accept=accept, reason=reason)
        except CaseClosed:
            return ActionResult(view, "none", f"Case #{case_id} was already closed ({view.status}); nothing changed.")
        await self.moderation.case_opened(case_id, False)  # the review post shows the decision
        view = await self.moderation.case_view(case_id, with_png=False)
        why = f" Reason: {reason}" if reason else ""
        text = (f"Your appeal (case #{case_id}) was accepted: you may generate images in that server again and "
                f"your strikes there were cleared.{why}" if accept else
                f"Your appeal (case #{case_id}) was rejected; nothing was changed.{why}")
        contact = self.contacts.pop(case_id, None)
        if not notify_privately(await self.strikes.guild_settings(case.guild_id)):
            contact = None  # the guild's notify_mode says DM
        if self.moderation.front_end is not None and case.user_id is not None:
            try:
                await self.moderation.front_end.tell_user(case.user_id, text, contact)
            except Exception:  # noqa: BLE001 - closed DMs must not undo the decision
                log.info("could not tell the appellant of case %s", case_id, exc_info=True)
        action = ModAction.ACCEPT.value if accept else ModAction.REJECT.value
        done = f"accepted ({lifted} ban(s) or cooldown(s) lifted, strikes cleared)" if accept else "rejected"
        return ActionResult(view, action, f"Appeal #{case_id} {done}; <@{case.user_id}> was told.")
