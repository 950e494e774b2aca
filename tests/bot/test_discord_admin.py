"""End to end against the fake Discord: ``/dalle-admin settings show|set``. Hidden from members without Manage
Server by default, checked again for whoever runs it, audited, and in effect at once."""

from __future__ import annotations

from bench.fakes.discord import MEMBER_PERMISSIONS, MOD_ROLE_ID
from store.models import ModerationAction, ModerationCase
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import custom_ids, dalle_result, discord_settings, start_bot
from tests.fakes.engine import FakeEngine

MANAGE_GUILD = str(int(MEMBER_PERMISSIONS) | 1 << 5)


async def admin_command(fake, subcommand: str, *, user_id: int = 80, **kw) -> str:
    rec = await fake.slash("dalle-admin", {}, subcommand=subcommand, user_id=user_id, **kw)
    cb = await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{rec.id}/"))
    assert cb.json == {"type": 5, "data": {"flags": 64}}
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return edit.json["content"]


async def test_admin_settings_set_are_checked_audited_and_take_effect_at_once(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID="3100"), FakeEngine(), repo)
    try:
        [cmd] = [c for c in fake.commands if c["name"] == "dalle-admin"]
        assert int(cmd["default_member_permissions"]) == 1 << 5  # Manage Server

        text = await admin_command(fake, "settings set", channels={"review_channel": 3200})
        assert text == "Only this server's admins (Manage Server) can change its settings."
        assert await repo.get_guild_settings(2000) is None
        assert (await admin_command(fake, "settings show")).startswith("Only this server's admins")

        text = await admin_command(fake, "settings set", channels={"review_channel": 3200},
                                   role_options={"moderator_role": MOD_ROLE_ID}, permissions=MANAGE_GUILD)
        assert text == f"Changed: review channel → 3200, moderator role → {MOD_ROLE_ID}."
        shown = await admin_command(fake, "settings show", permissions=MANAGE_GUILD)
        assert "review channel: <#3200>" in shown and f"moderator role: <@&{MOD_ROLE_ID}>" in shown
        assert "flagged images: `spoiler` (default)" in shown
        assert (await admin_command(fake, "settings set", permissions=MANAGE_GUILD)).startswith("nothing to change")

        # at once: the next flagged image goes to the new channel, and the role's holders moderate it
        await dalle_result(fake, {"prompt": "an unsafe frog", "images": 1, "seed": 8}, 81)
        post = await fake.wait_for(lambda c: c.method == "POST" and c.path == "/channels/3200/messages")
        assert post.status == 200
        [case] = await rows_of(repo, ModerationCase)
        review = next(m for m in fake.messages.values() if m["channel_id"] == "3200")
        assert f"dalle:case:approve:{case.id}" in custom_ids(review)
        rec = await fake.click(review, f"dalle:case:approve:{case.id}", user_id=82, roles=[MOD_ROLE_ID])
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert edit.json["content"] == f"Case #{case.id} approved."
        audit = [(a.action, a.moderator_id, a.guild_id, a.reason) for a in await rows_of(repo, ModerationAction)]
        assert audit == [("settings", 80, 2000, f"moderator_role_id={MOD_ROLE_ID}, review_channel_id=3200"),
                         ("approve", 82, 2000, None)]
    finally:
        await run.stop()
        await repo.close()
