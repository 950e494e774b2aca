"""Discord sign-in's role lookups at scale, against the fake Discord: the bot's guilds are read page by page (Discord
lists 200 at most), and the requests that find a session's roles stale together (a queue page's thumbnails) share
one lookup instead of each spending the bot's token."""

from __future__ import annotations

import asyncio

from bench.fakes.discord import MOD_ROLE_ID
from tests.bot.test_web_review_oauth import page_with_oauth
from tests.bot.webkit import GUILD_A, flagged_result
from tests.fakes.botkit import make_repo

MANAGE_MESSAGES = str(1 << 13)


async def test_web_review_oauth_reads_every_page_of_guilds(fake, bot_db_url, tmp_path):
    fake.guild_ids = tuple(range(1000, 1250))  # the user moderates the 241st: past Discord's first page
    fake.guild_roles[1240] = [{"id": "2600", "name": "helpers", "permissions": MANAGE_MESSAGES, "position": 2}]
    fake.member_roles[(1240, 77)] = [2600]
    fake.oauth_user = 77
    repo = make_repo(bot_db_url)
    client, svc = await page_with_oauth(fake, repo, tmp_path)
    try:
        r = await client.get("/oauth/discord")
        assert r.status == 200 and str(r.url).endswith("/"), await r.text()
        pages = [c.query for c in fake.calls if c.path == "/users/@me/guilds"]
        assert [p.get("after") for p in pages] == ["0", "1199"] and all(p["limit"] == "200" for p in pages)
        assert (await client.get("/blocklist?guild=1240")).status == 200
        assert (await client.get("/blocklist?guild=1239")).status == 403
    finally:
        await client.close()
        await repo.close()


async def test_web_review_oauth_stale_roles_looked_up_once(fake, bot_db_url, tmp_path):
    fake.guild_ids = (GUILD_A,)
    fake.member_roles[(GUILD_A, 77)] = [MOD_ROLE_ID]
    fake.oauth_user = 77
    repo = make_repo(bot_db_url)
    client, svc = await page_with_oauth(fake, repo, tmp_path, cache_s=1.0)
    try:
        await repo.update_guild_settings(GUILD_A, moderator_role_id=MOD_ROLE_ID)
        a = await flagged_result(repo, svc, tmp_path, GUILD_A, "a red square")
        assert (await client.get("/oauth/discord")).status == 200
        await asyncio.sleep(1.1)  # the roles are stale now
        before = len(fake.calls)
        answers = await asyncio.gather(*(client.get(f"/image/{i}") for i in a.image_ids * 10))
        assert [r.status for r in answers] == [200] * 30
        lookups = [c.path for c in fake.calls[before:]]
        assert 1 <= lookups.count(f"/guilds/{GUILD_A}/members/77") <= 2, lookups  # not one per thumbnail
        assert lookups.count(f"/guilds/{GUILD_A}/roles") <= 2 and "/users/@me/guilds" not in lookups
    finally:
        await client.close()
        await repo.close()
