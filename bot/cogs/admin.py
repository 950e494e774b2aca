"""``/dalle-admin``: a guild's own settings, filter terms and model, for its admins (Manage Server). The command is
hidden from other members by default, and ``bot.admin.AdminService`` checks Manage Server again for whoever runs
it; every change is audited and takes effect at once.

Loading the cog also gives the generation service its AutoMod reader: a guild's keyword rules are read over REST
(Manage Server needed; without it AutoMod is "not available"), cached, and read again when Discord says a rule
changed (AUTO_MODERATION_RULE_* events) or after a few minutes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.admin import SETTINGS, Admin, NotAdmin
from bot.automod import AutoModUnavailable, KeywordRule
from bot.model_admin import ModelActor, ModelAdmin, NotOperator

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
# the channel comes as Discord resolved it with the interaction (the bot need not have it cached)
TEXT_CHANNELS = (discord.ChannelType.text, discord.ChannelType.news, discord.ChannelType.private_thread,
                 discord.ChannelType.public_thread)
KEYWORD_TRIGGER = 1  # AutoMod trigger_type KEYWORD: the server's own words and patterns
MESSAGE_SEND = 1  # AutoMod event_type: rules on members' messages


def admin_of(interaction: discord.Interaction) -> Admin:
    return Admin(user_id=interaction.user.id, guild_id=interaction.guild_id,
                 can_manage_guild=interaction.permissions.manage_guild)


def shown(key: str, value: Any) -> str:
    if value is None:
        return "anywhere" if key == "channel_ids" else "none"
    if key == "review_channel_id":
        return f"<#{value}>"
    if key == "moderator_role_id":
        return f"<@&{value}>"
    if key == "channel_ids":
        return ", ".join(f"<#{c}>" for c in value)
    if key in ("private_results", "automod"):
        return "yes" if value else "no"
    if key == "notify_mode":
        return "privately when possible, else by DM" if value == "ephemeral" else "by DM"
    return f"`{value}`"


def settings_text(values: dict[str, tuple[Any, bool]], automod_status: str | None = None) -> str:
    lines = ["**This server's settings** (default: the bot's own, where the server set none)"]
    for key, (value, own) in values.items():
        lines.append(f"{SETTINGS[key]}: {shown(key, value)}{'' if own else ' (default)'}")
    if automod_status is not None:
        lines.append(f"Discord AutoMod keyword rules: {automod_status}")
    lines.append("Moderators: members with Manage Messages, and the moderator role.")
    return "\n".join(lines)


def terms_text(block: list[str], allow: list[str]) -> str:
    def listed(terms: list[str]) -> str:
        return ", ".join(f"`{discord.utils.escape_markdown(t)}`" for t in terms) if terms else "none"
    return (f"**This server's own prompt filter** (on top of the bot's list)\nBlocked: {listed(block)}\n"
            f"Allowed: {listed(allow)}")[:2000]


def keyword_rules(raw: list[dict]) -> list[KeywordRule]:
    """The enabled keyword rules on members' messages, from Discord's rule objects."""
    out = []
    for rule in raw:
        if rule.get("trigger_type") != KEYWORD_TRIGGER or not rule.get("enabled") \
                or rule.get("event_type", MESSAGE_SEND) != MESSAGE_SEND:
            continue
        meta = rule.get("trigger_metadata") or {}
        out.append(KeywordRule(name=str(rule.get("name") or rule.get("id")),
                               keywords=tuple(meta.get("keyword_filter") or ()),
                               regexes=tuple(meta.get("regex_patterns") or ()),
                               allow=tuple(meta.get("allow_list") or ())))
    return out


async def answer(interaction: discord.Interaction, work: Any) -> None:
    """Defer privately first (the 3-second rule), then show what ``work()`` returns, or why it was refused."""
    await interaction.response.defer(ephemeral=True, thinking=True)
    try:
        text = await work()
    except (NotAdmin, NotOperator, ValueError) as exc:
        text = str(exc)
    await interaction.edit_original_response(content=text[:2000], allowed_mentions=NO_MENTIONS)


class GuildAdmin(commands.Cog, name="Admin"):
    admin = app_commands.Group(name="dalle-admin", description="Configure the image bot for this server",
                               guild_only=True, default_permissions=discord.Permissions(manage_guild=True))
    settings = app_commands.Group(name="settings", description="This server's settings", parent=admin)
    filter = app_commands.Group(name="filter", description="This server's own blocked and allowed prompt terms",
                                parent=admin)
    model = app_commands.Group(name="model", description="The model that draws for this server", parent=admin)

    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot
        self._models: ModelAdmin | None = None

    @property
    def service(self) -> Any:
        return self.bot.service  # type: ignore[attr-defined]

    @property
    def models(self) -> ModelAdmin:
        """Retraining (``bot.model_admin``): the bot's own, or one over this service's store and engine."""
        if self._models is None:
            self._models = getattr(self.bot, "model_admin", None) or ModelAdmin(
                self.service.repo, self.service.engine, database_url=self.bot.settings.database_url,
                runs_dir=Path(os.environ.get("FEEDBACK_RUNS_DIR", "runs/feedback")))
        return self._models

    async def model_actor(self, interaction: discord.Interaction) -> ModelActor:
        return ModelActor(interaction.user.id, interaction.guild_id, interaction.permissions.manage_guild,
                          await self.bot.is_owner(interaction.user))

    async def cog_load(self) -> None:
        self.service.automod.loader = self.read_automod_rules

    async def read_automod_rules(self, guild_id: int) -> list[KeywordRule]:
        try:
            raw = await self.bot.http.get_auto_moderation_rules(guild_id)
        except discord.Forbidden as exc:
            raise AutoModUnavailable("missing permission (the bot needs Manage Server)") from exc
        return keyword_rules(raw)

    @commands.Cog.listener("on_automod_rule_create")
    async def automod_created(self, rule: discord.AutoModRule) -> None:
        self.service.automod.invalidate(rule.guild.id)

    @commands.Cog.listener("on_automod_rule_update")
    async def automod_updated(self, rule: discord.AutoModRule) -> None:
        self.service.automod.invalidate(rule.guild.id)

    @commands.Cog.listener("on_automod_rule_delete")
    async def automod_deleted(self, rule: discord.AutoModRule) -> None:
        self.service.automod.invalidate(rule.guild.id)

    # -- settings ---------------------------------------------------------------------------------------------

    @settings.command(name="show", description="This server's settings")
    async def show(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            values = await self.service.admin.show(admin_of(interaction))
            return settings_text(values, await self.service.admin.automod_status(admin_of(interaction)))
        await answer(interaction, work)

    @settings.command(name="set", description="Change this server's settings (the ones you give)")
    @app_commands.describe(review_channel="Where cases are posted for moderators",
                           moderator_role="Members with this role moderate (besides Manage Messages)",
                           flagged_mode="Images the safety check flags: behind a spoiler, or withheld",
                           daily_quota="Images a member may request per day (0: no limit)",
                           max_queue_per_user="Requests a member may have queued at once",
                           rate_limit_user="Requests per member, e.g. '2 per 10 seconds; 20 per hour'",
                           rate_limit_guild="Requests for the whole server, e.g. '60 per minute'",
                           max_images="Images per request at most (1-9)",
                           add_channel="Allow /dalle in this channel (once any is listed, only listed ones)",
                           remove_channel="Take this channel off the list",
                           any_channel="Allow /dalle in every channel again (clears the list)",
                           private_results="Whether members may ask for private results",
                           notify_mode="How members hear moderators' decisions: ephemeral when possible, or DM",
                           automod="Apply this server's Discord AutoMod keyword rules to prompts",
                           reping_hours="Hours before an open case is re-pinged in the review channel, once (0: never)",
                           strike_days="Days a strike (refused prompt, removed image) counts",
                           strikes_to_cooldown="Live strikes that put a member on a cooldown (0: never)",
                           cooldown_minutes="The first cooldown; each further strike doubles it (up to a day)",
                           strikes_to_ban="Live strikes that ban a member (0: never)",
                           ban_days="Days of that ban (0: permanent)",
                           appeal_days="Days a member waits between two appeals")
    async def set_(self, interaction: discord.Interaction,
                   review_channel: app_commands.AppCommandChannel | None = None,
                   moderator_role: discord.Role | None = None,
                   flagged_mode: Literal["spoiler", "withhold"] | None = None,
                   daily_quota: app_commands.Range[int, 0, 100000] | None = None,
                   max_queue_per_user: app_commands.Range[int, 1, 100] | None = None,
                   rate_limit_user: app_commands.Range[str, 1, 64] | None = None,
                   rate_limit_guild: app_commands.Range[str, 1, 64] | None = None,
                   max_images: app_commands.Range[int, 1, 9] | None = None,
                   add_channel: app_commands.AppCommandChannel | None = None,
                   remove_channel: app_commands.AppCommandChannel | None = None,
                   any_channel: bool = False,
                   private_results: bool | None = None,
                   notify_mode: Literal["ephemeral", "dm"] | None = None,
                   automod: bool | None = None,
                   reping_hours: app_commands.Range[int, 0, 8760] | None = None,
                   strike_days: app_commands.Range[int, 1, 365] | None = None,
                   strikes_to_cooldown: app_commands.Range[int, 0, 100] | None = None,
                   cooldown_minutes: app_commands.Range[int, 1, 1440] | None = None,
                   strikes_to_ban: app_commands.Range[int, 0, 100] | None = None,
                   ban_days: app_commands.Range[int, 0, 3650] | None = None,
                   appeal_days: app_commands.Range[int, 0, 365] | None = None) -> None:
        async def work() -> str:
            for channel in (review_channel, add_channel):
                if channel is not None and channel.type not in TEXT_CHANNELS:
                    raise ValueError("That must be a text channel.")
            return await self.service.admin.set(
                admin_of(interaction), review_channel_id=review_channel.id if review_channel else None,
                moderator_role_id=moderator_role.id if moderator_role else None, flagged_mode=flagged_mode,
                daily_quota=daily_quota, max_queue_per_user=max_queue_per_user, rate_limit_user=rate_limit_user,
                rate_limit_guild=rate_limit_guild, max_images=max_images, private_results=private_results,
                notify_mode=notify_mode, automod=automod, reping_hours=reping_hours, strike_days=strike_days,
                strikes_to_cooldown=strikes_to_cooldown, cooldown_minutes=cooldown_minutes,
                strikes_to_ban=strikes_to_ban, ban_days=ban_days, appeal_days=appeal_days,
                add_channel=add_channel.id if add_channel else None,
                remove_channel=remove_channel.id if remove_channel else None, any_channel=any_channel)
        await answer(interaction, work)

    @settings.command(name="reset", description="Put one setting back to the bot's default")
    @app_commands.describe(setting="Which setting")
    @app_commands.choices(setting=[app_commands.Choice(name=label, value=key) for key, label in SETTINGS.items()])
    async def reset(self, interaction: discord.Interaction, setting: app_commands.Choice[str]) -> None:
        async def work() -> str:
            return await self.service.admin.reset(admin_of(interaction), setting.value)
        await answer(interaction, work)

    # -- filter -----------------------------------------------------------------------------------------------

    @filter.command(name="add", description="Block a word or phrase in prompts here (end it with * for prefixes)")
    async def filter_add(self, interaction: discord.Interaction, term: app_commands.Range[str, 1, 60]) -> None:
        async def work() -> str:
            return await self.service.admin.filter_add(admin_of(interaction), term)
        await answer(interaction, work)

    @filter.command(name="allow", description="Allow a term the bot's list blocks (never minors or hate)")
    async def filter_allow(self, interaction: discord.Interaction, term: app_commands.Range[str, 1, 60]) -> None:
        async def work() -> str:
            return await self.service.admin.filter_allow(admin_of(interaction), term)
        await answer(interaction, work)

    @filter.command(name="remove", description="Take a term off this server's block or allow list")
    async def filter_remove(self, interaction: discord.Interaction, term: app_commands.Range[str, 1, 60]) -> None:
        async def work() -> str:
            return await self.service.admin.filter_remove(admin_of(interaction), term)
        await answer(interaction, work)

    @filter.command(name="list", description="This server's own blocked and allowed terms")
    async def filter_list(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            return terms_text(*await self.service.admin.filter_list(admin_of(interaction)))
        await answer(interaction, work)

    # -- model ------------------------------------------------------------------------------------------------

    @model.command(name="show", description="Which checkpoint draws for this server")
    async def model_show(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            info = await self.service.admin.model(admin_of(interaction))
            return (f"Model: checkpoint `{info.checkpoint_id}` · attention `{info.attention or 'unknown'}` · "
                    f"dtype `{info.dtype or 'unknown'}`")
        await answer(interaction, work)

    @model.command(name="list", description="The registered checkpoints: active, candidates, rejected, retired")
    async def model_list(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            return await self.models.list(await self.model_actor(interaction))
        await answer(interaction, work)

    @model.command(name="train", description="Retrain from feedback: export, fine-tune, evaluate (operator only)")
    @app_commands.describe(steps="Fine-tuning steps (default 60)")
    async def model_train(self, interaction: discord.Interaction,
                          steps: app_commands.Range[int, 1, 5000] = 60) -> None:
        async def work() -> str:
            return await self.models.train(await self.model_actor(interaction), steps=steps)
        await answer(interaction, work)

    @model.command(name="status", description="How the training job is going")
    async def model_status(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            return await self.models.status(await self.model_actor(interaction))
        await answer(interaction, work)

    @model.command(name="cancel", description="Stop the training job (nothing is registered)")
    async def model_cancel(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            return await self.models.cancel(await self.model_actor(interaction))
        await answer(interaction, work)

    @model.command(name="promote", description="Serve a checkpoint the gate passed (operator only)")
    @app_commands.describe(checkpoint="Its id, as /dalle-admin model list shows it")
    async def model_promote(self, interaction: discord.Interaction,
                            checkpoint: app_commands.Range[str, 1, 128]) -> None:
        async def work() -> str:
            return await self.models.promote(await self.model_actor(interaction), checkpoint)
        await answer(interaction, work)

    @model.command(name="rollback", description="Serve the active checkpoint's parent again (operator only)")
    async def model_rollback(self, interaction: discord.Interaction) -> None:
        async def work() -> str:
            return await self.models.rollback(await self.model_actor(interaction))
        await answer(interaction, work)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(GuildAdmin(bot))
