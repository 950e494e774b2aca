"""The 🗑 button on a result: its requester (or a moderator) deletes it. ``bot.deletion.ResultDeletion`` decides
who may and what goes; this button takes the message down and says what happened, privately."""

from __future__ import annotations

import discord

from bot.moderation import NotModerator
from bot.views.common import answers_failures, service_of
from bot.views.review import moderator_of


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"dalle:delete:(?P<gen>[0-9]+)"):
    def __init__(self, generation_id: int) -> None:
        super().__init__(discord.ui.Button(emoji="🗑️", style=discord.ButtonStyle.secondary,
                                           custom_id=f"dalle:delete:{generation_id}"))
        self.generation_id = generation_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["gen"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer()  # the message may go: acknowledge without a visible change first
        message = interaction.message
        private = message is not None and message.flags.ephemeral

        async def take_down(gen) -> None:
            if message is None:
                return
            try:
                if private:  # an ephemeral result cannot be deleted by another interaction: emptied instead
                    await interaction.edit_original_response(content="Deleted.", attachments=[], view=None)
                else:
                    await message.delete()
            except discord.NotFound:
                pass  # gone already

        try:
            text = await service_of(interaction).deletion.delete(self.generation_id, moderator_of(interaction),
                                                                 take_down)
        except NotModerator as exc:
            text = str(exc)
        await interaction.followup.send(text, ephemeral=True)
