"""The author's own control over a result, Discord-independent: the requester (or one of the guild's moderators)
deletes it. The public message goes first (the front end's ``take_down``); then the generation's rows go too,
unless an open moderation case still needs them: the case stays open with its evidence, and the rows go when a
moderator decides it (:meth:`ResultDeletion.case_decided`). Either way the deletion is an audited
``ModerationAction`` (``delete``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from bot.moderation import ModerationService, Moderator, NotModerator
from store.repository import Repository

log = logging.getLogger(__name__)

# a result marked deleted this long ago with no case open was left by a crash (a deletion in progress is younger)
LEFT_BEHIND = timedelta(minutes=10)
NOT_YOURS = "Only the member who asked for these images (or a moderator) can delete them."


class ResultDeletion:
    def __init__(self, repo: Repository, moderation: ModerationService) -> None:
        self.repo = repo
        self.moderation = moderation

    async def may_delete(self, gen: Any, actor: Moderator) -> bool:
        """The requester, or a moderator of the guild the result was posted in."""
        if actor.user_id == gen.user_id or actor.operator:
            return True
        return (gen.guild_id is not None and actor.guild_id == gen.guild_id
                and await self.moderation.is_moderator(actor.guild_id, actor.role_ids, actor.can_manage_messages))

    async def delete(self, generation_id: int, actor: Moderator,
                     take_down: Callable[[Any], Awaitable[None]] | None = None) -> str:
        """Delete a result; returns what to tell the actor. Raises :class:`NotModerator` (nothing changed) for
        anyone but the requester or a moderator. ``take_down(generation)`` removes the public message; if it
        raises, nothing else changes."""
        gen = await self.repo.get_generation(generation_id, with_images=False)
        if gen is None:
            return "That result was deleted already."
        if not await self.may_delete(gen, actor):
            raise NotModerator(NOT_YOURS)
        # marked before the message goes: its delete event must not close the cases on it (that would let an
        # author escape a report, and race the deletion below)
        marked = await self.repo.mark_result_deleted(generation_id)
        if marked is None:
            return "That result was deleted already."
        if take_down is not None:
            try:
                await take_down(gen)
            except BaseException:
                if marked:
                    await self.repo.mark_result_deleted(generation_id, deleted=False)
                raise
        who = "author" if actor.user_id == gen.user_id else "moderator"
        done = await self.repo.delete_result(generation_id, actor.user_id, guild_id=gen.guild_id,
                                             reason=f"result #{generation_id} deleted by its {who}")
        if done is None:
            return "That result was deleted already."
        if not done.deleted:
            return ("Deleted from the channel. Moderators are reviewing a report on these images, so they are kept "
                    "for that review.")
        await asyncio.to_thread(_unlink, done.file_paths)
        log.info("generation %s deleted by %s %s", generation_id, who, actor.user_id)
        return "Deleted: the message and its images are gone."


    async def case_decided(self, generation_id: int) -> None:
        """A case on this result was decided: if its author had deleted it and no other case is open, the rows kept
        for the review go now, and its files. Results a crash left behind after their decision (marked long ago,
        no case open) go with them."""
        stale = await self.repo.deleted_results_before(self.repo.now() - LEFT_BEHIND)
        for gen_id in [generation_id, *(g for g in stale if g != generation_id)]:
            paths = await self.repo.finish_deleted_result(gen_id)
            if paths is not None:
                await asyncio.to_thread(_unlink, paths)
                log.info("generation %s: deleted by its author, no case open any more; its rows are gone", gen_id)


def _unlink(paths: tuple[str, ...]) -> None:
    for p in paths:
        try:
            Path(p).unlink(missing_ok=True)
        except OSError:
            log.warning("could not remove image file %s", p, exc_info=True)
