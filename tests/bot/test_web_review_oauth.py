"""Discord OAuth2 sign-in to the moderators' page against the fake Discord: authorization code with the
``identify`` scope only, the user's roles read with the bot's token in each of the bot's guilds, only the guilds
they moderate shown, roles re-checked (a moderator who loses the role is signed out), refusals and a forged state
turned away."""

from __future__ import annotations

import socket
from urllib.parse import parse_qs, urlsplit

from aiohttp.test_utils import TestClient, TestServer

from bench.fakes.discord import APP_ID, MOD_ROLE_ID
from bot.web.config import WebConfig
from bot.web.serve import build_app
from tests.bot.webkit import GUILD_A, GUILD_B, flagged_result, make_service
from tests.fakes.botkit import make_repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def page_with_oauth(fake, repo, tmp_path, cache_s: float = 300.0):
    svc, _ = make_service(repo, tmp_path)
    port = free_port()
    config = WebConfig(secret_key="k" * 40, base_url=f"http://127.0.0.1:{port}", oauth_client_id=str(APP_ID),
                       oauth_client_secret=fake.oauth_secret, role_cache_s=cache_s)
    client = TestClient(TestServer(build_app(svc, config, bot_token="fake-token", api_base=fake.api_base),
                                   port=port))
    await client.start_server()
    return client, svc


async def test_web_review_oauth_identify_only_roles_from_the_bot(fake, bot_db_url, tmp_path):
    fake.guild_ids = (GUILD_A, GUILD_B)
    repo = make_repo(bot_db_url)
    client, svc = await page_with_oauth(fake, repo, tmp_path, cache_s=0.0)
    try:
        await repo.update_guild_settings(GUILD_A, moderator_role_id=MOD_ROLE_ID)
        a = await flagged_result(repo, svc, tmp_path, GUILD_A, "a red square")
        b = await flagged_result(repo, svc, tmp_path, GUILD_B, "a blue circle", color=50)
        fake.member_roles[(GUILD_A, 77)] = [MOD_ROLE_ID]
        fake.member_roles[(GUILD_B, 77)] = []  # a member there, not a moderator
        fake.oauth_user = 77
        assert "Sign in with Discord" in await (await client.get("/signin")).text()
        r = await client.get("/oauth/discord")  # → the fake's consent page → back with a code → the queue
        assert r.status == 200 and str(r.url).endswith("/")
        text = await r.text()
        assert f'data-case="{a.case_id}"' in text and f'data-case="{b.case_id}"' not in text
        authorize = next(c for c in fake.calls if c.path == "/oauth2/authorize")
        assert authorize.query["scope"] == "identify" and authorize.query["response_type"] == "code"
        assert (await client.get(f"/case/{b.case_id}")).status == 403
        bearer_calls = [c for c in fake.calls if c.path == "/users/@me"]
        assert len(bearer_calls) == 1  # the user's token is used once, for who they are, then dropped
        assert any(c.path == f"/guilds/{GUILD_A}/members/77" for c in fake.calls)

        fake.member_roles[(GUILD_A, 77)] = []  # the role is taken away: the next request signs them out
        r = await client.get("/", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/signin"
        assert (await client.get("/", allow_redirects=False)).status == 303
    finally:
        await client.close()
        await repo.close()


async def test_web_review_oauth_refusals(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    client, _ = await page_with_oauth(fake, repo, tmp_path)
    try:
        forged = await client.get("/oauth/discord/callback?code=abc&state=forged")
        assert forged.status == 403 and "state" in await forged.text()
        fake.oauth_user = None  # the user clicks Cancel at Discord
        denied = await client.get("/oauth/discord")
        assert denied.status == 403 and "access_denied" in await denied.text()
        fake.oauth_user = 78  # signs in fine but moderates nothing
        fake.member_roles[(GUILD_A, 78)] = []
        nobody = await client.get("/oauth/discord")
        assert nobody.status == 403 and "moderate none" in await nobody.text()
        assert (await client.get("/", allow_redirects=False)).status == 303
        # a code replayed (e.g. from a leaked URL) is refused by Discord, so by the page
        fake.oauth_user = 78
        start = await client.get("/oauth/discord", allow_redirects=False)
        consent = await client.session.get(start.headers["Location"], allow_redirects=False)
        query = parse_qs(urlsplit(consent.headers["Location"]).query)
        first = await client.get(f"/oauth/discord/callback?code={query['code'][0]}&state={query['state'][0]}")
        assert first.status == 403  # 78 moderates nothing, but the code was spent
        again = await client.get("/oauth/discord", allow_redirects=False)
        consent2 = await client.session.get(again.headers["Location"], allow_redirects=False)
        state2 = parse_qs(urlsplit(consent2.headers["Location"]).query)["state"][0]
        replay = await client.get(f"/oauth/discord/callback?code={query['code'][0]}&state={state2}")
        assert replay.status == 403 and "refused the sign-in code" in await replay.text()
    finally:
        await client.close()
        await repo.close()
    fake.errors.clear()  # the refused token exchange is expected
