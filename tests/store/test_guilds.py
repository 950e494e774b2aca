"""Per-guild settings: overrides, validation, and the database's CHECK constraint behind it."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError


async def test_guild_settings(repo):
    assert await repo.get_guild_settings(10) is None
    gs = await repo.update_guild_settings(10, flagged_mode="withhold", daily_quota=5, block_list=["gore"])
    gs = await repo.update_guild_settings(10, rate_limit_user="2/minute", review_channel_id=2**60)
    got = await repo.get_guild_settings(10)
    assert (got.flagged_mode, got.daily_quota, got.block_list, got.allow_list) == ("withhold", 5, ["gore"], [])
    assert got.rate_limit_user == "2/minute" and got.review_channel_id == 2**60 and gs.guild_id == 10
    with pytest.raises(ValueError, match="unknown guild setting"):
        await repo.update_guild_settings(10, colour="red")
    with pytest.raises(ValueError, match="flagged_mode"):
        await repo.update_guild_settings(10, flagged_mode="blur")
    with pytest.raises(ValueError, match="daily_quota"):
        await repo.update_guild_settings(10, daily_quota=-1)
    with pytest.raises(IntegrityError):  # and the database's CHECK constraint behind it
        async with repo.sessions.begin() as s:
            await s.execute(text("UPDATE guild_settings SET daily_quota = -1 WHERE guild_id = 10"))
