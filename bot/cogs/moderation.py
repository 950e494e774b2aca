"""The review channel: Discord's front end of ``bot.moderation.ModerationService``.

Loading the cog makes :class:`DiscordReviewer` the moderation service's front end (cases are posted to the
guild's review channel with the image bytes re-uploaded as a spoiler, review posts are edited after each action,
public results are re-rendered, reporters are told the outcome) and posts the open cases a previous run left
unposted. The buttons are ``bot.views.review``; the ban and appeal forms' submissions arrive here. ``/dalle-mod``
(cases, case, user, ban, unban, strikes reset, purge, ...) is hidden from members without Manage Messages by
default, and every command is checked again by the service (a server admin may have opened the command to others).
``/dalle-appeal`` opens the appeal form (``bot.views.appeal``). All decisions are the services'.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import discord
from discord import app_commands
from discord.ext import commands, tasks

from bot.blocklist import blocks_text
from bot.moderation import CaseNotFound, CaseView, NotModerator
from bot.outcome import Delivery, Outcome
from bot.publish import token_valid
from bot.views.appeal import AppealModal, handle_appeal_submit
from bot.views.common import tell_failure
from bot.views.review import (
    ReviewView,
    case_embed,
    cases_text,
    handle_ban_submit,
    history_text,
    moderation_of,
    moderator_of,
)
from bot.web.config import base_url_of, web_env
from bot.webaccess import moderator_link

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()


class DiscordReviewer:
    """Implements ``bot.moderation.ReviewFrontEnd`` through REST only (works before the gateway is ready)."""

    def __init__(self, bot: commands.Bot, publisher: Any) -> None:
        self.bot = bot
        self.publisher = publisher  # bot.publish.DiscordPublisher: re-renders public results

    async def post_case(self, channel_id: int, case: CaseView) -> int:
        files = [discord.File(io.BytesIO(case.png), filename=f"case{case.case_id}.png", spoiler=True)] if case.png \
            else []
        channel = self.bot.get_partial_messageable(channel_id)
        message = await channel.send(embed=case_embed(case), files=files,
                                     view=ReviewView(case.case_id, case.open, case.source),
                                     allowed_mentions=NO_MENTIONS)
        return message.id

    async def update_case(self, channel_id: int, message_id: int, case: CaseView) -> None:
        message = self.bot.get_partial_messageable(channel_id).get_partial_message(message_id)
        await message.edit(embed=case_embed(case), view=ReviewView(case.case_id, case.open, case.source),
                           allowed_mentions=NO_MENTIONS)

    async def refresh_result(self, outcome: Outcome) -> None:
        await self.publisher.refresh(outcome)

    async def tell_user(self, user_id: int, text: str, contact: Delivery | None) -> None:
        """An ephemeral follow-up on the user's own interaction while its token is valid, else a DM."""
        if contact is not None and token_valid(contact):
            payload = {"id": int(contact.application_id), "type": 3, "token": contact.interaction_token}
            webhook = discord.Webhook.from_state(payload, self.bot._connection)  # type: ignore[arg-type]
            try:
                await webhook.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
                return
            except discord.HTTPException as exc:
                if exc.status not in (401, 404):
                    raise
        dm = await self.bot.create_dm(discord.Object(id=user_id))
        await dm.send(text, allowed_mentions=NO_MENTIONS)

    async def reping_case(self, channel_id: int, message_id: int, case: CaseView, hours: int,
                          role_id: int | None) -> None:
        """Remind the review channel of an undecided case: a reply to its post, pinging the moderator role."""
        channel = self.bot.get_partial_messageable(channel_id)
        who = f"<@&{role_id}> " if role_id else ""
        await channel.send(f"{who}Case #{case.case_id} ({case.source}) has waited {hours} h for a decision.",
                           reference=discord.MessageReference(message_id=message_id, channel_id=channel_id,
                                                              fail_if_not_exists=False),
                           allowed_mentions=discord.AllowedMentions(everyone=False, users=False, replied_user=False,
                                                                    roles=[discord.Object(role_id)] if role_id
                                                                    else False))


class Moderation(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot
        self._pending: asyncio.Task | None = None
        self._upkeep: tasks.Loop | None = None

    @property
    def service(self) -> Any:
        return self.bot.service  # type: ignore[attr-defined]

    async def cog_load(self) -> None:
        moderation = self.service.moderation
        moderation.front_end = DiscordReviewer(self.bot, self.service.publisher)
        moderation.serves = self._serves
        self._pending = asyncio.create_task(moderation.post_pending(), name="dalle-review-pending")
        self._upkeep = tasks.loop(seconds=self.service.upkeep.interval_s)(self._upkeep_pass)
        self._upkeep.start()

    def _serves(self, guild_id: int | None) -> bool:
        """Whether the guild's shard runs in this process (Discord's rule; cases from DMs go with shard 0)."""
        shard_ids = getattr(self.bot, "shard_ids", None)
        if not shard_ids:
            return True  # every shard runs here
        shard = (guild_id >> 22) % (self.bot.shard_count or 1) if guild_id is not None else 0
        return shard in shard_ids

    async def cog_unload(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)

    mod = app_commands.Group(name="dalle-mod", description="Moderate image generation in this server",
                             guild_only=True, default_permissions=discord.Permissions(manage_messages=True))

    @mod.command(name="cases", description="This server's open cases (or all recent ones)")
    @app_commands.describe(which="open (default) or all")
    async def cases(self, interaction: discord.Interaction, which: Literal["open", "all"] = "open") -> None:
        async def work() -> str:
            rows = await moderation_of(interaction).cases(moderator_of(interaction), open_only=which == "open")
            return cases_text(rows, which)
        await private_answer(interaction, work)

    @mod.command(name="case", description="One case: the image's details, reports and actions")
    async def case(self, interaction: discord.Interaction, case_id: app_commands.Range[int, 1]) -> None:
        embeds: list[discord.Embed] = []

        async def work() -> str:
            embeds.append(case_embed(await moderation_of(interaction).case(moderator_of(interaction), case_id)))
            return ""
        await private_answer(interaction, work, embeds)

    @mod.command(name="user", description="A member's record here: generations, refusals, strikes, bans, cases")
    async def user(self, interaction: discord.Interaction, member: discord.User) -> None:
        async def work() -> str:
            return history_text(member.id, await moderation_of(interaction).user_history(moderator_of(interaction),
                                                                                          member.id))
        await private_answer(interaction, work)

    @mod.command(name="ban", description="Ban a member from generating images here")
    @app_commands.describe(duration="30m, 12h, 7d, 2w or permanent (default)", reason="Why (the member is told)")
    async def ban(self, interaction: discord.Interaction, member: discord.User,
                  reason: app_commands.Range[str, 1, 300], duration: str = "permanent") -> None:
        async def work() -> str:
            return await moderation_of(interaction).ban_user(moderator_of(interaction), member.id, duration, reason)
        await private_answer(interaction, work)

    @mod.command(name="unban", description="Lift a member's ban here")
    async def unban(self, interaction: discord.Interaction, member: discord.User, reason: str | None = None) -> None:
        async def work() -> str:
            return await moderation_of(interaction).unban_user(moderator_of(interaction), member.id, reason)
        await private_answer(interaction, work)

    strikes = app_commands.Group(name="strikes", description="Members' strikes here", parent=mod)

    @strikes.command(name="reset", description="Clear a member's strikes here and lift the cooldowns they caused")
    async def strikes_reset(self, interaction: discord.Interaction, member: discord.User,
                            reason: app_commands.Range[str, 1, 300] | None = None) -> None:
        async def work() -> str:
            return await self.service.strikes.reset(moderator_of(interaction), member.id, reason)
        await private_answer(interaction, work)

    @mod.command(name="purge", description="Take every image a member made here out of the public messages")
    async def purge(self, interaction: discord.Interaction, member: discord.User,
                    reason: app_commands.Range[str, 1, 300] | None = None) -> None:
        async def work() -> str:
            return await self.service.strikes.purge(moderator_of(interaction), member.id, reason)
        await private_answer(interaction, work)

    @app_commands.command(name="dalle-appeal", description="Ask this server's moderators to lift a ban, cooldown "
                                                           "or your strikes")
    @app_commands.guild_only()
    async def appeal(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(AppealModal())

    @mod.command(name="unblock", description="Lift the image-hash block matching a case's image (or a near-copy)")
    @app_commands.describe(case_id="The case of the removed image, or of a withheld near-copy")
    async def unblock(self, interaction: discord.Interaction, case_id: app_commands.Range[int, 1],
                      reason: str | None = None) -> None:
        async def work() -> str:
            return await self.service.blocklist.unblock(moderator_of(interaction), case_id, reason)
        await private_answer(interaction, work)

    @mod.command(name="web", description="A one-time sign-in link to the moderators' web page (10 minutes)")
    async def web(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            base_url = base_url_of(await asyncio.to_thread(web_env))  # the environment or ./.env, as the page
            return await moderator_link(self.service, moderator_of(interaction), interaction.permissions.manage_guild,
                                        base_url)
        await private_answer(interaction, work)

    @mod.command(name="blocklist", description="The image hashes blocked here")
    async def blocklist(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            return blocks_text(await self.service.blocklist.blocks(moderator_of(interaction)))
        await private_answer(interaction, work)

    async def _upkeep_pass(self) -> None:
        """Re-ping the open cases that are due (a failure is logged; the loop goes on)."""
        try:
            await self.service.upkeep.reping_due()
        except Exception:  # noqa: BLE001 - the next pass tries again
            log.warning("re-pinging open cases failed", exc_info=True)

    @commands.Cog.listener("on_raw_message_delete")
    async def message_deleted(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._public_deleted([payload.message_id])

    @commands.Cog.listener("on_raw_bulk_message_delete")
    async def messages_deleted(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self._public_deleted(payload.message_ids)

    async def _public_deleted(self, message_ids: Any) -> None:
        """A deleted result message closes its open cases (with a note, audited as the bot's own action)."""
        try:
            await self.service.upkeep.public_message_deleted(message_ids)
        except Exception:
            log.exception("closing the cases of deleted messages %s failed", sorted(message_ids)[:10])

    @commands.Cog.listener("on_interaction")
    async def ban_submitted(self, interaction: discord.Interaction) -> None:
        try:
            await handle_ban_submit(interaction) or await handle_appeal_submit(interaction)
        except Exception:
            log.exception("form submission %s failed", interaction.id)
            await tell_failure(interaction)


async def private_answer(interaction: discord.Interaction, work: Callable[[], Awaitable[str]],
                         embeds: list[discord.Embed] | None = None) -> None:
    """Defer privately first (the 3-second rule), then show what ``work`` returns, or why it was refused."""
    await interaction.response.defer(ephemeral=True, thinking=True)
    try:
        text = await work()
    except (NotModerator, CaseNotFound, ValueError) as exc:
        text = str(exc)
    await interaction.edit_original_response(content=text[:2000] or None, embeds=embeds or [],
                                             allowed_mentions=NO_MENTIONS)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Moderation(bot))
