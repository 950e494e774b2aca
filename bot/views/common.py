"""What every component handler shares: the service behind the bot, answering failures, where results go."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import discord

from bot.outcome import Delivery

log = logging.getLogger(__name__)


def service_of(interaction: discord.Interaction) -> Any:
    """The ``bot.service.GenerationService`` of the bot the interaction reached."""
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


async def record_ack(service: Any, generation_id: int, message_id: int) -> None:
    """Remember the acknowledgement message (progress edits go to it). The job is queued already, so a failed
    write is logged, not reported as a failure (the user would retry and queue it twice); edits then address
    the interaction's original response, which is the same message. Shielded: a shutdown must not cut the
    write in half."""
    try:
        await asyncio.shield(service.record_ack(generation_id, message_id))
    except Exception:  # noqa: BLE001 - see above
        log.warning("recording the acknowledgement of generation %s failed", generation_id, exc_info=True)
