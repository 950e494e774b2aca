"""The acknowledgement of a queued request ("Queued, position N"): its Cancel button."""

from __future__ import annotations

from typing import Any

import discord

from bot.views.common import answers_failures, record_ack, service_of


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"dalle:cancel:(?P<gen>[0-9]+)"):
    def __init__(self, generation_id: int) -> None:
        super().__init__(discord.ui.Button(label="Cancel", style=discord.ButtonStyle.secondary,
                                           custom_id=f"dalle:cancel:{generation_id}"))
        self.generation_id = generation_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["gen"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        # acknowledged first (the queue message stays as it is until the database says whether it was cancelled)
        await interaction.response.defer()
        ok = await service_of(interaction).cancel(self.generation_id, interaction.user.id)
        if ok:
            await interaction.edit_original_response(content="Cancelled.", view=None)
        else:
            await interaction.followup.send("Only a queued request of yours can be cancelled.", ephemeral=True)


class CancelView(discord.ui.View):
    def __init__(self, generation_id: int) -> None:
        super().__init__(timeout=None)
        self.add_item(CancelButton(generation_id))


async def queued_reply(interaction: discord.Interaction, adm: Any, what: str) -> None:
    """Answer a deferred component interaction with the admission result and remember the ack message."""
    if not adm.ok:
        await interaction.edit_original_response(content=adm.message)
        return
    msg = await interaction.edit_original_response(
        content=f"{what} queued, position {adm.position}.", view=CancelView(adm.generation_id))
    await record_ack(service_of(interaction), adm.generation_id, msg.id)
