"""``/dalle`` and ``/dalle-queue``: thin commands over the generation service.

``/dalle`` defers FIRST (the 3-second rule), then admits through the service; the Discord publisher
(``bot.publish``) shows progress and posts the result.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.outcome import MAX_IMAGES
from bot.views.common import delivery_for, record_ack, tell_failure
from bot.views.queue import CancelView
from bot.views.report import handle_report_submit

log = logging.getLogger(__name__)

DISCORD_INTEGER_LIMIT = 2**53  # the largest integer a Discord command option carries


class Generate(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot

    @property
    def service(self):
        return self.bot.service  # type: ignore[attr-defined]

    @app_commands.command(name="dalle", description="Generate images from a text prompt")
    @app_commands.describe(prompt="What to draw", images=f"How many images (1-{MAX_IMAGES})",
                           seed="Random seed (reproducible)", private="Only you see the result")
    async def dalle(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 1000],
                    images: app_commands.Range[int, 1, MAX_IMAGES] | None = None,
                    seed: app_commands.Range[int, 0, DISCORD_INTEGER_LIMIT] | None = None,
                    private: bool = False) -> None:
        await interaction.response.defer(thinking=True, ephemeral=private)  # FIRST: the 3-second deadline
        metrics = getattr(self.bot, "metrics", None)
        if metrics is not None:
            metrics.ack_latency.observe(max(0.0, (discord.utils.utcnow() - interaction.created_at).total_seconds()))
        adm = await self.service.submit(
            user_id=interaction.user.id, guild_id=interaction.guild_id, prompt=prompt, n=images, seed=seed,
            private=private, delivery=delivery_for(interaction))
        if not adm.ok:
            await tell_refusal(interaction, adm.message, private)
            return
        position = self.service.position(adm.generation_id)
        if not position:  # already running or finished: the publisher owns the acknowledgement now
            return
        msg = await interaction.edit_original_response(
            content=f"Queued, position {position}. Seed `{adm.seed}`.", view=CancelView(adm.generation_id))
        await record_ack(self.service, adm.generation_id, msg.id)

    @commands.Cog.listener("on_interaction")
    async def report_submitted(self, interaction: discord.Interaction) -> None:
        """Report forms are answered from the submission itself, so one opened before a restart still counts."""
        try:
            await handle_report_submit(interaction)
        except Exception:
            log.exception("report submission %s failed", interaction.id)
            await tell_failure(interaction)

    @app_commands.command(name="dalle-queue", description="Your queued image requests and their positions")
    async def dalle_queue(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        jobs = await self.service.user_queue(interaction.user.id)
        if not jobs:
            await interaction.edit_original_response(content="You have nothing queued.")
            return
        await interaction.edit_original_response(content=queue_listing(jobs))


async def tell_refusal(interaction: discord.Interaction, message: str, private: bool) -> None:
    """A refusal is for the user alone. A public request was deferred publicly (the 3-second rule comes before the
    checks), so the refusal goes out as an ephemeral follow-up and the public "thinking" message is deleted;
    if the follow-up fails, the public message says it instead, so the user always hears why."""
    if private:
        await interaction.edit_original_response(content=message)
        return
    try:
        await interaction.followup.send(message, ephemeral=True)
    except discord.HTTPException:
        log.warning("ephemeral refusal for interaction %s failed; editing the public reply", interaction.id)
        await interaction.edit_original_response(content=message)
        return
    try:
        await interaction.delete_original_response()
    except discord.HTTPException:
        log.info("could not delete the public reply of refused interaction %s", interaction.id, exc_info=True)


def queue_listing(jobs: list, limit: int = 2000) -> str:
    """One line per job (id, position, prompt), cut to what fits one Discord message (``limit`` characters):
    a line is added only if the note on the jobs after it ("…and N more") would still fit behind it."""
    lines: list[str] = []
    used = 0
    for k, (gen, pos) in enumerate(jobs):
        where = "running" if pos == 0 else f"position {pos}" if pos else gen.status
        prompt = gen.prompt if len(gen.prompt) <= 80 else gen.prompt[:80] + "…"
        line = f"#{gen.id} · {where} · {discord.utils.escape_markdown(prompt)}"
        after = len(jobs) - k - 1
        if used + len(line) + (len(f"\n…and {after} more") if after else 0) > limit:
            lines.append(f"…and {len(jobs) - k} more")  # fits: the previous line reserved room for it
            break
        lines.append(line)
        used += len(line) + 1
    return "\n".join(lines)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Generate(bot))
