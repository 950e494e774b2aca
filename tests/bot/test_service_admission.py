"""Admission over a real database (SQLite file) and the fake engine: filters, rate limits and queue caps,
rerolls and variations, cancel, feedback, the guild settings cache, and the settings that shape the service."""

from __future__ import annotations

import asyncio

import pytest

from bot.ratelimit import LimitPolicy
from bot.service import GenerationService, derive_seed
from store.models import Feedback, Refusal
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.engine import FakeEngine


async def test_filter_refusals_are_recorded_and_strikes_escalate(running_service):
    """Outside a guild the default strike rules hold (bot.strikes): a cooldown from the third live strike, kept in
    the user's row (tests/bot/test_strikes_moderation_service.py covers guilds, restarts and expiry)."""
    svc, repo, engine, pub = running_service
    a = await svc.submit(user_id=2, prompt="n.u.d.e beach")
    assert not a.ok and a.category == "sexual" and "can't draw" in a.message and "cooldown" not in a.message
    b = await svc.submit(user_id=2, prompt="f u c k")
    assert not b.ok and "cooldown" not in b.message
    b = await svc.submit(user_id=2, prompt="n.u.d.e party")
    assert not b.ok and "You're on a cooldown for 10 min after 3 strikes." in b.message
    c = await svc.submit(user_id=2, prompt="a cat wearing a hat")
    assert not c.ok and c.category == "rate:cooldown" and c.retry_after > 500
    refusals = await rows_of(repo, Refusal)
    assert [r.reason.split(":")[0] for r in refusals] == ["sexual", "profanity", "sexual", "rate"]
    assert refusals[0].normalized == "nude beach"
    assert (await repo.get_user_state(2)).strikes == 3
    assert engine.submitted == []


async def test_rate_limit_and_queue_cap_refusals(running_service):
    svc, repo, engine, pub = running_service
    svc.limiter.policy = LimitPolicy(user="2 per minute", guild="", daily_quota=None)
    engine.gate = asyncio.Event()
    assert (await svc.submit(user_id=3, prompt="a blue square")).ok
    assert (await svc.submit(user_id=3, prompt="a blue square")).ok
    r = await svc.submit(user_id=3, prompt="a blue square")
    assert not r.ok and r.category == "rate:user" and 0 < r.retry_after <= 60 and "Try again in" in r.message
    svc.limiter.policy = LimitPolicy(user="100 per minute", guild="", daily_quota=None)
    svc.scheduler.per_user_cap = 2
    r = await svc.submit(user_id=3, prompt="a blue square")
    assert not r.ok and r.category == "queue" and "limit is 2" in r.message
    await repo.update_guild_settings(9, max_queue_per_user=3)
    assert (await svc.submit(user_id=3, guild_id=9, prompt="a blue square")).ok
    assert len(await rows_of(repo, Refusal)) == 2
    engine.gate.set()
    await pub.wait_for(3)


async def test_reroll_and_variation_lineage(running_service):
    svc, repo, engine, pub = running_service
    first = await svc.submit(user_id=5, prompt="a green triangle", n=3, seed=11)
    [o] = await pub.wait_for(1)
    rr = await svc.reroll(first.generation_id, user_id=6)
    target = o.images[1]
    var = await svc.variation(target.id, user_id=5)
    await pub.wait_for(3)
    g_rr = await repo.get_generation(rr.generation_id)
    g_var = await repo.get_generation(var.generation_id)
    assert g_rr.kind == "reroll" and g_rr.parent_generation_id == first.generation_id and g_rr.user_id == 6
    assert g_rr.prompt == "a green triangle" and g_rr.n_images == 3
    assert g_var.kind == "variation" and g_var.parent_image_id == target.id
    assert g_var.seed == derive_seed(11, target.index) != 11
    assert (await svc.variation(99999, user_id=5)).category == "invalid"


async def test_feedback_and_reports(running_service):
    svc, repo, engine, pub = running_service
    await svc.submit(user_id=7, prompt="a yellow star", n=2, seed=3)
    [o] = await pub.wait_for(1)
    img = o.images[0].id
    assert (await svc.feedback(img, 8, "up")).ok
    assert (await svc.feedback(img, 8, "down")).ok  # replaces the vote
    rep = await svc.feedback(img, 9, "report", reason="bias", note="all the same")
    assert rep.ok and rep.case_id
    assert not (await svc.feedback(img, 9, "report", reason="rude")).ok
    assert not (await svc.feedback(424242, 9, "up")).ok
    rows = await rows_of(repo, Feedback)
    assert sorted((r.user_id, r.kind, r.reason) for r in rows) == [(8, "down", None), (9, "report", "bias")]
    case = await repo.get_case(rep.case_id)
    assert case.source == "report" and case.image_id == img


async def test_cancel_while_queued(running_service):
    svc, repo, engine, pub = running_service
    engine.gate = asyncio.Event()
    ids = [(await svc.submit(user_id=10 + i, prompt="a red ball")).generation_id for i in range(4)]
    await asyncio.sleep(0.05)  # two are taken by the workers, two wait
    queued = [g for g in ids if svc.position(g)]
    assert len(queued) == 2
    assert not await svc.cancel(queued[0], user_id=999)  # not the owner
    owner = (await repo.get_generation(queued[0])).user_id
    assert await svc.cancel(queued[0], user_id=owner)
    assert not await svc.cancel(queued[0], user_id=owner)
    assert (await repo.get_generation(queued[0])).status == "cancelled"
    engine.gate.set()
    await pub.wait_for(3)
    assert len(engine.submitted) == 3


def test_derive_seed_is_stable():
    assert derive_seed(1, 2) == derive_seed(1, 2)
    assert len({derive_seed(1, i) for i in range(9)}) == 9
    assert all(0 <= derive_seed(s, i) < 2**31 for s in range(5) for i in range(5))


async def test_concurrent_submits_never_exceed_the_per_user_cap_and_inserts_overlap(running_service):
    """Admission holds no lock across the database insert, yet a burst from one user stops at the cap."""
    svc, repo, engine, pub = running_service
    engine.gate = asyncio.Event()  # nothing finishes during the burst
    svc.scheduler.per_user_cap = 3
    create = repo.create_generation
    inside, most = 0, 0

    async def slow_create(**kw):
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        try:
            await asyncio.sleep(0.02)  # a slow insert: other admissions run meanwhile
            return await create(**kw)
        finally:
            inside -= 1

    repo.create_generation = slow_create
    results = await asyncio.gather(*(svc.submit(user_id=42, prompt="a green cube", n=1) for _ in range(12)),
                                   *(svc.submit(user_id=100 + k, prompt="a green cube", n=1) for k in range(3)))
    mine = results[:12]
    assert sum(r.ok for r in mine) == 3
    assert {r.category for r in mine if not r.ok} == {"queue"}
    assert all(r.ok for r in results[12:])
    assert most > 1  # inserts of different admissions overlapped
    gens = await repo.list_generations(user_id=42, limit=50)
    assert len(gens) == 3
    assert svc.scheduler._reserved == {}
    engine.gate.set()
    await pub.wait_for(6)


async def test_guild_settings_cached_shared_and_invalidated_by_updates(bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    now = [0.0]
    svc = GenerationService(repo, FakeEngine(), None, output_dir=tmp_path / "o", guild_settings_ttl=5.0,
                            clock=lambda: now[0])
    reads = 0
    real = repo.get_guild_settings

    async def counted(guild_id):
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)
        return await real(guild_id)

    repo.get_guild_settings = counted
    try:
        await repo.update_guild_settings(3, flagged_mode="withhold")
        got = await asyncio.gather(*(svc.guild_settings(3) for _ in range(10)))
        assert reads == 1 and all(g.flagged_mode == "withhold" for g in got)  # ten misses, one read
        assert (await svc.guild_settings(3)).flagged_mode == "withhold" and reads == 1
        assert await svc.guild_settings(None) is None and reads == 1
        await svc.update_guild_settings(3, flagged_mode="spoiler")  # through the service: seen at once
        assert (await svc.guild_settings(3)).flagged_mode == "spoiler" and reads == 2
        await repo.update_guild_settings(3, flagged_mode="withhold")  # another process: seen after the TTL
        assert (await svc.guild_settings(3)).flagged_mode == "spoiler"
        now[0] += 5.1
        assert (await svc.guild_settings(3)).flagged_mode == "withhold" and reads == 3
        with pytest.raises(ValueError):
            await svc.update_guild_settings(3, flagged_mode="blur")
    finally:
        await repo.close()


def test_engine_concurrency_setting_sets_the_workers():
    from bot.config import load_settings
    from bot.wiring import service_from_settings

    def settings(**env):
        return load_settings(env, dotenv_path=None)

    svc = service_from_settings(settings(ENGINE_CONCURRENCY="7"), None, FakeEngine(), None)
    assert svc.runner.concurrency == 7
    default = service_from_settings(settings(), None, FakeEngine(), None)
    assert (default.runner.concurrency, default.runner.engine_stall_timeout) == (16, 600)
    assert service_from_settings(settings(ENGINE_STALL_TIMEOUT="0"), None, FakeEngine(),
                                 None).runner.engine_stall_timeout == 0
