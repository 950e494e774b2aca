"""Helpers for the end-to-end bot tests against the fake Discord (``bench.fakes.discord``)."""

from __future__ import annotations

import asyncio

from bench.fakes.discord import FakeDiscord
from bot.app import create_bot
from bot.config import Settings, load_settings
from tests.fakes.botkit import sqlite_url

CHANNEL = 3000


def discord_settings(tmp_path, **env: str) -> Settings:
    """Settings from an environment: production defaults except limits that would refuse the tests' bursts."""
    base = dict(DATABASE_URL=sqlite_url(tmp_path), SYNC_COMMANDS="true", OUTPUT_DIR=str(tmp_path / "out"),
                RATE_LIMIT_USER="100 per minute", RATE_LIMIT_GUILD="1000 per minute", DAILY_QUOTA="0",
                DEFAULT_IMAGES="4", MAX_QUEUE_PER_USER="5")
    base.update(env)
    return load_settings(base, dotenv_path=None)


async def bot_process_ready(fake: FakeDiscord) -> None:
    """Wait until a ``python -m bot`` child process against ``fake`` has synced its commands, identified on the
    gateway and passed discord.py's guild-ready wait, so a slash command sent now reaches it."""
    await fake.wait_for(lambda c: c.method == "PUT" and c.path.endswith("/commands"), timeout=60)
    for _ in range(300):
        if fake.identifies and fake.sockets:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.5)  # discord.py's default guild_ready_timeout


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


def channel_posts(fake: FakeDiscord):
    """A predicate for ``fake.wait_for``: a message posted to the test channel."""
    return lambda c: c.method == "POST" and c.path == f"/channels/{CHANNEL}/messages"


def custom_ids(message: dict) -> list[str]:
    return [comp["custom_id"] for row in message.get("components", []) for comp in row["components"]]


async def dalle_result(fake: FakeDiscord, options: dict, user_id: int) -> tuple[dict, object]:
    """Send ``/dalle``, wait for the result post; returns the posted channel message and the POST call."""
    await fake.slash("dalle", options, user_id=user_id)
    post = await fake.wait_for(channel_posts(fake))
    message = next(m for m in fake.messages.values() if m["attachments"] and m["channel_id"] == str(CHANNEL))
    return message, post


async def interaction_callback(fake: FakeDiscord, rec):
    """The bot's first response to interaction ``rec``."""
    return await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{rec.id}/") and c.method == "POST")
