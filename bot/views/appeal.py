"""The appeal form of ``/dalle-appeal``: opened by the command, answered from its submission alone (like the report
form), so a form opened before a restart still counts. The decision is ``bot.appeals.AppealService``'s."""

from __future__ import annotations

import discord

from bot.appeals import MAX_APPEAL
from bot.views.common import delivery_for, service_of
from bot.views.report import modal_values

APPEAL_MODAL_ID = "dalle:appealmodal"


class AppealModal(discord.ui.Modal):
    text: discord.ui.TextInput = discord.ui.TextInput(
        label="Why should the moderators reconsider?", custom_id="text", style=discord.TextStyle.paragraph,
        max_length=MAX_APPEAL, placeholder="What happened, and what you would like lifted (ban, cooldown, strikes)")

    def __init__(self) -> None:
        super().__init__(title="Appeal to this server's moderators", custom_id=APPEAL_MODAL_ID, timeout=900)


async def handle_appeal_submit(interaction: discord.Interaction) -> bool:
    """Open the appeal from a submitted form; False if the interaction is not one."""
    if interaction.type is not discord.InteractionType.modal_submit:
        return False
    if str((interaction.data or {}).get("custom_id", "")) != APPEAL_MODAL_ID:
        return False
    await interaction.response.defer(ephemeral=True, thinking=True)
    try:
        text = await service_of(interaction).appeals.appeal(
            interaction.user.id, interaction.guild_id, modal_values(interaction.data).get("text", ""),
            contact=delivery_for(interaction))
    except ValueError as exc:
        text = str(exc)
    await interaction.edit_original_response(content=text)
    return True
