"""End to end: the real discord.py client (AutoShardedBot) against the strict loopback fake Discord."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import discord
import pytest
import yarl
from sqlalchemy import select

from bench.fakes.discord import APP_ID, FakeDiscord
from bot.app import create_bot
from store.models import Feedback, Generation, ModerationCase, Refusal
from tests.fakes.botkit import create_schema, make_repo, sqlite_url
from tests.fakes.engine import FakeEngine

CHANNEL = 3000


@pytest.fixture
async def fake(monkeypatch):
    fd = await FakeDiscord().start()
    monkeypatch.setattr(discord.http.Route, "BASE", fd.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fd.gateway_url))
    yield fd
    await fd.close()
    assert fd.unknown == [], [(c.method, c.path) for c in fd.unknown]


@pytest.fixture
def db_url(tmp_path):
    url = sqlite_url(tmp_path)
    create_schema(url)
    return url


def _settings(tmp_path, **kw) -> SimpleNamespace:
    base = dict(sync_commands=True, output_dir=str(tmp_path / "out"), rate_limit_user="100 per minute",
                rate_limit_guild="1000 per minute", daily_quota=None, default_images=4, max_queue_per_user=5)
    base.update(kw)
    return SimpleNamespace(**base)


class Running:
    def __init__(self, bot, task):
        self.bot, self.task = bot, task

    async def stop(self):
        await self.bot.close()
        await asyncio.wait_for(self.task, 10)


async def start_bot(settings, engine, repo, **kw) -> Running:
    bot = create_bot(settings, engine, repo=repo, guild_ready_timeout=0.05, progress_interval=0.0, **kw)
    ready = asyncio.Event()

    async def on_ready():
        ready.set()

    bot.add_listener(on_ready, "on_ready")
    task = asyncio.create_task(bot.start("fake-token"))
    await asyncio.wait_for(ready.wait(), 30)  # generous: a loaded CI machine is slow to connect
    return Running(bot, task)


def _posts(fake: FakeDiscord):
    return lambda c: c.method == "POST" and c.path == f"/channels/{CHANNEL}/messages"


def _custom_ids(message: dict) -> list[str]:
    return [comp["custom_id"] for row in message.get("components", []) for comp in row["components"]]


async def _rows(repo, model):
    async with repo.sessions() as s:
        return list((await s.execute(select(model))).scalars())


async def _dalle_result(fake: FakeDiscord, options: dict, user_id: int) -> tuple[dict, object]:
    """Send ``/dalle``, wait for the result post; returns the posted channel message and the POST call."""
    await fake.slash("dalle", options, user_id=user_id)
    post = await fake.wait_for(_posts(fake))
    message = next(m for m in fake.messages.values() if m["attachments"] and m["channel_id"] == str(CHANNEL))
    return message, post


async def _callback(fake: FakeDiscord, rec):
    return await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{rec.id}/") and c.method == "POST")


async def test_dalle_defers_progresses_and_posts_result(fake, db_url, tmp_path):
    repo = make_repo(db_url)
    engine = FakeEngine(steps=3, step_s=0.05)
    run = await start_bot(_settings(tmp_path), engine, repo)
    try:
        assert [c["name"] for c in fake.commands] == ["dalle", "dalle-queue"]
        assert fake.identifies and fake.identifies[0]["shard"] == [0, 1]  # AutoShardedBot
        rec = await fake.slash("dalle", {"prompt": "a red circle on a blue background", "images": 4, "seed": 7})
        cb = await _callback(fake, rec)
        assert cb.json == {"type": 5} and cb.status == 200  # deferred FIRST, public
        assert cb.at - rec.dispatched_at < 3.0
        post = await fake.wait_for(_posts(fake))
        assert post.status == 200
        assert "a red circle on a blue background" in post.json["content"] and "seed `7`" in post.json["content"]
        names = list(post.files)
        assert names[0] == "grid.png" and len(names) == 5 and all(n.endswith(".png") for n in names)
        gen = (await _rows(repo, Generation))[0]
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


async def test_buttons_and_report_modal(fake, db_url, tmp_path):
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path), FakeEngine(), repo)
    try:
        message, post = await _dalle_result(fake, {"prompt": "a cat wearing a hat", "images": 2, "seed": 3}, 11)
        ids = _custom_ids(message)
        up = next(i for i in ids if i.startswith("dalle:vote:up:"))
        image_id = int(up.rsplit(":", 1)[1])

        rec = await fake.click(message, up, user_id=12)
        cb = await _callback(fake, rec)
        assert cb.json == {"type": 5, "data": {"flags": 64}}  # deferred before the database write
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "Thanks" in edit.json["content"]

        report = next(i for i in ids if i.startswith("dalle:report:"))
        rec = await fake.click(message, report, user_id=13)
        cb = await _callback(fake, rec)
        assert cb.json["type"] == 9 and cb.json["data"]["custom_id"] == f"dalle:reportmodal:{image_id}"
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "Bias", "note": "all alike"},
                                      user_id=13, message=message)
        await _callback(fake, rec)
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "moderator" in edit.json["content"]

        rec = await fake.click(message, next(i for i in ids if i.startswith("dalle:reroll:")), user_id=14)
        cb = await _callback(fake, rec)
        assert cb.json == {"type": 5, "data": {"flags": 64}}
        var = next(i for i in ids if i.startswith("dalle:var:") and i.endswith(":2"))
        rec2 = await fake.click(message, var, user_id=15)
        await _callback(fake, rec2)
        posts = await fake.wait_count(_posts(fake), 3)
        assert all(p.status == 200 for p in posts)
        gens = {g.user_id: g for g in await _rows(repo, Generation)}
        assert gens[14].kind == "reroll" and gens[14].parent_generation_id == gens[11].id
        assert gens[15].kind == "variation" and gens[15].parent_image_id == int(var.split(":")[2])
        fb = sorted((f.user_id, f.kind, f.reason, f.note) for f in await _rows(repo, Feedback))
        assert fb == [(12, "up", None, None), (13, "report", "bias", "all alike")]
        cases = await _rows(repo, ModerationCase)
        assert [(c.source, c.image_id) for c in cases] == [("report", image_id)]
        assert post.status == 200 and fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_report_form_survives_a_restart_and_two_open_forms(fake, db_url, tmp_path):
    """A form opened before a restart is recorded when submitted after it; two users with the same image's
    form open both count; a bad reason is answered, not recorded."""
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path), FakeEngine(), repo)
    try:
        message, _ = await _dalle_result(fake, {"prompt": "a red star", "images": 1, "seed": 1}, 41)
        report = next(i for i in _custom_ids(message) if i.startswith("dalle:report:"))
        image_id = int(report.rsplit(":", 1)[1])
        for user in (42, 43):
            cb = await _callback(fake, await fake.click(message, report, user_id=user))
            assert cb.json["type"] == 9
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "quality"}, user_id=42,
                                      message=message)
        await _callback(fake, rec)
        await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        await run.stop()

        run = await start_bot(_settings(tmp_path), FakeEngine(), repo)  # the bot restarts; 43's form is open
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "NSFW", "note": "see left"},
                                      user_id=43, message=message)
        await _callback(fake, rec)
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "moderator" in edit.json["content"]
        rec = await fake.submit_modal(f"dalle:reportmodal:{image_id}", {"reason": "meh"}, user_id=44,
                                      message=message)
        cb = await _callback(fake, rec)
        assert cb.json["type"] == 4 and "Please give one of" in cb.json["data"]["content"]
        fb = sorted((f.user_id, f.kind, f.reason, f.note) for f in await _rows(repo, Feedback))
        assert fb == [(42, "report", "quality", None), (43, "report", "nsfw", "see left")]
        assert fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_rate_limit_and_filter_refusals(fake, db_url, tmp_path):
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path, rate_limit_user="1 per minute"), FakeEngine(), repo)
    try:
        await fake.slash("dalle", {"prompt": "a green square"}, user_id=21)
        await fake.wait_for(_posts(fake))
        rec = await fake.slash("dalle", {"prompt": "a green square"}, user_id=21)
        # a public request's refusal is for the user alone: an ephemeral follow-up; the public reply is deleted
        note = await fake.wait_for(lambda c: c.method == "POST" and c.path.endswith(rec.token))
        assert "too fast" in note.json["content"] and "Try again in" in note.json["content"]
        assert note.json["flags"] & 64
        await fake.wait_for(lambda c: c.method == "DELETE" and rec.token in c.path and "@original" in c.path)
        assert rec.original_message_id not in fake.messages
        assert not any(c.method == "PATCH" and rec.token in c.path for c in fake.calls)
        rec = await fake.slash("dalle", {"prompt": "a n.a.k.e.d person", "private": True}, user_id=22)
        cb = await _callback(fake, rec)
        assert cb.json == {"type": 5, "data": {"flags": 64}}  # private → ephemeral defer
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "can't draw that" in edit.json["content"]
        reasons = sorted(r.reason.split(":")[0] for r in await _rows(repo, Refusal))
        assert reasons == ["rate", "sexual"]
        assert len(fake.calls_for("POST", f"/channels/{CHANNEL}/messages")) == 1
    finally:
        await run.stop()
        await repo.close()


async def test_a_refusal_the_ephemeral_follow_up_cannot_carry_goes_in_the_public_reply(fake, db_url, tmp_path):
    """If Discord refuses the ephemeral follow-up, the user still hears why: the public reply says it."""
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path), FakeEngine(), repo)
    fake.followup_error = (400, 50035, "Invalid Form Body")
    try:
        rec = await fake.slash("dalle", {"prompt": "a n.a.k.e.d person"}, user_id=23)
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "can't draw that" in edit.json["content"]
        assert "can't draw that" in fake.messages[rec.original_message_id]["content"]
    finally:
        await run.stop()
        await repo.close()


async def test_queue_command_and_cancel_button(fake, db_url, tmp_path):
    repo = make_repo(db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    run = await start_bot(_settings(tmp_path), engine, repo, service_overrides={"concurrency": 1})
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
        gens = sorted(await _rows(repo, Generation), key=lambda g: g.id)
        last = gens[-1]
        ack = next(m for m in fake.messages.values() if f"dalle:cancel:{last.id}" in _custom_ids(m))
        rec = await fake.click(ack, f"dalle:cancel:{last.id}", user_id=99)
        cb = await _callback(fake, rec)
        assert cb.json["type"] == 6  # deferred, the queue message unchanged
        other = await fake.wait_for(lambda c: c.method == "POST" and rec.token in c.path and c is not cb)
        assert "Only a queued request of yours" in other.json["content"] and other.json["flags"] == 64
        rec = await fake.click(ack, f"dalle:cancel:{last.id}", user_id=31)
        cb = await _callback(fake, rec)
        assert cb.json["type"] == 6
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert edit.json["content"] == "Cancelled." and edit.json["components"] == []
        assert (await repo.get_generation(last.id)).status == "cancelled"
        engine.gate.set()
        await fake.wait_count(_posts(fake), 2)
    finally:
        await run.stop()
        await repo.close()


async def test_restart_mid_queue_resumes_and_posts_every_result(fake, db_url, tmp_path):
    repo = make_repo(db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # the first process never finishes anything
    run = await start_bot(_settings(tmp_path), engine, repo, shutdown_grace=0.05)
    recs = [await fake.slash("dalle", {"prompt": f"a shape number {k}", "images": 1}, user_id=40 + k)
            for k in range(4)]
    for r in recs:
        await _callback(fake, r)
    for _ in range(100):
        if len(await _rows(repo, Generation)) == 4:
            break
        await asyncio.sleep(0.02)
    await run.stop()
    await engine.close()
    assert sorted(g.status for g in await _rows(repo, Generation)) == ["queued"] * 4
    assert fake.calls_for("POST", f"/channels/{CHANNEL}/messages") == []

    engine2 = FakeEngine()
    run2 = await start_bot(_settings(tmp_path, sync_commands=False), engine2, repo)
    try:
        assert sorted(run2.bot.resumed) == sorted(g.id for g in await _rows(repo, Generation))
        posts = await fake.wait_count(_posts(fake), 4)
        contents = " ".join(p.json["content"] for p in posts)
        for k in range(4):
            assert f"a shape number {k}" in contents and f"<@{40 + k}>" in contents
        await asyncio.sleep(0.1)
        assert all(g.status == "done" and g.delivered_at for g in await _rows(repo, Generation))
        assert len(fake.identifies) == 2
    finally:
        await run2.stop()
        await engine2.close()
        await repo.close()


async def test_fifty_users_at_once_all_served_fairly(fake, db_url, tmp_path):
    repo = make_repo(db_url)
    engine = FakeEngine(steps=1, step_s=0.0, concurrency=2)
    engine.gate = asyncio.Event()
    run = await start_bot(_settings(tmp_path, default_images=1), engine, repo)
    try:
        heavy = [await fake.slash("dalle", {"prompt": f"heavy {k}"}, user_id=500) for k in range(5)]
        for r in heavy:
            await _callback(fake, r)
        for _ in range(200):  # the heavy user's jobs are all queued before anyone else arrives
            if len(await _rows(repo, Generation)) == 5:
                break
            await asyncio.sleep(0.02)
        others = await asyncio.gather(*(fake.slash("dalle", {"prompt": f"user {u}"}, user_id=600 + u)
                                        for u in range(45)))
        cbs = await asyncio.gather(*(_callback(fake, r) for r in others))
        assert all(c.status == 200 and c.at - r.dispatched_at < 3.0 for c, r in zip(cbs, others, strict=True))
        for _ in range(200):
            if len(await _rows(repo, Generation)) == 50:
                break
            await asyncio.sleep(0.02)
        engine.gate.set()
        posts = await fake.wait_count(_posts(fake), 50, timeout=60)
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


async def test_gateway_reconnect_resumes_and_commands_still_work(fake, db_url, tmp_path):
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path, sync_commands=False), FakeEngine(), repo)
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
        post = await fake.wait_for(_posts(fake))
        assert post.status == 200 and "a small white boat" in post.json["content"]
    finally:
        await run.stop()
        await repo.close()


async def test_expired_token_still_delivers_as_channel_message(fake, db_url, tmp_path):
    fake.token_ttl = 0.3  # the interaction token dies while the job waits in the queue
    repo = make_repo(db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    run = await start_bot(_settings(tmp_path), engine, repo)
    try:
        rec = await fake.slash("dalle", {"prompt": "a lonely lighthouse", "images": 2}, user_id=80)
        await _callback(fake, rec)
        await asyncio.sleep(0.5)
        engine.gate.set()
        post = await fake.wait_for(_posts(fake))
        assert post.status == 200 and "<@80>" in post.json["content"] and "grid.png" in post.files
        late = [c for c in fake.errors if rec.token in c.path]
        assert all(c.status == 401 for c in late)  # only best-effort ack edits were refused
        await asyncio.sleep(0.1)
        gen = (await _rows(repo, Generation))[0]
        assert gen.status == "done" and gen.delivered_at is not None
    finally:
        if engine.gate is not None:
            engine.gate.set()
        await run.stop()
        await repo.close()


async def test_results_fit_the_interactions_attachment_limit(fake, db_url, tmp_path):
    """Discord says per interaction how many bytes a message may carry (boost tier, context); a result larger than
    that is refused with 413. The bot sizes public posts and private follow-ups to the interaction's limit (the
    guild's default would be 10 MiB here), dropping what does not fit instead of losing the result."""
    fake.attachment_limit = 400  # the fake engine's 4 images + grid are ~550 bytes
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path), FakeEngine(), repo)
    try:
        await fake.slash("dalle", {"prompt": "a small public square", "images": 4}, user_id=91)
        post = await fake.wait_for(_posts(fake))
        assert post.status == 200, post.json
        assert 0 < sum(len(b) for b in post.files.values()) <= 400 and len(post.files) < 5
        rec = await fake.slash("dalle", {"prompt": "a small private square", "images": 4, "private": True},
                               user_id=92)
        follow = await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/webhooks/{APP_ID}/{rec.token}"
                                     and bool(c.files))
        assert follow.status == 200 and (follow.json.get("flags", 0) & 64)  # ephemeral, delivered
        assert sum(len(b) for b in follow.files.values()) <= 400 and len(follow.files) < 5
        await asyncio.sleep(0.1)
        gens = await _rows(repo, Generation)
        assert {g.upload_limit for g in gens} == {400}
        assert all(g.status == "done" and g.delivered_at is not None for g in gens)
        assert [c for c in fake.errors if c.status == 413] == []
    finally:
        await run.stop()
        await repo.close()


async def test_private_result_after_the_token_expired_goes_to_a_dm(fake, db_url, tmp_path):
    fake.token_ttl = 0.3
    repo = make_repo(db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    run = await start_bot(_settings(tmp_path), engine, repo)
    try:
        rec = await fake.slash("dalle", {"prompt": "a secret garden", "images": 2, "private": True}, user_id=93)
        await _callback(fake, rec)
        await asyncio.sleep(0.5)
        engine.gate.set()
        dm = await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/channels/{50_000 + 93}/messages")
        assert dm.status == 200 and "a secret garden" in dm.json["content"] and "grid.png" in dm.files
        assert not fake.calls_for("POST", f"/channels/{CHANNEL}/messages")  # never in the public channel
        await asyncio.sleep(0.1)
        gen = (await _rows(repo, Generation))[0]
        assert gen.status == "done" and gen.delivered_at is not None
    finally:
        engine.gate.set()
        await run.stop()
        await repo.close()


async def test_a_channel_that_refuses_the_bot_still_gets_the_result_as_a_follow_up(fake, db_url, tmp_path):
    """No Send Messages permission (or an archived thread, an app-only context): the channel post is refused
    with 403, so the result goes out as the interaction's follow-up, which Discord accepts in any context."""
    fake.forbidden_channels.add(CHANNEL)
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path), FakeEngine(), repo)
    try:
        rec = await fake.slash("dalle", {"prompt": "a red circle", "images": 2}, user_id=77)
        follow = await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/webhooks/{APP_ID}/{rec.token}"
                                     and bool(c.files))
        assert follow.status == 200 and "a red circle" in follow.json["content"] and "grid.png" in follow.files
        assert not follow.json.get("flags", 0) & 64  # public, like the channel post would have been
        assert [c.status for c in fake.calls_for("POST", f"/channels/{CHANNEL}/messages")] == [403]
        await asyncio.sleep(0.1)
        gen = (await _rows(repo, Generation))[0]
        assert gen.status == "done" and gen.delivered_at is not None
    finally:
        await run.stop()
        await repo.close()


async def test_prompt_mentions_do_not_ping_and_long_markdown_prompts_fit(fake, db_url, tmp_path):
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path), FakeEngine(), repo)
    try:
        await fake.slash("dalle", {"prompt": "a portrait of <@555> and @everyone", "images": 1}, user_id=78)
        post = await fake.wait_for(_posts(fake))
        assert post.status == 200 and post.json["content"].startswith("<@78>")
        allowed = post.json["allowed_mentions"]
        assert [str(u) for u in allowed["users"]] == ["78"]  # only the requester
        assert "users" not in allowed.get("parse", [])
        assert "everyone" not in allowed.get("parse", [])
        await fake.slash("dalle", {"prompt": "a" + "*" * 999, "images": 1}, user_id=79)
        posts = await fake.wait_count(_posts(fake), 2)
        assert posts[1].status == 200 and len(posts[1].json["content"]) <= 2000
        await asyncio.sleep(0.1)
        assert all(g.delivered_at is not None for g in await _rows(repo, Generation))
    finally:
        await run.stop()
        await repo.close()


async def test_a_button_whose_handler_fails_tells_the_user(fake, db_url, tmp_path):
    """A deferred button ("thinking…") whose handler raises must still end with a message, not spin forever."""
    repo = make_repo(db_url)
    run = await start_bot(_settings(tmp_path), FakeEngine(), repo)
    try:
        message, _ = await _dalle_result(fake, {"prompt": "a cat", "images": 2, "seed": 3}, 15)

        async def broken(*args, **kwargs):
            raise RuntimeError("database is locked")

        run.bot.service.variation = broken
        run.bot.service.feedback = broken
        rec = await fake.click(message, next(i for i in _custom_ids(message) if i.startswith("dalle:var:")),
                               user_id=16)
        cb = await _callback(fake, rec)
        assert cb.json["type"] == 5  # deferred: the user sees "thinking…"
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert edit.json["content"].startswith("Sorry, that did not work")
        up = next(i for i in _custom_ids(message) if i.startswith("dalle:vote:up:"))
        rec = await fake.click(message, up, user_id=16)
        cb = await _callback(fake, rec)
        assert cb.json["type"] == 5
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert edit.json["content"].startswith("Sorry, that did not work")
        # Cancel defers without changing the queue message: its failure is a private follow-up, not an edit
        run.bot.service.cancel = broken
        gen = (await _rows(repo, Generation))[0]
        queued = {**message, "attachments": [], "components": [{"type": 1, "components": [
            {"type": 2, "style": 2, "label": "Cancel", "custom_id": f"dalle:cancel:{gen.id}"}]}]}
        rec = await fake.click(queued, f"dalle:cancel:{gen.id}", user_id=15)  # as from a queue message
        cb = await _callback(fake, rec)
        assert cb.json["type"] == 6
        sorry = await fake.wait_for(lambda c: c.method == "POST" and rec.token in c.path and c is not cb)
        assert sorry.json["content"].startswith("Sorry, that did not work") and sorry.json["flags"] == 64
        assert not any(c.method == "PATCH" and rec.token in c.path for c in fake.calls)
    finally:
        await run.stop()
        await repo.close()


async def test_a_failed_ack_record_does_not_tell_the_user_to_retry_a_queued_job(fake, db_url, tmp_path):
    """Recording the acknowledgement's message id fails (a database hiccup) after the job was queued: the user
    still sees "Queued" (no "Something went wrong" that would make them submit it twice) and gets the result."""
    repo = make_repo(db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    run = await start_bot(_settings(tmp_path), engine, repo, service_overrides={"concurrency": 1})
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
        await fake.wait_count(_posts(fake), 2)
        assert not any(rec.token in c.path and "went wrong" in str(c.json) for c in fake.calls)
        assert len(await _rows(repo, Generation)) == 2
    finally:
        await run.stop()
        await repo.close()


def test_a_result_whose_stored_images_are_missing_or_unreadable_still_posts():
    """Images whose files vanished (no png) or cannot be decoded: the grid is made of the readable ones, or left
    out, instead of failing the whole post (which would leave the result undelivered for good)."""
    import io as _io
    from pathlib import Path

    from PIL import Image as PILImage

    from bot.cogs.generate import DiscordPublisher
    from bot.service import Outcome, StoredImage

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
        await fake.wait_for(lambda c: c.method == "PUT" and c.path.endswith("/commands"), timeout=60)
        for _ in range(300):
            if fake.identifies and fake.sockets:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # default guild_ready_timeout in the real process
        await fake.slash("dalle", {"prompt": "a red circle", "seed": 4}, user_id=90)
        post = await fake.wait_for(_posts(fake), timeout=30)
        assert post.status == 200 and "seed `4`" in post.json["content"] and len(post.files) == 3
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err, err.decode()[-4000:]
