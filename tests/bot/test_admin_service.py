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


async def audit_rows(repo):
    from sqlalchemy import select

    from store.models import ModerationAction

    async with repo.sessions() as s:
        return [(r.action, r.moderator_id, r.guild_id, r.reason)
                for r in (await s.execute(select(ModerationAction).order_by(ModerationAction.id))).scalars()]


async def test_admin_settings_rate_limits_channels_notify_mode_and_reset(admin, repo):
    boss = Admin(user_id=1, guild_id=GUILD, can_manage_guild=True)
    text = await admin.set(boss, rate_limit_user=" 1 per minute ", max_images=4, private_results=False,
                           notify_mode="dm", automod=False, add_channel=3001)
    assert text == ("Changed: rate limit per user → 1 per minute, images per request at most → 4, private results "
                    "allowed → False, members told outcomes → dm, AutoMod rules applied to prompts → False, "
                    "/dalle works in <#3001>.")
    gs = await repo.get_guild_settings(GUILD)
    assert (gs.rate_limit_user, gs.max_images, gs.private_results, gs.notify_mode, gs.automod, gs.channel_ids) == (
        "1 per minute", 4, False, "dm", False, [3001])
    assert (await admin.set(boss, add_channel=3002, remove_channel=3001)).endswith(
        "/dalle works in <#3002>, /dalle no longer listed in <#3001>.")
    assert (await repo.get_guild_settings(GUILD)).channel_ids == [3002]
    shown = await admin.show(boss)
    assert shown["channel_ids"] == ([3002], True) and shown["notify_mode"] == ("dm", True)

    # bad input: a clear error, nothing changed, nothing audited
    before = await audit_rows(repo)
    for bad, match in (({"rate_limit_user": "lots"}, "not understood"), ({"rate_limit_guild": "5 per fortnight"},
                       "not understood"), ({"rate_limit_user": "0 per minute"}, "at least 1"),
                       ({"max_images": 10}, "between 1 and 9"), ({"max_images": 0}, "between"),
                       ({"notify_mode": "pigeon"}, "ephemeral"), ({"channel_ids": [1]}, "unknown"),
                       ({"add_channel": 5, "remove_channel": 5}, "added and removed")):
        with pytest.raises(ValueError, match=match):
            await admin.set(boss, **bad)
    assert await audit_rows(repo) == before
    assert (await repo.get_guild_settings(GUILD)).max_images == 4

    assert await admin.reset(boss, "max_images") == "images per request at most: back to the default."
    assert await admin.set(boss, any_channel=True) == "Changed: /dalle no longer listed in <#3002>, /dalle works in " \
                                                      "every channel."
    shown = await admin.show(boss)
    assert shown["max_images"] == (None, False) and shown["channel_ids"] == (None, False)
    with pytest.raises(ValueError, match="unknown setting"):
        await admin.reset(boss, "karma")
    with pytest.raises(NotAdmin):
        await admin.reset(Admin(user_id=2, guild_id=GUILD), "max_images")
    assert [r[3] for r in await audit_rows(repo)][-2:] == ["max_images=default", "channel_ids=+[] -[3002]"]
    assert all(r[0] == "settings" and r[1] == 1 and r[2] == GUILD for r in await audit_rows(repo))


async def test_admin_filter_terms_critical_categories_and_audit(admin, repo):
    boss = Admin(user_id=1, guild_id=GUILD, can_manage_guild=True)
    with pytest.raises(NotAdmin):
        await admin.filter_add(Admin(user_id=2, guild_id=GUILD), "cabbage")
    assert await admin.filter_add(boss, "  Cabbage  ") == "“Cabbage” is now blocked in this server's prompts."
    assert await admin.filter_add(boss, "cabbage") == "“cabbage” is blocked already."
    assert await admin.filter_allow(boss, "nude") == "“nude” is now allowed in this server's prompts."
    with pytest.raises(ValueError, match="block list: remove it there first"):
        await admin.filter_allow(boss, "CABBAGE")
    # the critical categories: refused, nothing stored, nothing audited
    for term, category in (("loli", "minors"), ("Child Porn", "minors"), ("nazi*", "hate"), ("n4zi", "hate"),
                           ("swastika", "hate")):
        with pytest.raises(ValueError, match=f"touches the {category} category, which no server can allow"):
            await admin.filter_allow(boss, term)
    for bad, match in (("   ", "empty"), ("x" * 61, "at most 60"), ("!!!", "no letters")):
        with pytest.raises(ValueError, match=match):
            await admin.filter_add(boss, bad)
    assert await admin.filter_list(boss) == (["Cabbage"], ["nude"])

    assert await admin.filter_remove(boss, "CABBAGE") == "“Cabbage” is off the block list."
    with pytest.raises(ValueError, match="on neither"):
        await admin.filter_remove(boss, "cabbage")
    assert await admin.filter_list(boss) == ([], ["nude"])
    assert await audit_rows(repo) == [("filter", 1, GUILD, "block +Cabbage"), ("filter", 1, GUILD, "allow +nude"),
                                      ("filter", 1, GUILD, "block -Cabbage")]


async def test_admin_list_edits_lose_nothing_when_concurrent(repo):
    import asyncio

    await asyncio.gather(*(repo.edit_guild_list(GUILD, "block_list", add=[f"t{i}"]) for i in range(8)))
    assert sorted((await repo.get_guild_settings(GUILD)).block_list) == sorted(f"t{i}" for i in range(8))
    _, added, removed = await repo.edit_guild_list(GUILD, "block_list", add=["t1", "new"], remove=["t2", "nope"])
    assert (added, removed) == (["new"], ["t2"])
    with pytest.raises(ValueError, match="not a list setting"):
        await repo.edit_guild_list(GUILD, "daily_quota", add=[1])


async def test_admin_model_show_is_the_engines_info(repo):
    from engine.api import EngineInfo

    async def info():
        return EngineInfo("demo-7", "native", "float32")

    service = AdminService(repo, guild_settings=repo.get_guild_settings, update_settings=repo.update_guild_settings,
                           engine_info=info)
    assert await service.model(Admin(user_id=1, guild_id=GUILD, can_manage_guild=True)) == EngineInfo(
        "demo-7", "native", "float32")
    with pytest.raises(NotAdmin):
        await service.model(Admin(user_id=2, guild_id=GUILD))


async def test_admin_settings_change_and_its_audit_row_are_one_transaction(admin, repo, monkeypatch):
    """A crash between the change and its audit row must not leave the change unaudited: neither is written."""
    import store.repo.guilds as guilds

    boss = Admin(user_id=1, guild_id=GUILD, can_manage_guild=True)
    await admin.set(boss, flagged_mode="spoiler", add_channel=3001)
    await admin.filter_add(boss, "gore")
    before = await audit_rows(repo)

    def crash(**_):
        raise RuntimeError("the process died while writing the audit row")

    monkeypatch.setattr(guilds, "ModerationAction", crash)
    for change in (lambda: admin.set(boss, flagged_mode="withhold", add_channel=3002),
                   lambda: admin.reset(boss, "channel_ids"), lambda: admin.filter_add(boss, "blood"),
                   lambda: admin.filter_remove(boss, "gore")):
        with pytest.raises(RuntimeError):
            await change()
    gs = await repo.get_guild_settings(GUILD)
    assert (gs.flagged_mode, gs.channel_ids, gs.block_list) == ("spoiler", [3001], ["gore"])
    assert await audit_rows(repo) == before
    monkeypatch.undo()
    assert "withhold" in await admin.set(boss, flagged_mode="withhold")
    assert (await audit_rows(repo))[-1] == ("settings", 1, GUILD, "flagged_mode=withhold")
