"""End to end against the fake Discord: the image-hash blocklist and the review queue's upkeep. A removed image's
hash is blocked; a later generation drawing the same picture has it withheld with exactly one review post; a
moderator's ``/dalle-mod unblock`` (with the near-copy's case) lifts the block and ``/dalle-mod blocklist`` shows
it. An old open case is re-pinged once; deleting a result message closes its open cases."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import update

from bench.fakes.discord import MEMBER_PERMISSIONS, MOD_ROLE_ID
from store.models import Image, ModerationAction, ModerationCase
from tests.bot.test_discord_moderation_commands import MANAGE_MESSAGES, mod_command
from tests.bot.test_discord_review import REVIEW, answer, review_message, review_posts
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import CHANNEL, channel_posts, custom_ids, discord_settings, start_bot
from tests.fakes.engine import FakeEngine

MANAGE_GUILD = str(int(MEMBER_PERMISSIONS) | 1 << 5)


async def result_post(fake, options: dict, user_id: int) -> dict:
    """Send ``/dalle`` and return the channel message of its result (the next result post)."""
    before = len([c for c in fake.calls if channel_posts(fake)(c)])
    await fake.slash("dalle", options, user_id=user_id)
    await fake.wait_count(channel_posts(fake), before + 1)
    return next(m for m in reversed(list(fake.messages.values()))
                if m["channel_id"] == str(CHANNEL) and m["attachments"] and "webhook_id" not in m)


def shown_images(message: dict) -> set[int]:
    return {int(a["filename"].split("image")[1].split(".")[0]) for a in message["attachments"]
            if "image" in a["filename"]}


async def test_review_blocked_hash_withholds_a_redraw_once_and_unblock_lifts_it(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW)), FakeEngine(patterned=True), repo)
    try:
        public = await result_post(fake, {"prompt": "a checkered cat", "images": 2, "seed": 5}, 61)
        image_id = int(next(i for i in custom_ids(public) if i.startswith("dalle:report:")).rsplit(":", 1)[1])
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "nsfw"}, user_id=62, message=public)
        assert "moderator" in await answer(fake, rec)
        [case] = await rows_of(repo, ModerationCase)
        await fake.wait_for(lambda c: c in review_posts(fake))
        rec = await fake.click(review_message(fake, case.id), f"dalle:case:remove:{case.id}", user_id=13,
                               permissions=MANAGE_MESSAGES)
        assert await answer(fake, rec) == f"Case #{case.id} removed."
        removed = await repo.get_image(image_id)
        [block] = await repo.active_blocks(2000)
        assert (block.phash, block.case_id, block.guild_id) == (removed.phash, case.id, 2000)

        # another member draws the same picture (same seed, another prompt): withheld, one review post
        posts = len(review_posts(fake))
        redraw = await result_post(fake, {"prompt": "a tiled dog", "images": 2, "seed": 5}, 63)
        await fake.wait_count(lambda c: c in review_posts(fake), posts + 1)
        await asyncio.sleep(0.3)
        assert len(review_posts(fake)) == posts + 1
        rows = {im.index: im for im in await rows_of(repo, Image) if im.generation_id != removed.generation_id}
        twin = rows[removed.index]
        assert twin.phash == removed.phash and twin.hidden and not twin.flagged
        assert twin.id not in shown_images(redraw) and rows[1 - removed.index].id in shown_images(redraw)
        assert "1 image(s) withheld" in redraw["content"]
        [blocked_case] = [c for c in await rows_of(repo, ModerationCase) if c.source == "blocklist"]
        assert blocked_case.image_id == twin.id and f"blocked image hash #{block.id}" in blocked_case.reason
        post = review_posts(fake)[-1]
        assert post.json["embeds"][0]["title"] == f"Case #{blocked_case.id} · blocklist · open"
        assert post.files  # the withheld image itself, for the moderators

        listing = await mod_command(fake, "blocklist", {}, permissions=MANAGE_MESSAGES)
        assert f"#{block.id} `{block.phash}`" in listing["content"] and f"case #{case.id}" in listing["content"]
        refused = await mod_command(fake, "unblock", {"case_id": blocked_case.id}, user_id=64)
        assert "moderators" in refused["content"] and len(await repo.active_blocks(2000)) == 1
        await run.bot.service.update_guild_settings(2000, moderator_role_id=MOD_ROLE_ID)
        lifted = await mod_command(fake, "unblock", {"case_id": blocked_case.id, "reason": "a harmless pattern"},
                                   roles=[MOD_ROLE_ID])
        assert lifted["content"].startswith(f"Unblocked 1 image hash(es) (#{block.id})")
        assert (await mod_command(fake, "blocklist", {}, roles=[MOD_ROLE_ID]))["content"] == \
            "No image hashes are blocked."
        audit = [(a.action, a.case_id) for a in await rows_of(repo, ModerationAction)]
        assert audit == [("remove", case.id), ("block", case.id), ("unblock", blocked_case.id)]

        posts = len(review_posts(fake))
        again = await result_post(fake, {"prompt": "a tiled bird", "images": 2, "seed": 5}, 65)
        await asyncio.sleep(0.3)
        assert len(shown_images(again)) == 2 and "withheld" not in again["content"]
        assert len(review_posts(fake)) == posts and fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_review_old_case_repinged_once_and_deleted_result_closes_its_case(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    settings = discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW), CASE_UPKEEP_SECONDS="1")
    run = await start_bot(settings, FakeEngine(patterned=True), repo)
    try:
        # the server's admin: re-ping after one hour (the default is 24), pinging the moderator role
        rec = await fake.slash("dalle-admin", {"reping_hours": 1}, subcommand="settings set", user_id=80,
                               role_options={"moderator_role": MOD_ROLE_ID}, permissions=MANAGE_GUILD)
        changed = await answer(fake, rec)
        assert "hours before an open case is re-pinged (0: never) → 1" in changed
        public = await result_post(fake, {"prompt": "an unsafe checker", "images": 2, "seed": 8}, 71)
        await fake.wait_for(lambda c: c in review_posts(fake))
        [case] = await rows_of(repo, ModerationCase)
        async with repo.sessions.begin() as s:  # the case has waited two hours
            await s.execute(update(ModerationCase).where(ModerationCase.id == case.id).values(
                opened_at=repo.now() - timedelta(hours=2)))

        def repings(c):
            return c in review_posts(fake) and "waited" in ((c.json or {}).get("content") or "")
        ping = await fake.wait_for(repings, timeout=10)
        assert ping.json["content"] == f"<@&{MOD_ROLE_ID}> Case #{case.id} (auto) has waited 2 h for a decision."
        assert ping.json["allowed_mentions"]["roles"] == [MOD_ROLE_ID]
        review = review_message(fake, case.id)
        assert str(ping.json["message_reference"]["message_id"]) == review["id"]  # a reply to the case's post
        await asyncio.sleep(2.5)  # two more upkeep passes
        assert len([c for c in fake.calls if repings(c)]) == 1
        assert (await repo.get_case(case.id)).repinged_at is not None

        await fake.delete_message(int(public["id"]))  # a member with Manage Messages deletes the result
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path == f"/channels/{REVIEW}/messages/"
                                   f"{review['id']}" and "closed" in c.json["embeds"][0]["title"])
        embed = edit.json["embeds"][0]
        assert embed["title"] == f"Case #{case.id} · auto · closed"
        fields = {f["name"]: f["value"] for f in embed["fields"]}
        assert fields["Closed by the bot"] == "public message deleted"
        assert fields["Actions"].startswith("close by the bot")
        assert custom_ids(edit.json) == [f"dalle:case:ban:{case.id}", f"dalle:case:history:{case.id}"]
        closed = await repo.get_case(case.id)
        assert (closed.status, closed.note) == ("closed", "public message deleted")
        actions = [(a.action, a.moderator_id, a.case_id) for a in await rows_of(repo, ModerationAction)]
        assert actions == [("settings", 80, None), ("close", 0, case.id)]
        assert fake.errors == []
    finally:
        await run.stop()
        await repo.close()
