"""Fixtures of the bot tests: a fresh SQLite database, a started service over the fake engine, the fake Discord."""

from __future__ import annotations

import discord
import pytest
import yarl

from bench.fakes.discord import FakeDiscord
from bot.ratelimit import LimitPolicy, RateLimiter
from bot.scheduler import Scheduler
from bot.service import GenerationService
from tests.fakes.botkit import RecordingPublisher, create_schema, make_repo, sqlite_url
from tests.fakes.engine import FakeEngine


@pytest.fixture
def bot_db_url(tmp_path):
    url = sqlite_url(tmp_path)
    create_schema(url)
    return url


@pytest.fixture
async def running_service(bot_db_url, tmp_path):
    """(service, repository, engine, publisher): a started service with two workers and generous limits."""
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    pub = RecordingPublisher()
    limiter = RateLimiter(policy=LimitPolicy(user="100 per minute", guild="1000 per minute", daily_quota=None))
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "out", limiter=limiter,
                            scheduler=Scheduler(per_user_cap=5), concurrency=2, progress_interval=0.0)
    await svc.start()
    yield svc, repo, engine, pub
    await svc.stop(grace=1)
    await engine.close()
    await repo.close()


@pytest.fixture
async def fake(monkeypatch):
    """The strict loopback fake Discord, with discord.py's REST and gateway pointed at it."""
    fd = await FakeDiscord().start()
    monkeypatch.setattr(discord.http.Route, "BASE", fd.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fd.gateway_url))
    yield fd
    await fd.close()
    assert fd.unknown == [], [(c.method, c.path) for c in fd.unknown]
