"""``/dalle-admin settings show|set``: a guild's own settings, for its admins (Manage Server). The command is
hidden from other members by default, and ``bot.admin.AdminService`` checks Manage Server again for whoever runs
it; every change is audited and takes effect at once."""

from __future__ import annotations

from typing import Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.admin import SETTINGS, Admin, NotAdmin

NO_MENTIONS = discord.AllowedMentions.none()
# the channel comes as Discord resolved it with the interaction (the bot need not have it cached)
TEXT_CHANNELS = (discord.ChannelType.text, discord.ChannelType.news, discord.ChannelType.private_thread,
                 discord.ChannelType.public_thread)


def admin_of(interaction: discord.Interaction) -> Admin:
    return Admin(user_id=interaction.user.id, guild_id=interaction.guild_id,
                 can_manage_guild=interaction.permissions.manage_guild)


def shown(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if key == "review_channel_id":
        return f"<#{value}>"
    if key == "moderator_role_id":
        return f"<@&{value}>"
    return f"`{value}`"


def settings_text(values: dict[str, tuple[Any, bool]]) -> str:
    lines = ["**This server's settings** (default: the bot's own, where the server set none)"]
    for key, (value, own) in values.items():
        lines.append(f"{SETTINGS[key]}: {shown(key, value)}{'' if own else ' (default)'}")
    lines.append("Moderators: members with Manage Messages, and the moderator role.")
    return "\n".join(lines)


class GuildAdmin(commands.Cog, name="Admin"):
    admin = app_commands.Group(name="dalle-admin", description="Configure the image bot for this server",
                               guild_only=True, default_permissions=discord.Permissions(manage_guild=True))
    settings = app_commands.Group(name="settings", description="This server's settings", parent=admin)

    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot

    @property
    def service(self) -> Any:
        return self.bot.service  # type: ignore[attr-defined]

    @settings.command(name="show", description="This server's settings")
    async def show(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            text = settings_text(await self.service.admin.show(admin_of(interaction)))
        except NotAdmin as exc:
            text = str(exc)
        await interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)

    @settings.command(name="set", description="Change this server's settings (the ones you give)")
    @app_commands.describe(review_channel="Where cases are posted for moderators",
                           moderator_role="Members with this role moderate (besides Manage Messages)",
                           flagged_mode="Images the safety check flags: behind a spoiler, or withheld",
                           daily_quota="Images a member may request per day (0: no limit)",
                           max_queue_per_user="Requests a member may have queued at once")
    async def set_(self, interaction: discord.Interaction,
                   review_channel: app_commands.AppCommandChannel | None = None,
                   moderator_role: discord.Role | None = None,
                   flagged_mode: Literal["spoiler", "withhold"] | None = None,
                   daily_quota: app_commands.Range[int, 0, 100000] | None = None,
                   max_queue_per_user: app_commands.Range[int, 1, 100] | None = None) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        if review_channel is not None and review_channel.type not in TEXT_CHANNELS:
            await interaction.edit_original_response(content="The review channel must be a text channel.")
            return
        try:
            text = await self.service.admin.set(
                admin_of(interaction), review_channel_id=review_channel.id if review_channel else None,
                moderator_role_id=moderator_role.id if moderator_role else None, flagged_mode=flagged_mode,
                daily_quota=daily_quota, max_queue_per_user=max_queue_per_user)
        except (NotAdmin, ValueError) as exc:
            text = str(exc)
        await interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(GuildAdmin(bot))
