"""The result message's buttons: Reroll, 👍, 👎, Report (on the best image), V1..Vn (variations) and the "Pick an
image" menu (``bot.views.image_panel``: vote, report or vary any one image)."""

from __future__ import annotations

import discord

from bot.outcome import StoredImage
from bot.views.common import answers_failures, delivery_for, service_of
from bot.views.delete import DeleteButton
from bot.views.queue import queued_reply
from bot.views.report import ReportModal


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"dalle:reroll:(?P<gen>[0-9]+)"):
    def __init__(self, generation_id: int) -> None:
        super().__init__(discord.ui.Button(label="Reroll", emoji="🔁", style=discord.ButtonStyle.secondary,
                                           custom_id=f"dalle:reroll:{generation_id}"))
        self.generation_id = generation_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["gen"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        adm = await service_of(interaction).reroll(self.generation_id, interaction.user.id,
                                                  guild_id=interaction.guild_id, delivery=delivery_for(interaction))
        await queued_reply(interaction, adm, "Reroll")


class VariationButton(discord.ui.DynamicItem[discord.ui.Button], template=r"dalle:var:(?P<img>[0-9]+):(?P<n>[0-9]+)"):
    def __init__(self, image_id: int, number: int) -> None:
        super().__init__(discord.ui.Button(label=f"V{number}", style=discord.ButtonStyle.secondary,
                                           custom_id=f"dalle:var:{image_id}:{number}"))
        self.image_id = image_id
        self.number = number

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["img"]), int(match["n"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        adm = await service_of(interaction).variation(self.image_id, interaction.user.id, guild_id=interaction.guild_id,
                                                     delivery=delivery_for(interaction))
        await queued_reply(interaction, adm, f"Variation V{self.number}")


class VoteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"dalle:vote:(?P<kind>up|down):(?P<img>[0-9]+)"):
    def __init__(self, kind: str, image_id: int) -> None:
        super().__init__(discord.ui.Button(emoji="👍" if kind == "up" else "👎", style=discord.ButtonStyle.secondary,
                                           custom_id=f"dalle:vote:{kind}:{image_id}"))
        self.kind = kind
        self.image_id = image_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(match["kind"], int(match["img"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        # acknowledged first: the vote is a database write, and Discord allows 3 s for the first answer
        await interaction.response.defer(ephemeral=True, thinking=True)
        res = await service_of(interaction).feedback(self.image_id, interaction.user.id, self.kind)
        if res.ok and self.kind == "down":  # what was wrong decides what retraining learns from the 👎
            await interaction.edit_original_response(content=f"{res.message} What was wrong with it?",
                                                     view=VoteReasonView(self.image_id))
        else:
            await interaction.edit_original_response(content=res.message)


#: the reasons a 👎 may carry, with their buttons' labels (``bias``: the model's default showing through, e.g. a
#: colour nobody asked for, which retraining can answer with the same image in other colours)
VOTE_REASONS = {"bias": "A default I didn't ask for (colour…)", "quality": "Wrong or badly drawn",
                "other": "Something else"}


class VoteReasonButton(discord.ui.DynamicItem[discord.ui.Button],
                       template=r"dalle:why:(?P<reason>bias|quality|other):(?P<img>[0-9]+)"):
    """Attaches a reason to the user's 👎 (the vote is recorded again with it; a 👍 since then is replaced)."""

    def __init__(self, reason: str, image_id: int) -> None:
        super().__init__(discord.ui.Button(label=VOTE_REASONS[reason], style=discord.ButtonStyle.secondary,
                                           custom_id=f"dalle:why:{reason}:{image_id}"))
        self.reason = reason
        self.image_id = image_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(match["reason"], int(match["img"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        res = await service_of(interaction).feedback(self.image_id, interaction.user.id, "down", reason=self.reason)
        await interaction.edit_original_response(content="Noted, thanks." if res.ok else res.message)


class VoteReasonView(discord.ui.View):
    def __init__(self, image_id: int) -> None:
        super().__init__(timeout=None)
        for reason in VOTE_REASONS:
            self.add_item(VoteReasonButton(reason, image_id))


class ReportButton(discord.ui.DynamicItem[discord.ui.Button], template=r"dalle:report:(?P<img>[0-9]+)"):
    def __init__(self, image_id: int) -> None:
        super().__init__(discord.ui.Button(label="Report", emoji="⚠️", style=discord.ButtonStyle.danger,
                                           custom_id=f"dalle:report:{image_id}"))
        self.image_id = image_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["img"]))

    @answers_failures
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(ReportModal(self.image_id))


class ResultView(discord.ui.View):
    """Reroll, 👍, 👎, Report (acting on the best image) and V1..Vn (one per posted image, best first)."""

    def __init__(self, generation_id: int, images: list[StoredImage]) -> None:
        super().__init__(timeout=None)
        best = images[0].id if images else None
        self.add_item(RerollButton(generation_id))
        if best is not None:
            self.add_item(VoteButton("up", best))
            self.add_item(VoteButton("down", best))
            self.add_item(ReportButton(best))
        self.add_item(DeleteButton(generation_id))  # the author's own 🗑 (bot.views.delete), row 0
        for number, im in enumerate(images[:10], 1):
            item = VariationButton(im.id, number)
            item.item.row = 1 if number <= 5 else 2
            self.add_item(item)
        if images:
            # imported here: the per-image panel is built from this module's buttons
            from bot.views.image_panel import PickSelect

            pick = PickSelect.for_images(generation_id, images)
            pick.item.row = 3  # a select takes a whole row: rows 0-2 hold the buttons
            self.add_item(pick)
