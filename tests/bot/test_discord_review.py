"""End to end against the fake Discord: the review channel. A flagged image and a report each make exactly one
review post carrying the image bytes; a second report joins it; Approve / Remove / Dismiss / Ban author by a
moderator do what they say and are audited; the same click by a non-moderator changes nothing; a guild ban
blocks the next ``/dalle`` and survives a restart."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

from bench.fakes.discord import MEMBER_PERMISSIONS, MOD_ROLE_ID
from store.models import Image, ModerationAction, ModerationCase
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import (
    CHANNEL,
    custom_ids,
    dalle_result,
    discord_settings,
    interaction_callback,
    start_bot,
)
from tests.fakes.engine import FakeEngine

REVIEW = 3100
MANAGE_MESSAGES = str(int(MEMBER_PERMISSIONS) | 1 << 13)


def review_posts(fake):
    return [c for c in fake.calls if c.method == "POST" and c.path == f"/channels/{REVIEW}/messages"]


def review_message(fake, case_id: int) -> dict:
    return next(m for m in fake.messages.values() if m["channel_id"] == str(REVIEW)
                and f"dalle:case:history:{case_id}" in custom_ids(m))


async def answer(fake, rec) -> str:
    """The text of the bot's private answer to a deferred click or form (its edit of the original response)."""
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return edit.json["content"]


async def start(fake, tmp_path, repo, **env):
    return await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW), **env), FakeEngine(), repo)


async def test_review_flagged_image_one_post_remove_by_moderator_only(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start(fake, tmp_path, repo)
    try:
        public, _ = await dalle_result(fake, {"prompt": "an unsafe cat", "images": 2, "seed": 3}, 11)
        post = await fake.wait_for(lambda c: c in review_posts(fake))
        [case] = await rows_of(repo, ModerationCase)
        flagged = next(im for im in await rows_of(repo, Image) if im.flagged)
        assert case.source == "auto" and case.image_id == flagged.id and case.guild_id == 2000
        # the image bytes themselves, as a spoiler; never a link to the public message's attachment
        assert post.files == {f"SPOILER_case{case.id}.png": Path(flagged.file_path).read_bytes()}
        embed = post.json["embeds"][0]
        fields = {f["name"]: f["value"] for f in embed["fields"]}
        assert "an unsafe cat" in embed["description"] and fields["Author"] == "<@11>" and fields["Seed"] == "`3`"
        assert "nsfw" in fields["Safety scores"] and fields["Model"] == "`fake-ckpt`"
        assert fields["Public message"].endswith(f"/2000/{CHANNEL}/{public['id']}")
        review = review_message(fake, case.id)
        assert custom_ids(review) == [f"dalle:case:{a}:{case.id}" for a in ("approve", "remove", "ban", "dismiss",
                                                                             "history")]
        assert any(f"image{flagged.id}" in a["filename"] for a in public["attachments"])

        # an ordinary member's click is refused and changes nothing
        rec = await fake.click(review, f"dalle:case:remove:{case.id}", user_id=12)
        assert "moderators" in await answer(fake, rec)
        assert (await repo.get_case(case.id)).status == "open" and await rows_of(repo, ModerationAction) == []
        assert not fake.calls_for("PATCH", f"/channels/{CHANNEL}/messages/")

        rec = await fake.click(review, f"dalle:case:remove:{case.id}", user_id=13, permissions=MANAGE_MESSAGES)
        assert await answer(fake, rec) == f"Case #{case.id} removed."
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path == f"/channels/{CHANNEL}/messages/"
                                   f"{public['id']}")
        assert edit.files and not any(f"image{flagged.id}" in name for name in edit.files)
        assert all(f"image{flagged.id}" not in a["filename"] for a in fake.messages[int(public["id"])]["attachments"])
        review_edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path.startswith(
            f"/channels/{REVIEW}/messages/"))
        assert "remove by <@13>" in str(review_edit.json["embeds"][0]["fields"])
        assert custom_ids(review_edit.json) == [f"dalle:case:ban:{case.id}", f"dalle:case:history:{case.id}"]
        [action] = await rows_of(repo, ModerationAction)
        assert (action.moderator_id, action.action, action.guild_id, action.case_id) == (13, "remove", 2000, case.id)
        assert (await repo.get_image(flagged.id)).hidden is True
        assert "1 image(s) removed by a moderator." in edit.json["content"]
        dm = await fake.wait_for(lambda c: c.path == "/channels/50011/messages")  # the author hears why
        assert "removed one of your images" in dm.json["content"]
        await asyncio.sleep(0.1)
        assert len(review_posts(fake)) == 1 and fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_review_reports_join_one_post_approve_by_role_and_reporters_told(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start(fake, tmp_path, repo)
    try:
        await run.bot.service.update_guild_settings(2000, moderator_role_id=MOD_ROLE_ID)
        public, _ = await dalle_result(fake, {"prompt": "a dog", "images": 2, "seed": 4}, 31)
        report = next(i for i in custom_ids(public) if i.startswith("dalle:report:"))
        image_id = int(report.rsplit(":", 1)[1])
        forms = []
        for user, reason in ((32, "bias"), (33, "quality")):
            rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": reason}, user_id=user,
                                          message=public)
            assert "moderator" in await answer(fake, rec)
            forms.append(rec)
        [case] = await rows_of(repo, ModerationCase)
        assert len(review_posts(fake)) == 1  # the second report joined the post
        joined = await fake.wait_for(lambda c: c.method == "PATCH" and c.path.startswith(f"/channels/{REVIEW}/"))
        fields = {f["name"]: f["value"] for f in joined.json["embeds"][0]["fields"]}
        assert "<@32>: bias" in fields["Reports (2)"] and "<@33>: quality" in fields["Reports (2)"]
        assert review_posts(fake)[0].files[f"SPOILER_case{case.id}.png"] == Path(
            (await repo.get_image(image_id)).file_path).read_bytes()

        review = copy.deepcopy(review_message(fake, case.id))  # as a second moderator's screen still shows it
        rec = await fake.click(review, f"dalle:case:approve:{case.id}", user_id=34, roles=[MOD_ROLE_ID])
        assert await answer(fake, rec) == f"Case #{case.id} approved."
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path == f"/channels/{CHANNEL}/messages/"
                                   f"{public['id']}")
        assert any(f"image{image_id}" in name for name in edit.files)  # approved: it stays in the result
        for form in forms:  # each reporter hears the outcome privately, on their own interaction
            told = await fake.wait_for(lambda c, t=form.token: c.method == "POST" and c.path.endswith(t))
            assert "approved" in told.json["content"] and told.json["flags"] & 64
        assert (await repo.get_case(case.id)).status == "approved"
        assert [(a.moderator_id, a.action) for a in await rows_of(repo, ModerationAction)] == [(34, "approve")]
        # a second moderator's late click changes nothing
        rec = await fake.click(review, f"dalle:case:dismiss:{case.id}", user_id=35, permissions=MANAGE_MESSAGES)
        assert "already closed" in await answer(fake, rec)
        assert len(await rows_of(repo, ModerationAction)) == 1 and fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_review_ban_author_blocks_dalle_and_survives_a_restart(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start(fake, tmp_path, repo)
    try:
        await dalle_result(fake, {"prompt": "an unsafe thing", "images": 1, "seed": 5}, 41)
        await fake.wait_for(lambda c: c in review_posts(fake))
        [case] = await rows_of(repo, ModerationCase)
        review = review_message(fake, case.id)

        rec = await fake.click(review, f"dalle:case:ban:{case.id}", user_id=42)  # no form for a member
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 4 and "moderators" in cb.json["data"]["content"]
        rec = await fake.submit_modal(f"dalle:banmodal:{case.id}", {"duration": "7d", "reason": "spam"},
                                      user_id=42, message=review)  # a forged form is checked again
        assert "moderators" in await answer(fake, rec)
        rec = await fake.click(review, f"dalle:case:ban:{case.id}", user_id=43, permissions=MANAGE_MESSAGES)
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 9 and cb.json["data"]["custom_id"] == f"dalle:banmodal:{case.id}"
        rec = await fake.submit_modal(f"dalle:banmodal:{case.id}", {"duration": "soon", "reason": "spam"},
                                      user_id=43, message=review, permissions=MANAGE_MESSAGES)
        assert "not understood" in await answer(fake, rec)
        assert await repo.active_guild_ban(2000, 41) is None
        rec = await fake.submit_modal(f"dalle:banmodal:{case.id}", {"duration": "7d", "reason": "spam"},
                                      user_id=43, message=review, permissions=MANAGE_MESSAGES)
        assert "<@41> is banned from generating here until" in await answer(fake, rec)

        async def refused(user_id: int) -> str:
            rec = await fake.slash("dalle", {"prompt": "a cat"}, user_id=user_id)
            note = await fake.wait_for(lambda c: c.method == "POST" and c.path.endswith(rec.token))
            return note.json["content"]

        text = await refused(41)
        assert text.startswith("You are banned from generating images in this server until ") and "spam" in text
        await run.stop()

        run = await start(fake, tmp_path, repo)  # the ban, the post and its buttons outlive the process
        assert (await refused(41)).startswith("You are banned")
        rec = await fake.click(review, f"dalle:case:history:{case.id}", user_id=43, permissions=MANAGE_MESSAGES)
        history = await answer(fake, rec)
        assert "History of <@41>" in history and "spam" in history and f"#{case.id} open" in history
        rec = await fake.click(review, f"dalle:case:dismiss:{case.id}", user_id=43, permissions=MANAGE_MESSAGES)
        assert await answer(fake, rec) == f"Case #{case.id} dismissed."
        assert len(review_posts(fake)) == 1
        actions = [(a.action, a.target_user_id) for a in await rows_of(repo, ModerationAction)]
        assert actions == [("ban", 41), ("dismiss", None)]
    finally:
        await run.stop()
        await repo.close()


async def test_review_a_missed_post_is_made_at_the_next_start_once_and_reporters_get_a_dm(fake, bot_db_url, tmp_path):
    """The review channel refuses the post (missing permissions): the case waits, unposted, and the next start posts
    it once. The reporter's interaction is gone after the restart, so the outcome reaches them by DM."""
    repo = make_repo(bot_db_url)
    fake.forbidden_channels.add(REVIEW)
    run = await start(fake, tmp_path, repo)
    try:
        public, _ = await dalle_result(fake, {"prompt": "an unsafe bird", "images": 1, "seed": 6}, 51)
        await fake.wait_for(lambda c: c.path == f"/channels/{REVIEW}/messages" and c.status == 403)
        image_id = int(next(i for i in custom_ids(public) if i.startswith("dalle:report:")).rsplit(":", 1)[1])
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "nsfw"}, user_id=52, message=public)
        assert "moderator" in await answer(fake, rec)
        [case] = await rows_of(repo, ModerationCase)
        assert case.review_message_id is None
        await run.stop()

        fake.forbidden_channels.clear()
        run = await start(fake, tmp_path, repo)
        await fake.wait_for(lambda c: c.path == f"/channels/{REVIEW}/messages" and c.status == 200)
        review = review_message(fake, case.id)
        assert (await repo.get_case(case.id)).review_message_id == int(review["id"])
        rec = await fake.click(review, f"dalle:case:remove:{case.id}", user_id=53, permissions=MANAGE_MESSAGES)
        assert await answer(fake, rec) == f"Case #{case.id} removed."
        told = await fake.wait_for(lambda c: c.path == "/channels/50052/messages")
        assert "removed" in told.json["content"]
        await run.stop()

        run = await start(fake, tmp_path, repo)  # nothing left to post
        await asyncio.sleep(0.2)
        assert len([c for c in review_posts(fake) if c.status == 200]) == 1
    finally:
        await run.stop()
        await repo.close()
