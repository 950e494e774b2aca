"""End to end: the real discord.py client (AutoShardedBot) against the strict loopback fake Discord — command
sync, ``/dalle`` and ``/dalle-queue``, refusals, fairness under a burst, the gateway, ``python -m bot``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from bench.fakes.discord import APP_ID
from store.models import Generation, Refusal
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import (
    CHANNEL,
    bot_process_ready,
    channel_posts,
    custom_ids,
    discord_settings,
    interaction_callback,
    start_bot,
)
from tests.fakes.engine import FakeEngine


async def test_dalle_defers_progresses_and_posts_result(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine(steps=3, step_s=0.05)
    run = await start_bot(discord_settings(tmp_path), engine, repo)
    try:
        assert [c["name"] for c in fake.commands] == ["dalle", "dalle-queue", "dalle-mod", "dalle-appeal",
                                                      "dalle-admin", "dalle-privacy"]
        assert fake.identifies and fake.identifies[0]["shard"] == [0, 1]  # AutoShardedBot
        rec = await fake.slash("dalle", {"prompt": "a red circle on a blue background", "images": 4, "seed": 7})
        cb = await interaction_callback(fake, rec)
        assert cb.json == {"type": 5} and cb.status == 200  # deferred FIRST, public
        assert cb.at - rec.dispatched_at < 3.0
        post = await fake.wait_for(channel_posts(fake))
        assert post.status == 200
        assert "a red circle on a blue background" in post.json["content"] and "seed `7`" in post.json["content"]
        names = list(post.files)
        assert names[0] == "grid.png" and len(names) == 5 and all(n.endswith(".png") for n in names)
        gen = (await rows_of(repo, Generation))[0]
        ids = [comp["custom_id"] for row in post.json["components"] for comp in row["components"]]
        assert f"dalle:reroll:{gen.id}" in ids
        assert sum(i.startswith("dalle:var:") for i in ids) == 4
        assert any(i.startswith("dalle:vote:up:") for i in ids) and any(i.startswith("dalle:report:") for i in ids)
        edits = [c for c in fake.calls_for("PATCH", f"/webhooks/{APP_ID}/{rec.token}/messages/")]
        texts = [e.json.get("content") for e in edits if e.json]
        assert any("Generating" in (t or "") for t in texts), texts
        assert texts[-1] == "Done: posted below."
        assert gen.status == "done"
        await asyncio.sleep(0.1)
        gen = await repo.get_generation(gen.id)
        assert gen.delivered_at is not None and gen.interaction_token is None
        assert fake.errors == []
    finally:
        if engine.gate is not None:
            engine.gate.set()
        await run.stop()
        await repo.close()


async def test_discord_guild_ids_sync_the_commands_to_each_guild_only(fake, bot_db_url, tmp_path):
    """DISCORD_GUILD_IDS: the commands are registered in each listed guild (where Discord shows them at once), not
    globally, and ``/dalle`` works in those guilds."""
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, DISCORD_GUILD_IDS="2000, 2001"), FakeEngine(), repo)
    try:
        assert sorted(fake.guild_commands) == [2000, 2001]
        for guild_id in (2000, 2001):
            assert [c["name"] for c in fake.guild_commands[guild_id]] == ["dalle", "dalle-queue", "dalle-mod",
                                                                          "dalle-appeal", "dalle-admin",
                                                                          "dalle-privacy"]
        assert fake.commands == [] and fake.calls_for("PUT", f"/applications/{APP_ID}/commands") == []
        await fake.slash("dalle", {"prompt": "a red circle", "images": 1}, user_id=5, guild_id=2000)
        post = await fake.wait_for(channel_posts(fake))
        assert post.status == 200 and "a red circle" in post.json["content"]
    finally:
        await run.stop()
        await repo.close()


async def test_rate_limit_and_filter_refusals(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, RATE_LIMIT_USER="1 per minute"), FakeEngine(), repo)
    try:
        await fake.slash("dalle", {"prompt": "a green square"}, user_id=21)
        await fake.wait_for(channel_posts(fake))
        rec = await fake.slash("dalle", {"prompt": "a green square"}, user_id=21)
        # a public request's refusal is for the user alone: an ephemeral follow-up; the public reply is deleted
        note = await fake.wait_for(lambda c: c.method == "POST" and c.path.endswith(rec.token))
        assert "too fast" in note.json["content"] and "Try again in" in note.json["content"]
        assert note.json["flags"] & 64
        await fake.wait_for(lambda c: c.method == "DELETE" and rec.token in c.path and "@original" in c.path)
        assert rec.original_message_id not in fake.messages
        assert not any(c.method == "PATCH" and rec.token in c.path for c in fake.calls)
        rec = await fake.slash("dalle", {"prompt": "a n.a.k.e.d person", "private": True}, user_id=22)
        cb = await interaction_callback(fake, rec)
        assert cb.json == {"type": 5, "data": {"flags": 64}}  # private → ephemeral defer
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "can't draw that" in edit.json["content"]
        reasons = sorted(r.reason.split(":")[0] for r in await rows_of(repo, Refusal))
        assert reasons == ["rate", "sexual"]
        assert len(fake.calls_for("POST", f"/channels/{CHANNEL}/messages")) == 1
    finally:
        await run.stop()
        await repo.close()


async def test_a_refusal_the_ephemeral_follow_up_cannot_carry_goes_in_the_public_reply(fake, bot_db_url, tmp_path):
    """If Discord refuses the ephemeral follow-up, the user still hears why: the public reply says it."""
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    fake.followup_error = (400, 50035, "Invalid Form Body")
    try:
        rec = await fake.slash("dalle", {"prompt": "a n.a.k.e.d person"}, user_id=23)
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "can't draw that" in edit.json["content"]
        assert "can't draw that" in fake.messages[rec.original_message_id]["content"]
    finally:
        await run.stop()
        await repo.close()


async def test_queue_command_and_cancel_button(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    run = await start_bot(discord_settings(tmp_path), engine, repo, service_overrides={"concurrency": 1})
    try:
        recs = [await fake.slash("dalle", {"prompt": f"a blue ball {k}"}, user_id=31) for k in range(3)]
        for r in recs:
            await fake.wait_for(lambda c, r=r: c.method == "PATCH" and r.token in c.path and
                                "Queued" in (c.json or {}).get("content", "") or
                                (c.method == "PATCH" and r.token in c.path and "Generating" in str(c.json)))
        q = await fake.slash("dalle-queue", {}, user_id=31)
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and q.token in c.path)
        lines = edit.json["content"].splitlines()
        assert len(lines) == 3 and "running" in lines[0] and "position 1" in lines[1] and "position 2" in lines[2]
        gens = sorted(await rows_of(repo, Generation), key=lambda g: g.id)
        last = gens[-1]
        ack = next(m for m in fake.messages.values() if f"dalle:cancel:{last.id}" in custom_ids(m))
        rec = await fake.click(ack, f"dalle:cancel:{last.id}", user_id=99)
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 6  # deferred, the queue message unchanged
        other = await fake.wait_for(lambda c: c.method == "POST" and rec.token in c.path and c is not cb)
        assert "Only a queued request of yours" in other.json["content"] and other.json["flags"] == 64
        rec = await fake.click(ack, f"dalle:cancel:{last.id}", user_id=31)
        cb = await interaction_callback(fake, rec)
        assert cb.json["type"] == 6
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert edit.json["content"] == "Cancelled." and edit.json["components"] == []
        assert (await repo.get_generation(last.id)).status == "cancelled"
        engine.gate.set()
        await fake.wait_count(channel_posts(fake), 2)
    finally:
        await run.stop()
        await repo.close()


def test_the_queue_listing_fits_one_message():
    """``/dalle-queue`` with many long, markdown-heavy prompts stays within Discord's 2000 characters and says how
    many it left out; a short queue is listed whole."""
    from bot.cogs.generate import queue_listing

    def job(k: int, prompt: str):
        return SimpleNamespace(id=k, prompt=prompt, status="queued"), k

    many = [job(k, "*_~`|>" * 30) for k in range(1, 41)]
    text = queue_listing(many)
    lines = text.splitlines()
    assert len(text) <= 2000 and lines[-1].startswith("…and ")
    assert len(lines) - 1 + int(lines[-1].split()[1]) == 40
    assert queue_listing(many[:3]).splitlines()[2].startswith("#3 · position 3 · ")
    assert len(queue_listing(many[:3]).splitlines()) == 3


async def test_fifty_users_at_once_all_served_fairly(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine(steps=1, step_s=0.0, concurrency=2)
    engine.gate = asyncio.Event()
    run = await start_bot(discord_settings(tmp_path, DEFAULT_IMAGES="1"), engine, repo)
    try:
        heavy = [await fake.slash("dalle", {"prompt": f"heavy {k}"}, user_id=500) for k in range(5)]
        for r in heavy:
            await interaction_callback(fake, r)
        for _ in range(200):  # the heavy user's jobs are all queued before anyone else arrives
            if len(await rows_of(repo, Generation)) == 5:
                break
            await asyncio.sleep(0.02)
        others = await asyncio.gather(*(fake.slash("dalle", {"prompt": f"user {u}"}, user_id=600 + u)
                                        for u in range(45)))
        cbs = await asyncio.gather(*(interaction_callback(fake, r) for r in others))
        assert all(c.status == 200 and c.at - r.dispatched_at < 3.0 for c, r in zip(cbs, others, strict=True))
        for _ in range(200):
            if len(await rows_of(repo, Generation)) == 50:
                break
            await asyncio.sleep(0.02)
        engine.gate.set()
        posts = await fake.wait_count(channel_posts(fake), 50, timeout=60)
        assert all(p.status == 200 for p in posts)
        order = [r.prompt for r in engine.submitted]
        assert len(order) == 50
        # the heavy user's last job runs after every other user's job: one turn per user per round
        heavy_idx = [i for i, p in enumerate(order) if p.startswith("heavy")]
        user_idx = [i for i, p in enumerate(order) if p.startswith("user")]
        assert max(heavy_idx) > max(user_idx) and sum(i < min(user_idx) for i in heavy_idx) <= 3
        assert fake.errors == []
    finally:
        if engine.gate is not None:
            engine.gate.set()
        await run.stop()
        await repo.close()


async def test_gateway_reconnect_resumes_and_commands_still_work(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, SYNC_COMMANDS="false"), FakeEngine(), repo)
    try:
        await fake.request_reconnect()
        for _ in range(200):
            if fake.resumes and fake.sockets:
                break
            await asyncio.sleep(0.02)
        assert fake.resumes and fake.resumes[0]["session_id"] == "session-1" and fake.resumes[0]["token"]
        assert len(fake.identifies) == 1  # resumed, not re-identified
        await asyncio.sleep(0.1)
        await fake.slash("dalle", {"prompt": "a small white boat", "images": 1}, user_id=70)
        post = await fake.wait_for(channel_posts(fake))
        assert post.status == 200 and "a small white boat" in post.json["content"]
    finally:
        await run.stop()
        await repo.close()


async def test_fake_enforces_the_ack_deadline_and_double_ack(fake):
    """The fake's own strictness: a late first response is 10062, a second one 40060."""
    import aiohttp

    fake.ack_deadline = 0.05
    payload = fake._interaction_base(2, 1, 2000, None)
    payload["data"] = {"id": "1", "name": "x", "type": 1}
    rec = await fake.send_interaction(payload)
    async with aiohttp.ClientSession() as s:
        url = f"{fake.api_base}/interactions/{rec.id}/{rec.token}/callback"
        await asyncio.sleep(0.1)
        async with s.post(url, json={"type": 5}) as r:
            assert r.status == 404 and (await r.json())["code"] == 10062
        fake.ack_deadline = 3.0
        async with s.post(url, json={"type": 5}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        async with s.post(url, json={"type": 5}) as r:
            assert r.status == 400 and (await r.json())["code"] == 40060
        async with s.get(f"{fake.api_base}/no/such/route") as r:
            assert r.status == 404
    assert [c.path for c in fake.unknown] == ["/no/such/route"]
    fake.unknown.clear()


async def test_python_m_bot_in_discord_mode_subprocess(fake, tmp_path):
    """``python -m bot`` with DISCORD_TOKEN against the fake (loopback DISCORD_API_BASE / DISCORD_GATEWAY_URL):
    sync, /dalle, result post, then SIGTERM shuts it down cleanly."""
    import os
    import signal
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env.update(
        DISCORD_TOKEN="fake-token", DISCORD_API_BASE=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url,
        SYNC_COMMANDS="true", DATABASE_URL=f"sqlite:///{tmp_path / 'sub.db'}", OUTPUT_DIR=str(tmp_path / "out"),
        DEFAULT_IMAGES="2", DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine",
        PYTHONPATH=os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(root)] if p),
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", env=env, cwd=tmp_path,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await bot_process_ready(fake)
        await fake.slash("dalle", {"prompt": "a red circle", "seed": 4}, user_id=90)
        post = await fake.wait_for(channel_posts(fake), timeout=30)
        assert post.status == 200 and "seed `4`" in post.json["content"] and len(post.files) == 3
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err, err.decode()[-4000:]
