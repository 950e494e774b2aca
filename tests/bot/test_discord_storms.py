"""Chaos: the fake Discord answers the result posts with 429 and 5xx storms. Results are still posted, exactly once
each, and a retry after a 429 waits at least the Retry-After it was given (discord.py's own retries, then the bot's
publish retries once discord.py gives up)."""

from __future__ import annotations

import asyncio

from store.models import Generation
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import CHANNEL, discord_settings, start_bot
from tests.fakes.engine import FakeEngine

POSTS = rf"/channels/{CHANNEL}/messages"


def posts(fake):
    return [c for c in fake.calls if c.method == "POST" and c.path == POSTS]


async def wait_posted(fake, count: int, timeout: float = 60.0) -> None:
    await fake.wait_for(lambda c: sum(p.status == 200 for p in posts(fake)) >= count, timeout=timeout)


async def test_results_are_posted_once_through_429_and_5xx_storms(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    run = await start_bot(discord_settings(tmp_path, DEFAULT_IMAGES="2"), engine, repo)
    try:
        run.bot.service.leases.post_retry_delays = (0.3, 0.3, 0.3)  # the bot's own retries, quick for the test
        # discord.py retries these itself: two rate limits and a 502 before the post goes through
        fake.storm("POST", POSTS, [(429, 0.4), (502, 0), (429, 0.3)])
        await fake.slash("dalle", {"prompt": "a red circle", "seed": 1}, user_id=71)
        await wait_posted(fake, 1)
        # a 503 discord.py does not retry: the bot's publish retry posts it
        fake.storm("POST", POSTS, [(503, 0), (429, 0.2)])
        await fake.slash("dalle", {"prompt": "a blue square", "seed": 2}, user_id=72)
        await wait_posted(fake, 2)

        calls = posts(fake)
        assert [c.status for c in calls] == [429, 502, 429, 200, 503, 429, 200]
        for before, after in zip(calls, calls[1:], strict=False):  # Retry-After respected
            if before.status == 429:
                assert after.at - before.at >= (0.4 if before is calls[0] else 0.2) - 0.02
        ok = [c for c in calls if c.status == 200]
        assert len(ok) == 2 and "a red circle" in ok[0].json["content"] and "a blue square" in ok[1].json["content"]
        gens = await rows_of(repo, Generation)
        assert len(gens) == 2
        for gen in gens:
            for _ in range(100):  # the row is marked delivered just after the post returns
                gen = await repo.get_generation(gen.id)
                if gen.delivered_at is not None:
                    break
                await asyncio.sleep(0.05)
            assert gen.status == "done" and gen.delivered_at is not None
        await asyncio.sleep(1.0)  # a late duplicate would show here
        assert sum(c.status == 200 for c in posts(fake)) == 2
        assert not [c for c in fake.errors if c.path != POSTS]  # nothing else went wrong
        assert fake.unknown == []
    finally:
        await run.stop()
        await repo.close()
