"""The confirmation of ``/dalle-privacy delete``: Delete / Keep buttons on the user's private answer.

The custom id carries the user's id (``dalle:privacy:<delete|keep>:<user>``), so the buttons still work after a
restart, and only that user's click does anything (a private message is theirs alone anyway; this checks again).
"""

from __future__ import annotations

import discord

from bot.privacy import PrivacyService
from bot.views.common import answers_failures, service_of


def privacy_of(interaction: discord.Interaction) -> PrivacyService:
    """The privacy service over the bot's repository."""
    return PrivacyService(service_of(interaction).repo)


class PrivacyButton(discord.ui.DynamicItem[discord.ui.Button],
                    template=r"dalle:privacy:(?P<action>delete|keep):(?P<user>[0-9]+)"):
    def __init__(self, action: str, user_id: int) -> None:
        label, style = ("Delete my data", discord.ButtonStyle.danger) if action == "delete" else \
            ("Keep it", discord.ButtonStyle.secondary)
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=f"dalle:privacy:{action}:{user_id}"))
        self.action = action
        self.user_id = user_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(match["action"], int(match["user"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        if interaction.user.id != self.user_id:
            await interaction.response.send_message("Only the user who asked can confirm this.", ephemeral=True)
            return
        if self.action == "keep":
            await interaction.response.edit_message(content="Nothing was deleted.", view=None)
            return
        await interaction.response.defer()  # the deletion and the files may take a moment
        text = await privacy_of(interaction).delete(self.user_id)
        await interaction.edit_original_response(content=text, view=None)


class ConfirmDeleteView(discord.ui.View):
    def __init__(self, user_id: int) -> None:
        super().__init__(timeout=None)
        self.add_item(PrivacyButton("delete", user_id))
        self.add_item(PrivacyButton("keep", user_id))
