"""Rate limiter: windows, quotas, per-guild policy, strikes, and a shared Redis."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.ratelimit import LimitPolicy, RateLimiter, StrikePolicy

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
        return True
    except OSError:
        return False


async def test_user_window_refuses_with_retry_after():
    rl = RateLimiter(policy=LimitPolicy(user="2 per 10 seconds", guild="", daily_quota=None))
    assert (await rl.hit(1, 10)).allowed
    assert (await rl.hit(1, 10)).allowed
    d = await rl.hit(1, 10)
    assert not d.allowed and d.scope == "user"
    assert 8.0 < d.retry_after <= 10.0
    assert "Try again in" in d.message and "10 s" in d.message
    assert (await rl.hit(2, 10)).allowed  # other users unaffected


async def test_check_consumes_nothing():
    rl = RateLimiter(policy=LimitPolicy(user="1 per minute", guild="", daily_quota=None))
    for _ in range(5):
        assert (await rl.check(1, None)).allowed
    assert (await rl.hit(1, None)).allowed
    assert not (await rl.check(1, None)).allowed


async def test_guild_window_and_refusal_does_not_consume():
    rl = RateLimiter(policy=LimitPolicy(user="10 per minute", guild="3 per minute", daily_quota=None))
    for user in (1, 2, 3):
        assert (await rl.hit(user, 77)).allowed
    d = await rl.hit(4, 77)
    assert not d.allowed and d.scope == "guild" and d.retry_after > 50
    assert (await rl.hit(4, 78)).allowed  # another guild
    # user 4's refused request in guild 77 did not count against user 4
    rl2_policy = LimitPolicy(user="1 per minute", guild="", daily_quota=None)
    assert (await rl.hit(5, None, rl2_policy)).allowed
    assert not (await rl.hit(5, None, rl2_policy)).allowed


async def test_daily_quota_and_per_guild_override():
    rl = RateLimiter(policy=LimitPolicy(user="100 per minute", guild="", daily_quota=2))
    assert (await rl.hit(1, 5)).allowed and (await rl.hit(1, 5)).allowed
    d = await rl.hit(1, 5)
    assert not d.allowed and d.scope == "daily" and d.retry_after > 23 * 3600
    assert "quota" in d.message and " h" in d.message
    generous = LimitPolicy(user="100 per minute", guild="", daily_quota=5)
    assert (await rl.hit(1, 6, generous)).allowed


async def test_strikes_escalate_cooldowns():
    rl = RateLimiter(policy=LimitPolicy(daily_quota=None), strikes=StrikePolicy(free=1, base_s=30, factor=2))
    assert await rl.strike(9) == (1, 0.0)
    assert (await rl.hit(9, None)).allowed
    assert await rl.strike(9) == (2, 30.0)
    d = await rl.hit(9, None)
    assert not d.allowed and d.scope == "cooldown" and 28 <= d.retry_after <= 30
    assert await rl.strike(9) == (3, 60.0)
    assert 58 <= await rl.cooldown_remaining(9) <= 60
    assert await rl.strike(9) == (4, 120.0)
    await rl.reset_user(9)
    assert (await rl.hit(9, None)).allowed


_REQUESTS = st.lists(st.tuples(st.integers(1, 4), st.sampled_from([None, 10, 11]), st.booleans()), max_size=60)


@settings(max_examples=60, deadline=None)
@given(requests=_REQUESTS, user_limit=st.integers(1, 5), guild_limit=st.integers(1, 8), quota=st.integers(1, 6))
def test_limiter_admits_exactly_what_a_counting_model_admits(requests, user_limit, guild_limit, quota):
    """Any sequence of checks and hits (all inside one window) is decided as counting says: a request is
    admitted iff its user, the user's day and its guild (if any) each have room; a refusal names a full
    window (the day's when the quota is what is full) and consumes nothing; a check never consumes."""
    policy = LimitPolicy(user=f"{user_limit} per hour", guild=f"{guild_limit} per hour", daily_quota=quota)

    async def run() -> None:
        rl = RateLimiter(namespace=f"p{uuid.uuid4().hex}", policy=policy)
        per_user: dict[int, int] = {}
        per_guild: dict[int, int] = {}
        for user, guild, consume in requests:
            full = {"user"} if per_user.get(user, 0) >= user_limit else set()
            full |= {"daily"} if per_user.get(user, 0) >= quota else set()
            full |= {"guild"} if guild is not None and per_guild.get(guild, 0) >= guild_limit else set()
            decision = await (rl.hit if consume else rl.check)(user, guild)
            assert decision.allowed == (not full), (user, guild, full, decision)
            if full:
                assert decision.scope in full and decision.retry_after > 0
                assert decision.scope == "daily" or "daily" not in full  # the longest wait is the one told
            elif consume:
                per_user[user] = per_user.get(user, 0) + 1
                if guild is not None:
                    per_guild[guild] = per_guild.get(guild, 0) + 1

    asyncio.run(run())


def test_bad_limit_string_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid rate limit"):
        RateLimiter(policy=LimitPolicy(user="lots per fortnight"))


async def test_two_limiters_share_a_redis_limit():
    if not _redis_up():
        if os.environ.get("DALLE_REQUIRE_REDIS") == "1":
            pytest.fail("Redis is required (DALLE_REQUIRE_REDIS=1) but not running on 127.0.0.1:6379")
        pytest.skip("Redis not running on 127.0.0.1:6379")
    ns = f"test-{uuid.uuid4().hex}"
    policy = LimitPolicy(user="3 per minute", guild="", daily_quota=None)
    a = RateLimiter(REDIS_URL, namespace=ns, policy=policy)
    b = RateLimiter(REDIS_URL, namespace=ns, policy=policy)
    results = await asyncio.gather(*(rl.hit(42, 1) for rl in (a, b, a, b, a)))
    assert sum(r.allowed for r in results) == 3
    refused = [r for r in results if not r.allowed]
    assert all(r.scope == "user" and 0 < r.retry_after <= 60 for r in refused)
    # strikes are shared too
    await a.strike(42)
    strikes, cooldown = await b.strike(42)
    assert strikes == 2 and cooldown > 0
    assert await a.cooldown_remaining(42) > 0
    # a different namespace is independent
    c = RateLimiter(REDIS_URL, namespace=ns + "-other", policy=policy)
    assert (await c.hit(42, 1)).allowed
    import redis.asyncio as aioredis

    r = aioredis.from_url(REDIS_URL)
    keys = [k async for k in r.scan_iter(match=f"*{ns}*")]
    assert keys  # the limiter really wrote to Redis
    await r.delete(*keys)
    await r.aclose()
