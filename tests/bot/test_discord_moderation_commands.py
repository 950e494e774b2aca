"""End to end against the fake Discord: ``/dalle-mod`` (cases, case, user, ban, unban). Hidden from ordinary
members by default and checked again by the service for whoever runs it."""

from __future__ import annotations

from bench.fakes.discord import MEMBER_PERMISSIONS, MOD_ROLE_ID
from store.models import ModerationAction
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import dalle_result, discord_settings, start_bot
from tests.fakes.engine import FakeEngine

MANAGE_MESSAGES = str(int(MEMBER_PERMISSIONS) | 1 << 13)


async def mod_command(fake, subcommand: str, options: dict, *, user_id: int = 60, users: dict | None = None,
                      **who) -> dict:
    """Run ``/dalle-mod <subcommand>`` and return the bot's private answer (the edit of its deferred reply)."""
    rec = await fake.slash("dalle-mod", options, subcommand=subcommand, users=users, user_id=user_id, **who)
    cb = await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{rec.id}/"))
    assert cb.json == {"type": 5, "data": {"flags": 64}}  # deferred privately, first
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return edit.json


async def test_moderation_commands_ban_unban_user_cases(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID="3100"), FakeEngine(), repo)
    try:
        [mod] = [c for c in fake.commands if c["name"] == "dalle-mod"]
        assert int(mod["default_member_permissions"]) == 1 << 13  # Manage Messages: members don't see it
        assert mod.get("contexts") == [0] or mod.get("dm_permission") is False  # guilds only
        assert {o["name"] for o in mod["options"]} == {"cases", "case", "user", "ban", "unban", "unblock", "blocklist",
                                                       "strikes", "purge", "web"}

        # an ordinary member (a server admin opened the command to everyone): refused, nothing recorded
        answer = await mod_command(fake, "ban", {"reason": "spam", "duration": "1d"}, users={"member": 71})
        assert "moderators" in answer["content"]
        assert await rows_of(repo, ModerationAction) == []

        answer = await mod_command(fake, "ban", {"reason": "spam", "duration": "1d"}, users={"member": 71},
                                   permissions=MANAGE_MESSAGES)
        assert answer["content"].startswith("<@71> is banned from generating here until")
        rec = await fake.slash("dalle", {"prompt": "a cat"}, user_id=71)
        note = await fake.wait_for(lambda c: c.method == "POST" and c.path.endswith(rec.token))
        assert note.json["content"].startswith("You are banned from generating images in this server until")

        await run.bot.service.update_guild_settings(2000, moderator_role_id=MOD_ROLE_ID)
        answer = await mod_command(fake, "user", {}, users={"member": 71}, roles=[MOD_ROLE_ID])
        assert "History of <@71>" in answer["content"] and "spam" in answer["content"]
        answer = await mod_command(fake, "unban", {}, users={"member": 71}, roles=[MOD_ROLE_ID])
        assert answer["content"] == "<@71> may generate here again."
        answer = await mod_command(fake, "unban", {}, users={"member": 71}, roles=[MOD_ROLE_ID])
        assert answer["content"] == "<@71> was not banned here."
        await dalle_result(fake, {"prompt": "an unsafe fish", "images": 1, "seed": 2}, 71)  # allowed again

        answer = await mod_command(fake, "cases", {}, roles=[MOD_ROLE_ID])
        assert answer["content"].startswith("**Open cases, oldest first**") and "· auto · open" in answer["content"]
        case_id = int(answer["content"].split("\n")[1].split(" ")[0][1:])
        answer = await mod_command(fake, "case", {"case_id": case_id}, roles=[MOD_ROLE_ID])
        assert answer["embeds"][0]["title"] == f"Case #{case_id} · auto · open"
        answer = await mod_command(fake, "case", {"case_id": 999}, roles=[MOD_ROLE_ID])
        assert answer["content"] == "Case #999 does not exist."
        actions = [(a.action, a.moderator_id, a.guild_id) for a in await rows_of(repo, ModerationAction)]
        assert actions == [("ban", 60, 2000), ("unban", 60, 2000), ("unban", 60, 2000)]
    finally:
        await run.stop()
        await repo.close()
