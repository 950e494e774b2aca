"""End to end against the fake Discord: ``/dalle-admin`` settings take effect at once (channels, private results,
max images, a per-guild rate limit), the guild's own filter terms, Discord AutoMod keyword rules applied to prompts,
the author's 🗑, and the notify mode (reporters told privately or by DM)."""

from __future__ import annotations

from bench.fakes.discord import MEMBER_PERMISSIONS
from store.models import Generation, Image, ModerationAction, ModerationCase
from tests.fakes.botkit import make_repo, rows_of, wait_delivered
from tests.fakes.discordkit import CHANNEL, custom_ids, dalle_result, discord_settings, start_bot
from tests.fakes.engine import FakeEngine

MANAGE_GUILD = str(int(MEMBER_PERMISSIONS) | 1 << 5)
MANAGE_MESSAGES = str(int(MEMBER_PERMISSIONS) | 1 << 13)
OTHER = 3001  # a second channel of the guild


async def admin(fake, subcommand: str, options: dict | None = None, *, channels: dict | None = None) -> str:
    """``/dalle-admin <subcommand>`` by a member with Manage Server; the bot's private answer."""
    rec = await fake.slash("dalle-admin", options or {}, subcommand=subcommand, user_id=80, channels=channels,
                           permissions=MANAGE_GUILD)
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return edit.json["content"]


async def refusal(fake, options: dict, *, user_id: int = 81, channel_id: int | None = None) -> str:
    """Send ``/dalle``; the private message that refuses it (an ephemeral follow-up, or the private reply's edit)."""
    rec = await fake.slash("dalle", options, user_id=user_id, channel_id=channel_id)
    told = await fake.wait_for(lambda c: rec.token in c.path and c.method in ("POST", "PATCH")
                               and "webhooks" in c.path)
    return told.json["content"]


async def test_admin_settings_take_effect_at_once(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        text = await admin(fake, "settings set", {"max_images": 2, "private_results": False,
                                                  "rate_limit_user": "2 per minute"}, channels={"add_channel": OTHER})
        assert text == ("Changed: rate limit per user → 2 per minute, images per request at most → 2, private "
                        f"results allowed → False, /dalle works in <#{OTHER}>.")
        shown = await admin(fake, "settings show")
        assert f"channels where /dalle works: <#{OTHER}>" in shown and "private results allowed: no" in shown

        # a channel not listed: refused with where to go, nothing queued
        assert await refusal(fake, {"prompt": "a cat"}) == (
            f"Image generation isn't available in this channel. Use it in <#{OTHER}>.")
        assert await refusal(fake, {"prompt": "a cat", "private": True}, channel_id=OTHER) == (
            "Private results are turned off in this server: ask again without `private`.")
        assert await rows_of(repo, Generation) == []

        # max images caps the grid: 4 asked, 2 drawn and posted
        await fake.slash("dalle", {"prompt": "a cat", "images": 4, "seed": 3}, user_id=81, channel_id=OTHER)
        post = await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/channels/{OTHER}/messages")
        [gen] = await rows_of(repo, Generation)
        assert gen.n_images == 2 and len(await rows_of(repo, Image)) == 2
        assert sorted(post.files) == sorted(["grid.png", *(f"v{k}-image{i.id}.png" for k, i in enumerate(
            sorted(await rows_of(repo, Image), key=lambda i: i.rank), 1))])
        # the guild's rate limit (2 per minute per member) applies: the third request is refused
        await fake.slash("dalle", {"prompt": "a dog", "images": 1}, user_id=81, channel_id=OTHER)  # second: allowed
        await fake.wait_count(lambda c: c.method == "POST" and c.path == f"/channels/{OTHER}/messages", 2)
        text = await refusal(fake, {"prompt": "a bird"}, channel_id=OTHER)
        assert text.startswith("You're sending requests too fast. Try again in")

        # back to anywhere: the first channel works again
        assert (await admin(fake, "settings set", {"any_channel": True})).endswith("/dalle works in every channel.")
        await fake.slash("dalle", {"prompt": "a fish", "seed": 1}, user_id=82)
        await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/channels/{CHANNEL}/messages")
        audit = [a.reason for a in await rows_of(repo, ModerationAction)]
        assert audit == [f"channel_ids=+[{OTHER}] -[], max_images=2, private_results=False, "
                         "rate_limit_user=2 per minute", f"channel_ids=+[] -[{OTHER}]"]
    finally:
        await run.stop()
        await repo.close()


async def test_admin_filter_terms_and_automod_rules_block_prompts(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        assert await admin(fake, "filter add", {"term": "cabbage"}) == "“cabbage” is now blocked in this server's " \
                                                                       "prompts."
        assert await refusal(fake, {"prompt": "a CABBAGE patch"}) == (
            "Sorry, I can't draw that: The prompt contains a blocked term (guild).")
        assert await admin(fake, "filter remove", {"term": "cabbage"}) == "“cabbage” is off the block list."
        await dalle_result(fake, {"prompt": "a cabbage patch", "images": 1, "seed": 2}, 81)  # unblocked at once
        assert await admin(fake, "filter allow", {"term": "loli"}) == (
            "“loli” touches the minors category, which no server can allow.")
        assert await admin(fake, "filter list") == ("**This server's own prompt filter** (on top of the bot's list)\n"
                                                    "Blocked: none\nAllowed: none")

        # AutoMod: the server's keyword rule blocks the prompt; settings show says it is applied
        await fake.automod_rule(2000, "no spoilers", keywords=["endgame*"], allow=["endgames of chess"])
        assert await refusal(fake, {"prompt": "an Endgame poster"}, user_id=82) == (
            "Sorry, I can't draw that: the prompt trips this server's AutoMod rule “no spoilers”.")
        assert "Discord AutoMod keyword rules: applied (1 keyword rule)" in await admin(fake, "settings show")
        # a rule added later is read again at once (AUTO_MODERATION_RULE_CREATE), not after the cache's minutes
        await fake.automod_rule(2000, "no fish", regexes=[r"\bfi+sh\b"])
        text = await refusal(fake, {"prompt": "a fiiish"}, user_id=83)
        assert text == "Sorry, I can't draw that: the prompt trips this server's AutoMod rule “no fish”."
        # turned off by the setting: applied no more, and settings show says why
        await admin(fake, "settings set", {"automod": False})
        await dalle_result(fake, {"prompt": "an endgame poster", "images": 1, "seed": 5}, 84)
        assert "Discord AutoMod keyword rules: not applied: turned off by the `automod` setting" in await admin(
            fake, "settings show")
        # without Manage Server the rules cannot be read: said so, prompts still served
        await admin(fake, "settings reset", {"setting": "automod"})
        fake.automod_forbidden.add(2000)
        run.bot.service.automod.invalidate(2000)
        assert "Discord AutoMod keyword rules: not available: missing permission (the bot needs Manage Server)" in \
            await admin(fake, "settings show")
        refused = [c.reason for c in await rows_of(repo, _refusal_model())]
        assert refused == ["guild: cabbage", "automod: endgame*", "automod: \\bfi+sh\\b"]
        actions = [(a.action, a.reason) for a in await rows_of(repo, ModerationAction)]
        assert actions[:2] == [("filter", "block +cabbage"), ("filter", "block -cabbage")]
    finally:
        await run.stop()
        await repo.close()


def _refusal_model():
    from store.models import Refusal

    return Refusal


async def test_admin_delete_button_by_author_only(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        public, _ = await dalle_result(fake, {"prompt": "a teapot", "images": 2, "seed": 9}, 81)
        [gen] = await rows_of(repo, Generation)
        await wait_delivered(repo, gen.id)
        assert f"dalle:delete:{gen.id}" in custom_ids(public)

        rec = await fake.click(public, f"dalle:delete:{gen.id}", user_id=99)  # not theirs, not a moderator
        told = await fake.wait_for(lambda c: c.method == "POST" and rec.token in c.path and "webhooks" in c.path)
        assert told.json["content"] == "Only the member who asked for these images (or a moderator) can delete them."
        assert told.json["flags"] & 64
        assert int(public["id"]) in fake.messages and len(await rows_of(repo, Image)) == 2
        assert await rows_of(repo, ModerationAction) == []

        rec = await fake.click(public, f"dalle:delete:{gen.id}", user_id=81)
        told = await fake.wait_for(lambda c: c.method == "POST" and rec.token in c.path and "webhooks" in c.path)
        assert told.json["content"] == "Deleted: the message and its images are gone."
        assert fake.calls_for("DELETE", f"/channels/{CHANNEL}/messages/{public['id']}")
        assert int(public["id"]) not in fake.messages
        assert await rows_of(repo, Generation) == [] and await rows_of(repo, Image) == []
        [audit] = await rows_of(repo, ModerationAction)
        assert (audit.action, audit.moderator_id, audit.target_user_id) == ("delete", 81, 81)
    finally:
        await run.stop()
        await repo.close()


async def test_admin_notify_mode_dm_or_ephemeral_for_reporters(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID="3100"), FakeEngine(), repo)
    try:
        for mode, seed in (("dm", 1), ("ephemeral", 2)):
            await admin(fake, "settings set", {"notify_mode": mode})
            public, _ = await dalle_result(fake, {"prompt": f"a vase {mode}", "images": 1, "seed": seed}, 81)
            image = max(await rows_of(repo, Image), key=lambda i: i.id)
            form = await fake.submit_modal(f"dalle:reportmodal:{image.id}", {"reason": "other"}, user_id=85,
                                           message=public)
            await fake.wait_for(lambda c, t=form.token: c.method == "PATCH" and t in c.path)
            case = max(await rows_of(repo, ModerationCase), key=lambda c: c.id)
            review = next(m for m in fake.messages.values() if m["channel_id"] == "3100"
                          and f"dalle:case:dismiss:{case.id}" in custom_ids(m))
            rec = await fake.click(review, f"dalle:case:dismiss:{case.id}", user_id=86, permissions=MANAGE_MESSAGES)
            await fake.wait_for(lambda c, t=rec.token: c.method == "PATCH" and t in c.path)
            if mode == "dm":
                told = await fake.wait_for(lambda c: c.method == "POST" and c.path == "/channels/50085/messages")
                assert not [c for c in fake.calls if c.method == "POST" and c.path.endswith(form.token)]
            else:
                told = await fake.wait_for(lambda c, t=form.token: c.method == "POST" and c.path.endswith(t))
                assert told.json["flags"] & 64
            assert "dismissed" in told.json["content"]
    finally:
        await run.stop()
        await repo.close()


async def test_admin_delete_button_on_a_private_result(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        await fake.slash("dalle", {"prompt": "a secret teapot", "images": 1, "seed": 4, "private": True}, user_id=81)
        await fake.wait_for(lambda c: c.method == "POST" and "webhooks" in c.path and c.files)  # the private result
        [gen] = await rows_of(repo, Generation)
        await wait_delivered(repo, gen.id)
        private = next(m for m in fake.messages.values() if m["attachments"] and m["flags"] & 64)
        rec = await fake.click(private, f"dalle:delete:{gen.id}", user_id=81)
        told = await fake.wait_for(lambda c: c.method == "POST" and rec.token in c.path and "webhooks" in c.path)
        assert told.json["content"] == "Deleted: the message and its images are gone."
        emptied = fake.messages[int(private["id"])]  # an ephemeral message cannot be deleted: it is emptied
        assert (emptied["content"], emptied["attachments"], emptied["components"]) == ("Deleted.", [], [])
        assert await rows_of(repo, Generation) == []
    finally:
        await run.stop()
        await repo.close()
