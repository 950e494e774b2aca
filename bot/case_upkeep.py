"""Upkeep of the review queue, run by a front end's background loop and its message-deletion events.

- An open case left undecided longer than its guild's ``reping_hours`` (the global ``CASE_REPING_HOURS`` where
  the guild sets none; 0 turns it off) is re-pinged once in the review channel. The case is stamped before the
  ping goes out, so two processes sharing the database never both remind, and a failed ping is not repeated.
- A case whose public message was deleted has nothing left to moderate: it is closed (status ``closed`` with a
  note, audited as ``close`` by ``SYSTEM_MODERATOR``) and its review post is edited to say so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from bot.moderation import ModerationService

log = logging.getLogger(__name__)

DELETED_NOTE = "public message deleted"


class CaseUpkeep:
    def __init__(self, repo: Any, moderation: ModerationService, *, reping_hours: int = 24,
                 interval_s: float = 300.0) -> None:
        """``reping_hours``: the global default; ``interval_s``: how often a front end's loop calls
        :meth:`reping_due`."""
        self.repo = repo
        self.moderation = moderation
        self.reping_hours = reping_hours
        self.interval_s = interval_s

    async def reping_due(self) -> list[int]:
        """Re-ping every posted open case that is due (once each); returns their ids."""
        front = self.moderation.front_end
        if front is None or not hasattr(front, "reping_case"):
            return []
        pinged = []
        no_default = self.moderation.review_channel_id is None  # then only guilds with their own channel
        for case in await self.repo.cases_due_for_reping(self.reping_hours, own_channel_only=no_default):
            channel = await self.moderation.review_channel(case.guild_id)
            if channel is None or not await self.repo.claim_reping(case.id):
                continue  # no review channel any more, or another process reminded already
            gs = await self.moderation.guild_settings(case.guild_id)
            role = getattr(gs, "moderator_role_id", None) if gs is not None else None
            hours = int((self.repo.now() - case.opened_at).total_seconds() // 3600)
            try:
                view = await self.moderation.case_view(case.id, with_png=False)
                await front.reping_case(channel, case.review_message_id, view, hours, role)
                pinged.append(case.id)
            except Exception:  # noqa: BLE001 - one case's failure must not hold back the others
                log.warning("re-pinging case %s failed", case.id, exc_info=True)
        return pinged

    async def public_message_deleted(self, message_ids: Iterable[int]) -> list[int]:
        """Messages were deleted: close the open cases on the results they carried and edit their review posts;
        returns the closed cases' ids."""
        closed = await self.repo.close_cases_of_messages(message_ids, DELETED_NOTE)
        front = self.moderation.front_end
        for case_id in closed:
            log.info("case %s closed: its public message was deleted", case_id)
            if front is None:
                continue
            try:
                view = await self.moderation.case_view(case_id, with_png=False)
                channel = await self.moderation.review_channel(view.guild_id)
                if channel is not None and view.review_message_id is not None:
                    await front.update_case(channel, view.review_message_id, view)
            except Exception:  # noqa: BLE001 - the case is closed and audited; the post is cosmetic
                log.warning("updating the review post of case %s failed", case_id, exc_info=True)
        return closed
