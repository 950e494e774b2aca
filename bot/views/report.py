"""The report form: opened by a result's Report button, answered from its submission alone."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.outcome import MAX_FEEDBACK_NOTE
from bot.views.common import delivery_for, service_of

REASONS = ("nsfw", "bias", "quality", "other")


class ReportModal(discord.ui.Modal):
    """The report form. Its submission is handled by :func:`handle_report_submit` (an ``on_interaction``
    listener), not by this object: a modal lives only in the memory of the process that opened it, and a user
    may submit it after a restart, or while another user has the same image's form open."""

    reason: discord.ui.TextInput = discord.ui.TextInput(
        label="Reason: nsfw, bias, quality or other", custom_id="reason", max_length=10, placeholder="nsfw")
    note: discord.ui.TextInput = discord.ui.TextInput(
        label="Details (optional)", custom_id="note", style=discord.TextStyle.paragraph, required=False,
        max_length=MAX_FEEDBACK_NOTE)

    def __init__(self, image_id: int) -> None:
        super().__init__(title="Report this image", custom_id=f"dalle:reportmodal:{image_id}", timeout=600)
        self.image_id = image_id


REPORT_MODAL_RE = re.compile(r"dalle:reportmodal:(?P<img>[0-9]+)")


def modal_values(data: Any) -> dict[str, str]:
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
    values = modal_values(interaction.data)
    reason = values.get("reason", "").strip().lower()
    if reason not in REASONS:
        await interaction.response.send_message(
            f"Please give one of: {', '.join(REASONS)} (you wrote {reason!r}).", ephemeral=True)
        return True
    await interaction.response.defer(ephemeral=True, thinking=True)
    res = await service_of(interaction).feedback(int(match["img"]), interaction.user.id, "report", reason=reason,
                                               note=values.get("note", "").strip() or None,
                                               contact=delivery_for(interaction))
    await interaction.edit_original_response(content=res.message)
    return True
