"""End to end against the fake Discord: the persistent buttons and the report form on result and queue messages."""

from __future__ import annotations

import asyncio

from store.models import Feedback, Generation, ModerationCase
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import (
    channel_posts,
    custom_ids,
    dalle_result,
    discord_settings,
    interaction_callback,
    start_bot,
)
from tests.fakes.engine import FakeEngine


async def test_buttons_and_report_modal(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        message, post = await dalle_result(fake, {"prompt": "a cat wearing a hat", "images": 2, "seed": 3}, 11)
        ids = custom_ids(message)
        up = next(i for i in ids if i.startswith("dalle:vote:up:"))
        image_id = int(up.rsplit(":", 1)[1])

        rec = await fake.click(message, up, user_id=12)
        cb = await interaction_callback(fake, rec)
        assert cb.json == {"type": 5, "data": {"flags": 64}}  # deferred before the database write
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "Thanks" in edit.json["content"]

        report = next(i for i in ids if i.startswith("dalle:report:"))
        rec = await fake.click(message, report, user_id=13)
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 9 and cb.json["data"]["custom_id"] == f"dalle:reportmodal:{image_id}"
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "Bias", "note": "all alike"},
                                      user_id=13, message=message)
        await interaction_callback(fake, rec)
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "moderator" in edit.json["content"]

        rec = await fake.click(message, next(i for i in ids if i.startswith("dalle:reroll:")), user_id=14)
        cb = await interaction_callback(fake, rec)
        assert cb.json == {"type": 5, "data": {"flags": 64}}
        var = next(i for i in ids if i.startswith("dalle:var:") and i.endswith(":2"))
        rec2 = await fake.click(message, var, user_id=15)
        await interaction_callback(fake, rec2)
        posts = await fake.wait_count(channel_posts(fake), 3)
        assert all(p.status == 200 for p in posts)
        gens = {g.user_id: g for g in await rows_of(repo, Generation)}
        assert gens[14].kind == "reroll" and gens[14].parent_generation_id == gens[11].id
        assert gens[15].kind == "variation" and gens[15].parent_image_id == int(var.split(":")[2])
        fb = sorted((f.user_id, f.kind, f.reason, f.note) for f in await rows_of(repo, Feedback))
        assert fb == [(12, "up", None, None), (13, "report", "bias", "all alike")]
        cases = await rows_of(repo, ModerationCase)
        assert [(c.source, c.image_id) for c in cases] == [("report", image_id)]
        assert post.status == 200 and fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_report_form_survives_a_restart_and_two_open_forms(fake, bot_db_url, tmp_path):
    """A form opened before a restart is recorded when submitted after it; two users with the same image's
    form open both count; a bad reason is answered, not recorded."""
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        message, _ = await dalle_result(fake, {"prompt": "a red star", "images": 1, "seed": 1}, 41)
        report = next(i for i in custom_ids(message) if i.startswith("dalle:report:"))
        image_id = int(report.rsplit(":", 1)[1])
        for user in (42, 43):
            cb = await interaction_callback(fake, await fake.click(message, report, user_id=user))
            assert cb.json["type"] == 9
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "quality"}, user_id=42,
                                      message=message)
        await interaction_callback(fake, rec)
        await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        await run.stop()

        run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)  # the bot restarts; 43's form is open
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "NSFW", "note": "see left"},
                                      user_id=43, message=message)
        await interaction_callback(fake, rec)
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "moderator" in edit.json["content"]
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "meh"}, user_id=44,
                                      message=message)
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 4 and "Please give one of" in cb.json["data"]["content"]
        fb = sorted((f.user_id, f.kind, f.reason, f.note) for f in await rows_of(repo, Feedback))
        assert fb == [(42, "report", "quality", None), (43, "report", "nsfw", "see left")]
        assert fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_a_button_whose_handler_fails_tells_the_user(fake, bot_db_url, tmp_path):
    """A deferred button ("thinking…") whose handler raises must still end with a message, not spin forever."""
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        message, _ = await dalle_result(fake, {"prompt": "a cat", "images": 2, "seed": 3}, 15)

        async def broken(*args, **kwargs):
            raise RuntimeError("database is locked")

        run.bot.service.variation = broken
        run.bot.service.feedback = broken
        rec = await fake.click(message, next(i for i in custom_ids(message) if i.startswith("dalle:var:")),
                               user_id=16)
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 5  # deferred: the user sees "thinking…"
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert edit.json["content"].startswith("Sorry, that did not work")
        up = next(i for i in custom_ids(message) if i.startswith("dalle:vote:up:"))
        rec = await fake.click(message, up, user_id=16)
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 5
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert edit.json["content"].startswith("Sorry, that did not work")
        # Cancel defers without changing the queue message: its failure is a private follow-up, not an edit
        run.bot.service.cancel = broken
        gen = (await rows_of(repo, Generation))[0]
        queued = {**message, "attachments": [], "components": [{"type": 1, "components": [
            {"type": 2, "style": 2, "label": "Cancel", "custom_id": f"dalle:cancel:{gen.id}"}]}]}
        rec = await fake.click(queued, f"dalle:cancel:{gen.id}", user_id=15)  # as from a queue message
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 6
        sorry = await fake.wait_for(lambda c: c.method == "POST" and rec.token in c.path and c is not cb)
        assert sorry.json["content"].startswith("Sorry, that did not work") and sorry.json["flags"] == 64
        assert not any(c.method == "PATCH" and rec.token in c.path for c in fake.calls)
    finally:
        await run.stop()
        await repo.close()


async def test_a_failed_ack_record_does_not_tell_the_user_to_retry_a_queued_job(fake, bot_db_url, tmp_path):
    """Recording the acknowledgement's message id fails (a database hiccup) after the job was queued: the user
    still sees "Queued" (no "Something went wrong" that would make them submit it twice) and gets the result."""
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    run = await start_bot(discord_settings(tmp_path), engine, repo, service_overrides={"concurrency": 1})
    try:
        async def broken(*args, **kwargs):
            raise RuntimeError("database is locked")

        run.bot.service.record_ack = broken
        await fake.slash("dalle", {"prompt": "a busy cat"}, user_id=17)  # holds the one worker
        rec = await fake.slash("dalle", {"prompt": "a queued dog"}, user_id=18)
        ack = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path
                                  and "Queued" in (c.json or {}).get("content", ""))
        assert "position 1" in ack.json["content"]
        engine.gate.set()
        await fake.wait_count(channel_posts(fake), 2)
        assert not any(rec.token in c.path and "went wrong" in str(c.json) for c in fake.calls)
        assert len(await rows_of(repo, Generation)) == 2
    finally:
        await run.stop()
        await repo.close()
