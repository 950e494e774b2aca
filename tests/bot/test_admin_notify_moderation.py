"""The guild's notify_mode on SQLite and PostgreSQL: how reporters and authors hear a moderator's decision
(privately on their own interaction while it is valid, or always by DM)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from bot.moderation import ModerationService, Moderator
from bot.outcome import Delivery
from store.repository import NewImage

GUILD = 2000


class FrontEnd:
    def __init__(self):
        self.told = []

    async def post_case(self, channel_id, case):
        return 901

    async def update_case(self, channel_id, message_id, case):
        pass

    async def refresh_result(self, outcome):
        pass

    async def tell_user(self, user_id, text, contact):
        self.told.append((user_id, contact))


@pytest.mark.parametrize("mode", ["ephemeral", "dm"])
async def test_moderation_notify_mode_ephemeral_or_dm(repo, mode):
    async def settings(guild_id):
        return await repo.get_guild_settings(guild_id) if guild_id else None

    async def flagged(guild_id):
        return "spoiler"

    moderation = ModerationService(repo, guild_settings=settings, flagged_mode=flagged, front_end=FrontEnd())
    await repo.update_guild_settings(GUILD, notify_mode=mode)
    gen = await repo.create_generation(user_id=77, prompt="a vase", guild_id=GUILD, channel_id=3000, seed=1)
    [image] = await repo.add_images(gen.id, [NewImage(index=0, tokens=[1, 2], rank=0)])
    await repo.mark_delivered(gen.id, result_message_id=4444)
    contact = Delivery(application_id=1000, interaction_token="tok-report",
                       token_expires_at=repo.now() + timedelta(minutes=10))
    case_id, _ = await moderation.open_case("report", image_id=image.id, reason="nsfw", reporter=5, contact=contact)
    await moderation.remove(case_id, Moderator(user_id=9, guild_id=GUILD, can_manage_messages=True))
    # the reporter's own report interaction goes to the front end (which answers there while it is valid) unless the
    # guild says DM; the author's /dalle token was dropped when the result was delivered: a DM
    assert dict(moderation.front_end.told) == {5: contact if mode == "ephemeral" else None, 77: None}
