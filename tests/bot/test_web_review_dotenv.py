"""The web page's WEB_* settings from ./.env as from the environment (the bot serves the page on .env's WEB_PORT
and ``/dalle-mod web`` links to .env's WEB_BASE_URL), and a port already taken leaves the bot running without its
page instead of stopping it."""

from __future__ import annotations

import logging
import re
import socket

import aiohttp

from bench.fakes.discord import MOD_ROLE_ID
from tests.bot.test_web_review_discord import REVIEW, web_command
from tests.fakes.botkit import make_repo
from tests.fakes.discordkit import discord_settings, start_bot
from tests.fakes.engine import FakeEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_web_review_dotenv_port_and_base_url(fake, bot_db_url, tmp_path, monkeypatch):
    for name in ("WEB_PORT", "WEB_BASE_URL", "WEB_HOST"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    (tmp_path / ".env").write_text(f"WEB_PORT={port}\nWEB_BASE_URL=https://mod.example/\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW)), FakeEngine(), repo)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200 and await r.json() == {"ok": True}
        await run.bot.service.update_guild_settings(2000, moderator_role_id=MOD_ROLE_ID)
        text = await web_command(fake, user_id=72, roles=[MOD_ROLE_ID])
        assert re.search(r"https://mod\.example/signin/\S+", text), text
    finally:
        await run.stop()
        await repo.close()


async def test_web_review_port_taken_bot_still_starts(fake, bot_db_url, tmp_path, monkeypatch, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("WEB_PORT", str(taken.getsockname()[1]))
        monkeypatch.delenv("WEB_HOST", raising=False)
        repo = make_repo(bot_db_url)
        with caplog.at_level(logging.ERROR, logger="bot.web.serve"):
            run = await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW)), FakeEngine(), repo)
        try:
            assert "web page is not served" in caplog.text
            await run.bot.service.update_guild_settings(2000, moderator_role_id=MOD_ROLE_ID)
            assert "/signin/" in await web_command(fake, user_id=72, roles=[MOD_ROLE_ID])  # the bot answers
        finally:
            await run.stop()
            await repo.close()
