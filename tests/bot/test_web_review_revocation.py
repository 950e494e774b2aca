"""A moderator signed in with a one-time link loses the page when Discord no longer shows them as one: their
roles and permissions are read again with the bot's token (as for Discord sign-in), on SQLite and PostgreSQL."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from bench.fakes.discord import MOD_ROLE_ID
from bot.web.config import WebConfig
from bot.web.serve import build_app
from bot.webaccess import Grant, Rights
from tests.bot.webkit import GUILD_A, GUILD_B, flagged_result, make_service, sign_in

MANAGE_MESSAGES = str(1 << 13)


async def link_page(fake, repo, tmp_path):
    fake.guild_ids = (GUILD_A, GUILD_B)
    svc, _ = make_service(repo, tmp_path)
    config = WebConfig(secret_key="k" * 40, role_cache_s=0.0)
    client = TestClient(TestServer(build_app(svc, config, bot_token="fake-token", api_base=fake.api_base)))
    await client.start_server()
    return client, svc


async def test_web_review_link_session_loses_a_removed_moderator_role(fake, repo, tmp_path):
    client, svc = await link_page(fake, repo, tmp_path)
    try:
        await repo.update_guild_settings(GUILD_A, moderator_role_id=MOD_ROLE_ID)
        a = await flagged_result(repo, svc, tmp_path, GUILD_A, "a red square")
        fake.member_roles[(GUILD_A, 9)] = [MOD_ROLE_ID]
        csrf = await sign_in(client, repo, Rights(9, grants={GUILD_A: Grant(roles=(GUILD_A, MOD_ROLE_ID))}))
        assert f'data-case="{a.case_id}"' in await (await client.get("/")).text()
        assert any(c.path == f"/guilds/{GUILD_A}/members/9" for c in fake.calls)
        assert not any(c.path == "/users/@me/guilds" for c in fake.calls)  # only the session's guild is asked
        fake.member_roles[(GUILD_A, 9)] = []  # demoted: the link's stored roles no longer count
        r = await client.post(f"/case/{a.case_id}/decide", data={"csrf": csrf, "action": "approve"},
                              allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/signin"
        assert (await repo.get_case(a.case_id)).status == "open" and await repo.audit_log(None) == []
        assert (await client.get("/", allow_redirects=False)).status == 303
    finally:
        await client.close()


async def test_web_review_link_session_loses_manage_messages_and_membership(fake, repo, tmp_path):
    client, svc = await link_page(fake, repo, tmp_path)
    try:
        fake.guild_roles[GUILD_A] = [{"id": "2600", "name": "helpers", "permissions": MANAGE_MESSAGES, "position": 2}]
        fake.member_roles[(GUILD_A, 8)] = [2600]
        rights = Rights(8, grants={GUILD_A: Grant(roles=(GUILD_A, 2600), manage_messages=True, admin=True)})
        await sign_in(client, repo, rights)
        assert (await client.get("/", allow_redirects=False)).status == 200
        assert (await client.get(f"/settings/{GUILD_A}", allow_redirects=False)).status == 403  # not Manage Server
        fake.member_roles[(GUILD_A, 8)] = []  # the helper role is taken: no Manage Messages any more
        assert (await client.get("/", allow_redirects=False)).headers["Location"] == "/signin"

        fake.member_roles[(GUILD_A, 8)] = [2600]
        await sign_in(client, repo, rights)
        del fake.member_roles[(GUILD_A, 8)]  # kicked from the server
        assert (await client.get("/", allow_redirects=False)).headers["Location"] == "/signin"
    finally:
        await client.close()
