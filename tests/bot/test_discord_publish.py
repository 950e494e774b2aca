"""End to end against the fake Discord: how results reach the user (channel post, follow-up, DM), after a restart
or an expired token, within the interaction's upload limit."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from bench.fakes.discord import APP_ID
from bot.outcome import Outcome
from store.models import Generation
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import CHANNEL, channel_posts, discord_settings, interaction_callback, start_bot
from tests.fakes.engine import FakeEngine


async def test_restart_mid_queue_resumes_and_posts_every_result(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # the first process never finishes anything
    run = await start_bot(discord_settings(tmp_path), engine, repo, shutdown_grace=0.05)
    recs = [await fake.slash("dalle", {"prompt": f"a shape number {k}", "images": 1}, user_id=40 + k)
            for k in range(4)]
    for r in recs:
        await interaction_callback(fake, r)
    for _ in range(100):
        if len(await rows_of(repo, Generation)) == 4:
            break
        await asyncio.sleep(0.02)
    await run.stop()
    await engine.close()
    assert sorted(g.status for g in await rows_of(repo, Generation)) == ["queued"] * 4
    assert fake.calls_for("POST", f"/channels/{CHANNEL}/messages") == []

    engine2 = FakeEngine()
    run2 = await start_bot(discord_settings(tmp_path, SYNC_COMMANDS="false"), engine2, repo)
    try:
        assert sorted(run2.bot.resumed) == sorted(g.id for g in await rows_of(repo, Generation))
        posts = await fake.wait_count(channel_posts(fake), 4)
        contents = " ".join(p.json["content"] for p in posts)
        for k in range(4):
            assert f"a shape number {k}" in contents and f"<@{40 + k}>" in contents
        await asyncio.sleep(0.1)
        assert all(g.status == "done" and g.delivered_at for g in await rows_of(repo, Generation))
        assert len(fake.identifies) == 2
    finally:
        await run2.stop()
        await engine2.close()
        await repo.close()


async def test_expired_token_still_delivers_as_channel_message(fake, bot_db_url, tmp_path):
    fake.token_ttl = 0.3  # the interaction token dies while the job waits in the queue
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    run = await start_bot(discord_settings(tmp_path), engine, repo)
    try:
        rec = await fake.slash("dalle", {"prompt": "a lonely lighthouse", "images": 2}, user_id=80)
        await interaction_callback(fake, rec)
        await asyncio.sleep(0.5)
        engine.gate.set()
        post = await fake.wait_for(channel_posts(fake))
        assert post.status == 200 and "<@80>" in post.json["content"] and "grid.png" in post.files
        late = [c for c in fake.errors if rec.token in c.path]
        assert all(c.status == 401 for c in late)  # only best-effort ack edits were refused
        await asyncio.sleep(0.1)
        gen = (await rows_of(repo, Generation))[0]
        assert gen.status == "done" and gen.delivered_at is not None
    finally:
        if engine.gate is not None:
            engine.gate.set()
        await run.stop()
        await repo.close()


async def test_results_fit_the_interactions_attachment_limit(fake, bot_db_url, tmp_path):
    """Discord says per interaction how many bytes a message may carry (boost tier, context); a result larger than
    that is refused with 413. The bot sizes public posts and private follow-ups to the interaction's limit (the
    guild's default would be 10 MiB here), dropping what does not fit instead of losing the result."""
    fake.attachment_limit = 400  # the fake engine's 4 images + grid are ~550 bytes
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        await fake.slash("dalle", {"prompt": "a small public square", "images": 4}, user_id=91)
        post = await fake.wait_for(channel_posts(fake))
        assert post.status == 200, post.json
        assert 0 < sum(len(b) for b in post.files.values()) <= 400 and len(post.files) < 5
        rec = await fake.slash("dalle", {"prompt": "a small private square", "images": 4, "private": True},
                               user_id=92)
        follow = await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/webhooks/{APP_ID}/{rec.token}"
                                     and bool(c.files))
        assert follow.status == 200 and (follow.json.get("flags", 0) & 64)  # ephemeral, delivered
        assert sum(len(b) for b in follow.files.values()) <= 400 and len(follow.files) < 5
        await asyncio.sleep(0.1)
        gens = await rows_of(repo, Generation)
        assert {g.upload_limit for g in gens} == {400}
        assert all(g.status == "done" and g.delivered_at is not None for g in gens)
        assert [c for c in fake.errors if c.status == 413] == []
    finally:
        await run.stop()
        await repo.close()


async def test_private_result_after_the_token_expired_goes_to_a_dm(fake, bot_db_url, tmp_path):
    fake.token_ttl = 0.3
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    run = await start_bot(discord_settings(tmp_path), engine, repo)
    try:
        rec = await fake.slash("dalle", {"prompt": "a secret garden", "images": 2, "private": True}, user_id=93)
        await interaction_callback(fake, rec)
        await asyncio.sleep(0.5)
        engine.gate.set()
        dm = await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/channels/{50_000 + 93}/messages")
        assert dm.status == 200 and "a secret garden" in dm.json["content"] and "grid.png" in dm.files
        assert not fake.calls_for("POST", f"/channels/{CHANNEL}/messages")  # never in the public channel
        await asyncio.sleep(0.1)
        gen = (await rows_of(repo, Generation))[0]
        assert gen.status == "done" and gen.delivered_at is not None
    finally:
        engine.gate.set()
        await run.stop()
        await repo.close()


async def test_a_channel_that_refuses_the_bot_still_gets_the_result_as_a_follow_up(fake, bot_db_url, tmp_path):
    """No Send Messages permission (or an archived thread, an app-only context): the channel post is refused
    with 403, so the result goes out as the interaction's follow-up, which Discord accepts in any context."""
    fake.forbidden_channels.add(CHANNEL)
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        rec = await fake.slash("dalle", {"prompt": "a red circle", "images": 2}, user_id=77)
        follow = await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/webhooks/{APP_ID}/{rec.token}"
                                     and bool(c.files))
        assert follow.status == 200 and "a red circle" in follow.json["content"] and "grid.png" in follow.files
        assert not follow.json.get("flags", 0) & 64  # public, like the channel post would have been
        assert [c.status for c in fake.calls_for("POST", f"/channels/{CHANNEL}/messages")] == [403]
        await asyncio.sleep(0.1)
        gen = (await rows_of(repo, Generation))[0]
        assert gen.status == "done" and gen.delivered_at is not None
    finally:
        await run.stop()
        await repo.close()


async def test_prompt_mentions_do_not_ping_and_long_markdown_prompts_fit(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        await fake.slash("dalle", {"prompt": "a portrait of <@555> and @everyone", "images": 1}, user_id=78)
        post = await fake.wait_for(channel_posts(fake))
        assert post.status == 200 and post.json["content"].startswith("<@78>")
        allowed = post.json["allowed_mentions"]
        assert [str(u) for u in allowed["users"]] == ["78"]  # only the requester
        assert "users" not in allowed.get("parse", [])
        assert "everyone" not in allowed.get("parse", [])
        await fake.slash("dalle", {"prompt": "a" + "*" * 999, "images": 1}, user_id=79)
        posts = await fake.wait_count(channel_posts(fake), 2)
        assert posts[1].status == 200 and len(posts[1].json["content"]) <= 2000
        await asyncio.sleep(0.1)
        assert all(g.delivered_at is not None for g in await rows_of(repo, Generation))
    finally:
        await run.stop()
        await repo.close()


def test_a_result_whose_stored_images_are_missing_or_unreadable_still_posts():
    """Images whose files vanished (no png) or cannot be decoded: the grid is made of the readable ones, or left
    out, instead of failing the whole post (which would leave the result undelivered for good)."""
    import io as _io
    from pathlib import Path

    from PIL import Image as PILImage

    from bot.outcome import Outcome, StoredImage
    from bot.publish import DiscordPublisher

    buf = _io.BytesIO()
    PILImage.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="PNG")

    def image(k: int, png: bytes) -> StoredImage:
        return StoredImage(id=k, index=k, rank=k, path=Path(f"{k}.png"), sha256="", clip_score=0.0, flagged=False,
                           hidden=False, withheld=False, png=png)

    publisher = DiscordPublisher(bot=None)
    gen = SimpleNamespace(id=1)
    files, shown = publisher._files(Outcome(gen, [image(1, buf.getvalue()), image(2, b""), image(3, b"junk")]),
                                    8 * 1024 * 1024)
    assert [f.filename for f in files] == ["grid.png", "v1-image1.png", "v3-image3.png"] and len(shown) == 3
    files, shown = publisher._files(Outcome(gen, [image(1, b""), image(2, b"")]), 8 * 1024 * 1024)
    assert files == [] and len(shown) == 2
    files, _ = publisher._files(Outcome(gen, [image(3, b"junk")]), 8 * 1024 * 1024)
    assert [f.filename for f in files] == ["v1-image3.png"]


async def test_a_result_posted_again_by_another_process_returns_the_first_message(fake, bot_db_url, tmp_path):
    """Two bot processes on one database can both post a result when one of them stalls past its lease after
    posting and before recording it. The post carries the generation's nonce with ``enforce_nonce``, so Discord
    answers the second post with the first message and the channel shows the result once."""
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    run = await start_bot(discord_settings(tmp_path), engine, repo)
    try:
        rec = await fake.slash("dalle", {"prompt": "a green triangle", "images": 2}, user_id=81)
        await interaction_callback(fake, rec)
        first = await fake.wait_for(channel_posts(fake))
        for _ in range(100):
            gen = (await rows_of(repo, Generation))[0]
            if gen.delivered_at is not None:
                break
            await asyncio.sleep(0.02)
        assert first.json["enforce_nonce"] is True and first.json["nonce"] == f"result-{gen.id}"
        gen = await repo.get_generation(gen.id)
        leases = run.bot.service.leases
        again = await run.bot.service.publisher.publish(Outcome(gen, await leases._stored_images(gen)))
        assert again == gen.result_message_id
        posted = [m for m in fake.messages.values() if m["channel_id"] == str(CHANNEL) and m["attachments"]]
        assert len(posted) == 1 and int(posted[0]["id"]) == gen.result_message_id
        assert len(fake.calls_for("POST", f"/channels/{CHANNEL}/messages")) == 2  # both posts reached Discord
    finally:
        await run.stop()
        await engine.close()
        await repo.close()
