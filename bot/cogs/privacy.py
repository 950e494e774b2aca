"""``/dalle-privacy optout|optin|export|delete``: a user's own data, answered to them alone (ephemeral), in a
server or in DMs. The decisions are ``bot.privacy.PrivacyService``'s; ``delete`` asks for a confirmation first
(``bot.views.privacy``)."""

from __future__ import annotations

import asyncio
import gzip
import io
import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.views.privacy import ConfirmDeleteView, PrivacyButton, privacy_of

log = logging.getLogger(__name__)


class Privacy(commands.Cog):
    privacy = app_commands.Group(name="dalle-privacy", description="Your data: training use, export, deletion")

    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(PrivacyButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(PrivacyButton)

    @privacy.command(name="optout", description="Don't use my generations and votes to train the model")
    async def optout(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.edit_original_response(content=await privacy_of(interaction).opt_out(interaction.user.id))

    @privacy.command(name="optin", description="Allow my generations and votes to train the model again")
    async def optin(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.edit_original_response(content=await privacy_of(interaction).opt_in(interaction.user.id))

    @privacy.command(name="export", description="Everything stored about me, as a JSON file (only you see it)")
    @app_commands.checks.cooldown(2, 60.0)  # each export reads all of a user's rows
    async def export(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        export = await privacy_of(interaction).export(interaction.user.id)
        name, data = export.filename, export.data
        if len(data) > interaction.filesize_limit:
            name, data = name + ".gz", await asyncio.to_thread(gzip.compress, data)  # off the event loop
        if len(data) > interaction.filesize_limit:
            await interaction.edit_original_response(content=export.summary + "\nThe file is larger than Discord "
                                                     "lets the bot send; ask the bot's operator for it.")
            return
        await interaction.edit_original_response(content=export.summary,
                                                 attachments=[discord.File(io.BytesIO(data), filename=name)])

    @privacy.command(name="delete", description="Delete my generations, images, votes, reports and refused prompts")
    async def delete(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        text, anything = await privacy_of(interaction).delete_preview(interaction.user.id)
        if anything:
            await interaction.edit_original_response(content=text, view=ConfirmDeleteView(interaction.user.id))
        else:
            await interaction.edit_original_response(content=text)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Privacy(bot))
