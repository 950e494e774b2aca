"""End to end against the fake Discord: a reported result whose author presses 🗑. The public message goes, but
the report's case stays open for the moderators (the message's delete event no longer closes it) and its rows and
files stay as evidence; once a moderator removes, approves or dismisses it, the rows and files go. Remove still
strikes the author and blocks the image's hash."""

from __future__ import annotations

import asyncio
import os

from store.models import Generation, Image, ModerationAction, ModerationCase, Strike
from tests.bot.test_discord_moderation_commands import MANAGE_MESSAGES
from tests.bot.test_discord_review import REVIEW, answer, review_message, review_posts
from tests.bot.test_discord_review_blocklist import result_post
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import CHANNEL, custom_ids, discord_settings, start_bot
from tests.fakes.engine import FakeEngine

AUTHOR, REPORTER, MOD = 71, 72, 13


async def test_review_author_deleting_a_reported_result_leaves_the_case_to_moderators(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW)), FakeEngine(patterned=True), repo)
    try:
        rounds = []  # all posted first: SQLite would give a deleted generation's id to the next one
        for seed, action in ((5, "remove"), (6, "approve"), (7, "dismiss")):
            public = await result_post(fake, {"prompt": f"a checkered cat {seed}", "images": 2, "seed": seed}, AUTHOR)
            gen = max(await rows_of(repo, Generation), key=lambda g: g.id)
            images = [im for im in await rows_of(repo, Image) if im.generation_id == gen.id]
            reported = int(next(i for i in custom_ids(public) if i.startswith("dalle:report:")).rsplit(":", 1)[1])
            posts = len(review_posts(fake))
            rec = await fake.submit_modal(f"dalle:reportmodal:{reported}", {"reason": "nsfw"}, user_id=REPORTER,
                                          message=public)
            assert "moderator" in await answer(fake, rec)
            await fake.wait_count(lambda c: c in review_posts(fake), posts + 1)
            case = max(await rows_of(repo, ModerationCase), key=lambda c: c.id)
            assert (case.image_id, case.status) == (reported, "open")
            rounds.append((public, gen, images, case, action))

        for public, gen, images, case, action in rounds:
            # the author presses 🗑: the message goes, the case and its evidence stay
            rec = await fake.click(public, f"dalle:delete:{gen.id}", user_id=AUTHOR)
            told = await fake.wait_for(lambda c, t=rec.token: c.method == "POST" and t in c.path
                                       and "webhooks" in c.path)
            assert told.json["content"].startswith("Deleted from the channel. Moderators are reviewing a report")
            assert fake.calls_for("DELETE", f"/channels/{CHANNEL}/messages/{public['id']}")
            assert int(public["id"]) not in fake.messages
            await asyncio.sleep(0.5)  # the gateway's MESSAGE_DELETE reaches the bot
            assert (await repo.get_case(case.id)).status == "open"
            kept = await repo.get_generation(gen.id)
            assert kept is not None and kept.deleted_at is not None and len(kept.images) == 2
            assert all(os.path.exists(im.file_path) for im in images)
            assert not [a for a in await rows_of(repo, ModerationAction) if a.action == "close"]

            # a moderator decides: the decision stands, and now the rows and files go
            rec = await fake.click(review_message(fake, case.id), f"dalle:case:{action}:{case.id}", user_id=MOD,
                                   permissions=MANAGE_MESSAGES)
            word = {"remove": "removed", "approve": "approved", "dismiss": "dismissed"}[action]
            assert await answer(fake, rec) == f"Case #{case.id} {word}."
            assert await repo.get_generation(gen.id) is None
            assert not [im for im in await rows_of(repo, Image) if im.generation_id == gen.id]
            assert not any(os.path.exists(im.file_path) for im in images)
            decided = await repo.get_case(case.id)
            assert decided.status == word
            assert [a.action for a in decided.actions] == [action] + (["block"] if action == "remove" else [])
        [strike] = await rows_of(repo, Strike)  # Remove struck the author before the rows went
        assert (strike.user_id, strike.source) == (AUTHOR, "removal")
        assert len(await repo.active_blocks(2000)) == 1
        assert fake.errors == []
    finally:
        await run.stop()
        await repo.close()
