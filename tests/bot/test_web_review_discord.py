"""The web page's Discord side against the fake Discord: ``/dalle-mod web`` gives a moderator (only) a link bound
to their rights in that server, and the page's own process (``python -m bot web``'s ``StandAlone``, REST only, no
gateway) edits the review post and the public message exactly as the buttons do."""

from __future__ import annotations

import asyncio
import re

from aiohttp.test_utils import TestClient, TestServer

from bench.fakes.discord import MEMBER_PERMISSIONS, MOD_ROLE_ID
from bot.web.config import WebConfig
from bot.web.serve import StandAlone
from bot.webaccess import SignInLinks
from store.models import ModerationCase, WebSignIn
from tests.bot.webkit import OPERATOR, sign_in
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import CHANNEL, dalle_result, discord_settings, start_bot
from tests.fakes.engine import FakeEngine

REVIEW = 3100
MANAGE_MESSAGES = str(int(MEMBER_PERMISSIONS) | 1 << 13)


async def web_command(fake, **who) -> str:
    rec = await fake.slash("dalle-mod", {}, subcommand="web", **who)
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return edit.json["content"]


async def test_web_review_moderation_link_only_for_moderators(fake, bot_db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("WEB_BASE_URL", "https://mod.example")
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW)), FakeEngine(), repo)
    try:
        assert "moderators" in await web_command(fake, user_id=71)
        assert await rows_of(repo, WebSignIn) == []
        await run.bot.service.update_guild_settings(2000, moderator_role_id=MOD_ROLE_ID)
        text = await web_command(fake, user_id=72, roles=[MOD_ROLE_ID])
        token = re.search(r"https://mod\.example/signin/(\S+)", text)[1]
        assert "one use, 10 minutes" in text
        rights = await SignInLinks(repo).redeem(token)
        assert rights.user_id == 72 and not rights.operator and list(rights.grants) == [2000]
        assert MOD_ROLE_ID in rights.grants[2000].roles and not rights.grants[2000].admin
        assert await SignInLinks(repo).redeem(token) is None  # once
        [row] = await rows_of(repo, WebSignIn)
        assert token not in row.token_hash and len(row.token_hash) == 64  # only the hash is kept
    finally:
        await run.stop()
        await repo.close()


async def test_web_review_stand_alone_process_edits_discord_like_the_buttons(fake, bot_db_url, tmp_path):
    settings = discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW), DISCORD_TOKEN="fake-token",
                                DISCORD_API_BASE=fake.api_base)
    repo = make_repo(bot_db_url)
    run = await start_bot(settings, FakeEngine(), repo)
    try:
        public, _ = await dalle_result(fake, {"prompt": "an unsafe cat", "images": 2, "seed": 3}, 11)
        await fake.wait_for(lambda c: c.method == "POST" and c.path == f"/channels/{REVIEW}/messages")
    finally:
        await run.stop()  # the bot is gone: the page acts alone
    [case] = await rows_of(repo, ModerationCase)
    assert case.review_message_id is not None
    fake.calls.clear()
    identified = len(fake.identifies)
    page = StandAlone(settings, WebConfig(secret_key="k" * 40), repo=repo)
    app = await page.open()
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        csrf = await sign_in(client, repo, OPERATOR)
        r = await client.post(f"/case/{case.id}/decide", data={"csrf": csrf, "action": "remove", "reason": "nope"})
        assert r.status == 200 and f"Case #{case.id} removed." in await r.text()
        review = await fake.wait_for(lambda c: c.method == "PATCH" and c.path ==
                                     f"/channels/{REVIEW}/messages/{case.review_message_id}")
        assert "remove by <@1>" in str(review.json["embeds"][0]["fields"])
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path ==
                                   f"/channels/{CHANNEL}/messages/{public['id']}")
        assert not any(f"image{case.image_id}" in name for name in edit.files)
        assert "1 image(s) removed by a moderator." in edit.json["content"]
        await asyncio.sleep(0.2)
        assert len(fake.identifies) == identified  # REST only: no gateway session of its own
    finally:
        await client.close()
        await page.close()
        await repo.close()
