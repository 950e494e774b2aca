"""The Discord ``Publisher``: progress edits on the acknowledgement, and the result post.

Progress edits the acknowledgement while its token is valid, at most one edit per ``progress_interval`` per job.
Results go out as ordinary channel messages (an ephemeral follow-up only for private requests), so a long queue
never loses a result to the 15-minute token (peers.md #1, #2). Everything goes through REST only, so it works
before the gateway is ready and after a restart, from nothing but the Generation row.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import discord
from discord.ext import commands

from bot.grid import grid_png
from bot.outcome import Outcome, ProgressUpdate
from bot.views.queue import CancelView
from bot.views.result import ResultView

log = logging.getLogger(__name__)

PROMPT_SHOWN = 1500  # characters of the (escaped) prompt in a result message; Discord allows 2000 in all
DEFAULT_FILE_LIMIT = 10 * 1024 * 1024  # Discord's default per-message upload limit since 2025-01
ENVELOPE_RESERVE = 64 * 1024  # bytes kept free for the multipart JSON and boundaries
TOKEN_MARGIN = timedelta(seconds=30)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def token_valid(gen: Any) -> bool:
    exp = _aware(getattr(gen, "token_expires_at", None))
    return bool(gen.interaction_token and gen.application_id and exp and datetime.now(UTC) + TOKEN_MARGIN < exp)


def result_nonce(gen: Any) -> str:
    """The nonce of a generation's result message. discord.py sends it with ``enforce_nonce``: a second post of the
    same result by this bot within a few minutes (another process that took over a lapsed lease, a retry after a
    lost answer) returns the first message instead of creating another. Follow-up webhooks take no nonce."""
    return f"result-{gen.id}"


class DiscordPublisher:
    """Delivers through REST only (webhook edits, channel posts), so it works before the gateway is ready and
    after a restart, from nothing but the Generation row."""

    def __init__(self, bot: commands.Bot, progress_interval: float = 2.0) -> None:
        self.bot = bot
        self.progress_interval = progress_interval
        self._last_edit: dict[int, tuple[float, str]] = {}

    def _webhook(self, gen: Any) -> discord.Webhook:
        # type 3 (application), as Interaction.followup builds it: only those may send ephemeral messages
        payload = {"id": int(gen.application_id), "type": 3, "token": gen.interaction_token}
        return discord.Webhook.from_state(payload, self.bot._connection)  # type: ignore[arg-type]

    async def _edit_ack(self, gen: Any, **kwargs: Any) -> None:
        target = gen.ack_message_id or "@original"
        await self._webhook(gen).edit_message(target, **kwargs)  # type: ignore[arg-type]

    async def progress(self, gen: Any, update: ProgressUpdate) -> None:
        if not token_valid(gen):
            return
        now = time.monotonic()
        last_t, last_state = self._last_edit.get(gen.id, (-1e9, ""))
        if update.state == last_state and now - last_t < self.progress_interval:
            return  # throttled: Discord limits message edits (peers.md #11)
        self._last_edit[gen.id] = (now, update.state)
        view = CancelView(gen.id) if update.state == "queued" else None
        await self._edit_ack(gen, content=update.text, view=view)

    def _content(self, outcome: Outcome) -> str:
        gen = outcome.generation
        # escaping can double the prompt's length: cut after escaping (and never in the middle of an escape)
        prompt = discord.utils.escape_markdown(gen.prompt)
        if len(prompt) > PROMPT_SHOWN:
            prompt = prompt[:PROMPT_SHOWN].rstrip("\\") + "…"
        head = f"<@{gen.user_id}> **{prompt}**"
        if not outcome.ok:
            error = str(outcome.error or "")
            return f"{head}\nSorry, the generation failed: {error[:300]}"
        lines = [head, f"seed `{gen.seed}` · {len(outcome.images)} images, best CLIP score first"
                 + (f" · {gen.kind} of #{gen.parent_generation_id}" if gen.parent_generation_id else "")]
        removed = sum(im.removed for im in outcome.images)
        withheld = sum(im.withheld and not im.removed for im in outcome.images)
        hidden = sum(im.flagged and not im.withheld for im in outcome.images)
        if removed:
            lines.append(f"{removed} image(s) removed by a moderator.")
        if withheld:
            lines.append(f"{withheld} image(s) withheld for the moderators to review (flagged by the safety "
                         "checker, or like an image they removed).")
        if hidden:
            lines.append(f"{hidden} image(s) flagged by the safety checker are hidden behind a spoiler.")
        return "\n".join(lines)

    def _files(self, outcome: Outcome, limit: int) -> tuple[list[discord.File], list]:
        shown = [im for im in outcome.images if not im.withheld]
        safe = [im for im in shown if not im.flagged]
        files: list[discord.File] = []
        budget = limit - min(ENVELOPE_RESERVE, limit // 8)  # leave room for the multipart envelope
        grid = b""
        if safe and budget > 0:
            try:  # grid_png leaves out images whose stored PNG is gone or unreadable
                grid = grid_png(safe, max_bytes=budget // 2)
            except ValueError:  # none is readable: the message goes out without the grid
                log.warning("no grid for generation %s: no stored image is readable", outcome.generation.id)
        if grid and len(grid) <= budget:  # the grid only shrinks so far: below that it is left out, not refused
            files.append(discord.File(io.BytesIO(grid), filename="grid.png"))
            budget -= len(grid)
        for number, im in enumerate(shown, 1):
            if len(files) >= 10 or len(im.png) > budget or not im.png:
                continue
            files.append(discord.File(io.BytesIO(im.png), filename=f"v{number}-image{im.id}.png",
                                      spoiler=im.flagged))
            budget -= len(im.png)
        return files, shown

    def _upload_limit(self, gen: Any) -> int:
        """Bytes of attachments a message in the job's channel or interaction may carry.

        The interaction's ``attachment_size_limit`` (stored with the job, so it survives a restart) holds for its
        follow-ups and for posts in its guild (a DM gets Discord's default)."""
        if getattr(gen, "upload_limit", None):
            return int(gen.upload_limit)
        if gen.guild_id and (guild := self.bot.get_guild(gen.guild_id)) is not None:
            return guild.filesize_limit
        return DEFAULT_FILE_LIMIT

    async def _message_parts(self, outcome: Outcome, limit: int) -> tuple[list[discord.File], Any]:
        if not outcome.ok:
            return [], discord.utils.MISSING
        # decoding, resizing and PNG-encoding the grid is CPU work: off the event loop
        files, shown = await asyncio.to_thread(self._files, outcome, limit)
        return files, ResultView(outcome.generation.id, shown) if shown else discord.utils.MISSING

    async def publish(self, outcome: Outcome) -> int | None:
        gen = outcome.generation
        self._last_edit.pop(gen.id, None)
        content = self._content(outcome)
        alive = token_valid(gen)
        # only the requester is pinged, whatever mentions the prompt holds
        mentions = discord.AllowedMentions(users=[discord.Object(id=gen.user_id)], everyone=False, roles=False)
        if not gen.private:
            files, view = await self._message_parts(outcome, self._upload_limit(gen))
            try:
                channel = self.bot.get_partial_messageable(gen.channel_id)
                msg = await channel.send(content, files=files, view=view, allowed_mentions=mentions,
                                         nonce=result_nonce(gen))
            except discord.HTTPException as exc:
                if exc.status >= 500 or exc.status == 429:
                    raise  # transient (discord.py already retried): stays undelivered, retried at the next start
                # refused for good (no Send Messages / Attach Files, archived thread, an app-only context...):
                # the interaction's own follow-up still reaches the channel while the token lives; else a DM
                log.info("channel %s refused the result of %s (%s %s): delivering it another way",
                         gen.channel_id, gen.id, exc.status, exc.code)
                return await self._deliver_privately(gen, outcome, content, alive, mentions, ephemeral=False)
            if alive:
                try:
                    done = "Done: posted below." if outcome.ok else "Failed."
                    await self._edit_ack(gen, content=done, view=None)
                except discord.HTTPException:
                    log.info("could not edit the acknowledgement of %s", gen.id)
            return msg.id
        return await self._deliver_privately(gen, outcome, content, alive, mentions, ephemeral=True)

    async def refresh(self, outcome: Outcome) -> None:
        """Re-render a posted public result in place (a moderator removed or restored one of its images): the
        grid, the attachments, the text and the buttons as ``outcome``'s images are now."""
        gen = outcome.generation
        if gen.private or not gen.result_message_id or not gen.channel_id:
            return
        files, view = await self._message_parts(outcome, self._upload_limit(gen))
        message = self.bot.get_partial_messageable(gen.channel_id).get_partial_message(gen.result_message_id)
        await message.edit(content=self._content(outcome), attachments=files,
                           view=None if view is discord.utils.MISSING else view)

    async def _deliver_privately(self, gen: Any, outcome: Outcome, content: str, alive: bool,
                                 mentions: discord.AllowedMentions, *, ephemeral: bool) -> int:
        """Through the interaction's follow-up webhook while its token lives, else (or if Discord refuses the
        token) as a DM to the requester. Each attempt builds its own files (a sent file is spent) to its limit."""
        if alive:
            files, view = await self._message_parts(outcome, self._upload_limit(gen))
            try:
                msg = await self._webhook(gen).send(content, files=files, view=view, ephemeral=ephemeral, wait=True,
                                                    allowed_mentions=mentions)
                return msg.id
            except discord.HTTPException as exc:
                if exc.status not in (401, 404):  # only a dead token falls through to the DM
                    raise
                log.info("follow-up token of %s refused (%s): sending the result as a DM", gen.id, exc.status)
        files, view = await self._message_parts(outcome, DEFAULT_FILE_LIMIT)
        dm = await self.bot.create_dm(discord.Object(id=gen.user_id))  # one REST call, no user lookup
        msg = await dm.send(content, files=files, view=view, allowed_mentions=mentions, nonce=result_nonce(gen))
        return msg.id
