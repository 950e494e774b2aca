"""AdminService on SQLite and PostgreSQL: only Manage Server changes a guild's settings; every change is audited."""

from __future__ import annotations

import pytest

from bot.admin import Admin, AdminService, NotAdmin

GUILD = 2000


@pytest.fixture
def admin(repo):
    return AdminService(repo, guild_settings=repo.get_guild_settings, update_settings=repo.update_guild_settings,
                        defaults={"flagged_mode": "spoiler", "review_channel_id": 3100, "daily_quota": 100})


async def test_admin_settings_need_manage_server_and_are_audited(admin, repo):
    boss = Admin(user_id=1, guild_id=GUILD, can_manage_guild=True)
    for who in (Admin(user_id=2, guild_id=GUILD), Admin(user_id=1, guild_id=None, can_manage_guild=True)):
        with pytest.raises(NotAdmin):
            await admin.set(who, flagged_mode="withhold")
        with pytest.raises(NotAdmin):
            await admin.show(who)
    assert await repo.get_guild_settings(GUILD) is None
    shown = await admin.show(boss)
    assert shown["review_channel_id"] == (3100, False) and shown["moderator_role_id"] == (None, False)

    text = await admin.set(boss, flagged_mode="withhold", moderator_role_id=2500, daily_quota=None)
    assert text == "Changed: moderator role → 2500, flagged images → withhold."
    shown = await admin.show(boss)
    assert shown["flagged_mode"] == ("withhold", True) and shown["daily_quota"] == (100, False)
    for bad, match in (({"flagged_mode": "blur"}, "spoiler or withhold"), ({"daily_quota": -1}, "negative"),
                       ({}, "nothing to change"), ({"karma": 3}, "unknown")):
        with pytest.raises(ValueError, match=match):
            await admin.set(boss, **bad)
    record = await repo.user_record(1)
    assert record.generations == 0
    from sqlalchemy import select

    from store.models import ModerationAction

    async with repo.sessions() as s:
        rows = list((await s.execute(select(ModerationAction))).scalars())
    assert [(r.action, r.moderator_id, r.guild_id, r.reason) for r in rows] == [
        ("settings", 1, GUILD, "flagged_mode=withhold, moderator_role_id=2500")]
