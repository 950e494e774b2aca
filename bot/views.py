"""Persistent message components. Every custom id carries the generation or image id it acts on
(``dalle:<action>:<id>``) and is decoded by a ``discord.ui.DynamicItem``, so buttons on messages posted
before a restart keep working (peers.md #3, #4, #8): nothing is looked up in process memory.

The items call ``interaction.client.service`` (a ``bot.service.GenerationService``) and answer ephemerally.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import discord
from PIL import Image as PILImage

from bot.service import Delivery, StoredImage

log = logging.getLogger(__name__)

REASONS = ("nsfw", "bias", "quality", "other")


def _service(interaction: discord.Interaction) -> Any:
    return interaction.client.service  # type: ignore[attr-defined]


SORRY = "Sorry, that did not work; please try again in a moment."
_Item = TypeVar("_Item")


async def tell_failure(interaction: discord.Interaction) -> None:
    """Answer an interaction whose handler failed, however far it got: not answered, deferred and thinking, or
    deferred without a visible change (a button on a message that must stay as it is: a private follow-up)."""
    try:
        if interaction.response.type is discord.InteractionResponseType.deferred_message_update:
            await interaction.followup.send(SORRY, ephemeral=True)
        elif interaction.response.is_done():
            await interaction.edit_original_response(content=SORRY, view=None)
        else:
            await interaction.response.send_message(SORRY, ephemeral=True)
    except discord.HTTPException:
        log.info("could not tell interaction %s about its failure", interaction.id)


def answers_failures(
    callback: Callable[[_Item, discord.Interaction], Awaitable[None]],
) -> Callable[[_Item, discord.Interaction], Awaitable[None]]:
    """A component callback that logs its error and tells the user, instead of leaving them at "thinking…"."""

    @functools.wraps(callback)
    async def run(self: _Item, interaction: discord.Interaction) -> None:
        try:
            await callback(self, interaction)
        except Exception:
            log.exception("%s failed for interaction %s", type(self).__name__, interaction.id)
            await tell_failure(interaction)

    return run


def delivery_for(interaction: discord.Interaction) -> Delivery:
    return Delivery(channel_id=interaction.channel_id, application_id=interaction.application_id,
                    interaction_token=interaction.token, token_expires_at=interaction.expires_at,
                    upload_limit=interaction.filesize_limit)


async def _queued_reply(interaction: discord.Interaction, adm: Any, what: str) -> None:
    """Answer a deferred component interaction with the admission result and remember the ack message."""
    if not adm.ok:
        await interaction.edit_original_response(content=adm.message)
        return
    msg = await interaction.edit_original_response(
        content=f"{what} queued, position {adm.position}.", view=CancelView(adm.generation_id))
    await record_ack(_service(interaction), adm.generation_id, msg.id)


async def record_ack(service: Any, generation_id: int, message_id: int) -> None:
    """Remember the acknowledgement message (progress edits go to it). The job is queued already, so a failed
    write is logged, not reported as a failure (the user would retry and queue it twice); edits then address
    the interaction's original response, which is the same message. Shielded: a shutdown must not cut the
    write in half."""
    try:
        await asyncio.shield(service.record_ack(generation_id, message_id))
    except Exception:  # noqa: BLE001 - see above
        log.warning("recording the acknowledgement of generation %s failed", generation_id, exc_info=True)


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
        adm = await _service(interaction).reroll(self.generation_id, interaction.user.id,
                                                  guild_id=interaction.guild_id, delivery=delivery_for(interaction))
        await _queued_reply(interaction, adm, "Reroll")


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
        adm = await _service(interaction).variation(self.image_id, interaction.user.id, guild_id=interaction.guild_id,
                                                     delivery=delivery_for(interaction))
        await _queued_reply(interaction, adm, f"Variation V{self.number}")


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
        res = await _service(interaction).feedback(self.image_id, interaction.user.id, self.kind)
        await interaction.edit_original_response(content=res.message)


class ReportModal(discord.ui.Modal):
    """The report form. Its submission is handled by :func:`handle_report_submit` (an ``on_interaction``
    listener), not by this object: a modal lives only in the memory of the process that opened it, and a user
    may submit it after a restart, or while another user has the same image's form open."""

    reason: discord.ui.TextInput = discord.ui.TextInput(
        label="Reason: nsfw, bias, quality or other", custom_id="reason", max_length=10, placeholder="nsfw")
    note: discord.ui.TextInput = discord.ui.TextInput(
        label="Details (optional)", custom_id="note", style=discord.TextStyle.paragraph, required=False,
        max_length=500)

    def __init__(self, image_id: int) -> None:
        super().__init__(title="Report this image", custom_id=f"dalle:reportmodal:{image_id}", timeout=600)
        self.image_id = image_id


REPORT_MODAL_RE = re.compile(r"dalle:reportmodal:(?P<img>[0-9]+)")


def _modal_values(data: Any) -> dict[str, str]:
    """``{custom_id: value}`` of a modal submission's text inputs (rows of components, or labelled inputs)."""
    out: dict[str, str] = {}
    stack = list((data or {}).get("components", []))
    while stack:
        comp = stack.pop()
        if not isinstance(comp, dict):
            continue
        if "custom_id" in comp and "value" in comp:
            out[str(comp["custom_id"])] = str(comp["value"] or "")
        stack.extend(comp.get("components", []))
        if isinstance(comp.get("component"), dict):
            stack.append(comp["component"])
    return out


async def handle_report_submit(interaction: discord.Interaction) -> bool:
    """Record a submitted report form from the interaction payload alone; False if it is not one of ours."""
    if interaction.type is not discord.InteractionType.modal_submit:
        return False
    match = REPORT_MODAL_RE.fullmatch(str((interaction.data or {}).get("custom_id", "")))
    if match is None:
        return False
    values = _modal_values(interaction.data)
    reason = values.get("reason", "").strip().lower()
    if reason not in REASONS:
        await interaction.response.send_message(
            f"Please give one of: {', '.join(REASONS)} (you wrote {reason!r}).", ephemeral=True)
        return True
    await interaction.response.defer(ephemeral=True, thinking=True)
    res = await _service(interaction).feedback(int(match["img"]), interaction.user.id, "report", reason=reason,
                                               note=values.get("note", "").strip() or None)
    await interaction.edit_original_response(content=res.message)
    return True


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
        ok = await _service(interaction).cancel(self.generation_id, interaction.user.id)
        if ok:
            await interaction.edit_original_response(content="Cancelled.", view=None)
        else:
            await interaction.followup.send("Only a queued request of yours can be cancelled.", ephemeral=True)


DYNAMIC_ITEMS = (RerollButton, VariationButton, VoteButton, ReportButton, CancelButton)


class CancelView(discord.ui.View):
    def __init__(self, generation_id: int) -> None:
        super().__init__(timeout=None)
        self.add_item(CancelButton(generation_id))


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
        for number, im in enumerate(images[:10], 1):
            item = VariationButton(im.id, number)
            item.item.row = 1 if number <= 5 else 2
            self.add_item(item)


def grid_png(images: list[StoredImage], max_bytes: int | None = None) -> bytes:
    """A near-square grid of the images in rank order (best top-left); shrunk until it fits ``max_bytes``.
    Images with no PNG (the file is gone) or an unreadable one are left out."""
    tiles = []
    for im in images:
        try:
            tiles.append(PILImage.open(io.BytesIO(im.png)).convert("RGB"))
        except (OSError, ValueError):  # PIL's UnidentifiedImageError is an OSError
            log.warning("image %s is left out of the grid: its PNG is missing or unreadable", im.id)
    if not tiles:
        raise ValueError("no images to put in a grid")
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    w, h = tiles[0].size
    scale = 1.0
    while True:
        tw, th = max(1, int(w * scale)), max(1, int(h * scale))
        canvas = PILImage.new("RGB", (cols * tw, rows * th), (255, 255, 255))
        for k, tile in enumerate(tiles):
            canvas.paste(tile.resize((tw, th)), ((k % cols) * tw, (k // cols) * th))
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")  # optimize=True: 5x the CPU (30 vs 6 ms a 3x3 grid) for 6% fewer bytes
        data = buf.getvalue()
        if max_bytes is None or len(data) <= max_bytes or tw <= 16:
            return data
        scale *= 0.7
