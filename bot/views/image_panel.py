"""The result message's "Pick an image" menu and the private panel it opens for one image.

The grid stays one message within Discord's component limits (5 rows): the result's buttons keep their rows and
one select menu (a whole row) lists its images. Picking one answers the clicker alone with that image, full size,
and 👍 / 👎 / Variations / Report buttons keyed by its image id, so a vote, a report (with its reason) or a
variation is about the image the user means.
"""

from __future__ import annotations

import io
import re

import discord

from bot.outcome import StoredImage
from bot.views.common import answers_failures, service_of
from bot.views.result import ReportButton, VariationButton, VoteButton

PICK_VALUE = re.compile(r"(?P<img>[0-9]+):(?P<n>[0-9]+)")  # an option's value: image id and its number


class PickSelect(discord.ui.DynamicItem[discord.ui.Select], template=r"dalle:pick:(?P<gen>[0-9]+)"):
    """One option per image of the result ("Image 3", numbered as the V buttons); its value is the image's id."""

    def __init__(self, generation_id: int, options: list[discord.SelectOption]) -> None:
        count = len(options)
        super().__init__(discord.ui.Select(
            custom_id=f"dalle:pick:{generation_id}", placeholder=f"Pick an image (1–{count}) to vote, report or vary",
            options=options, min_values=1, max_values=1))
        self.generation_id = generation_id

    @classmethod
    def for_images(cls, generation_id: int, images: list[StoredImage]) -> PickSelect:
        return cls(generation_id, [
            discord.SelectOption(label=f"Image {number}", value=f"{im.id}:{number}",
                                 description="flagged: behind a spoiler" if im.flagged else None)
            for number, im in enumerate(images[:25], 1)])

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["gen"]), list(item.options))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        # acknowledged first: reading the image is a database query and a file read
        await interaction.response.defer(ephemeral=True, thinking=True)
        chosen = PICK_VALUE.fullmatch(self.item.values[0] if self.item.values else "")
        if chosen is None:
            await interaction.edit_original_response(content="Please pick one of the listed images.")
            return
        image_id, number = int(chosen["img"]), int(chosen["n"])
        picked = await service_of(interaction).picks.pick(image_id, interaction.user.id)
        if not picked.ok:
            await interaction.edit_original_response(content=picked.message)
            return
        file = discord.File(io.BytesIO(picked.png), filename=f"image{number}-{image_id}.png", spoiler=picked.spoiler)
        await interaction.edit_original_response(
            content=f"Image {number} of this result: vote on it, report it or make variations of it.",
            attachments=[file], view=ImagePanel(image_id, number))


class ImagePanel(discord.ui.View):
    """👍 👎 Variations Report for one image: the result message's persistent items, keyed by its image id."""

    def __init__(self, image_id: int, number: int) -> None:
        super().__init__(timeout=None)
        self.add_item(VoteButton("up", image_id))
        self.add_item(VoteButton("down", image_id))
        variations = VariationButton(image_id, number)
        variations.item.label = "Variations"
        variations.item.emoji = "🎨"
        self.add_item(variations)
        self.add_item(ReportButton(image_id))
