"""End to end: two ``python -m bot`` processes share one PostgreSQL queue and split the shards (SHARD_COUNT=2,
SHARD_IDS=0 / 1). Each connects only its own shard, receives only its guilds' interactions (the fake Discord routes
them as Discord does, ``(guild_id >> 22) % shard_count``), and every result is posted exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.fakes.discord import FakeDiscord

ROOT = Path(__file__).resolve().parents[2]
GUILD_0 = 2 << 22  # (id >> 22) % 2 == 0: shard 0
GUILD_1 = 3 << 22  # shard 1
CHANNEL = 3000
REVIEW = 3100


def channel_of(guild_id: int) -> int:
    return CHANNEL + (guild_id - GUILD_0)  # the fake's channel numbering


async def waiting_case(pg_url: str, tmp_path: Path, guild_id: int) -> int:
    """A flagged image's open case that no review post carries yet (its bot stopped before posting it)."""
    from PIL import Image as PILImage

    from store.db import upgrade
    from store.repository import NewImage, Repository

    upgrade(pg_url)
    png = tmp_path / "flagged.png"
    PILImage.new("RGB", (8, 8), (200, 0, 0)).save(png)
    repo = Repository.from_url(pg_url)
    try:
        gen = await repo.create_generation(user_id=103, guild_id=guild_id, prompt="an unsafe thing")
        [row] = await repo.add_images(gen.id, [NewImage(index=0, tokens=np.zeros(256, np.int16), rank=0,
                                                        file_path=str(png), flagged=True, hidden=True)])
        case, _ = await repo.open_case("auto", image_id=row.id, generation_id=gen.id, reason="safety checker")
        return case.id
    finally:
        await repo.close()


async def test_two_bot_processes_each_run_their_own_shard(pg_url, tmp_path):
    case_id = await waiting_case(pg_url, tmp_path, GUILD_1)
    fake = await FakeDiscord(guilds=(GUILD_0, GUILD_1), channel_id=CHANNEL).start()
    procs: list[asyncio.subprocess.Process] = []
    try:
        for shard in (0, 1):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "SHARD_"))}
            env.update(
                DISCORD_TOKEN="fake-token", DISCORD_API_BASE=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url,
                SYNC_COMMANDS="true", DATABASE_URL=pg_url, AUTO_MIGRATE="true", OUTPUT_DIR=str(tmp_path / "out"),
                DEFAULT_IMAGES="2", SHARD_COUNT="2", SHARD_IDS=str(shard), LOG_LEVEL="INFO",
                REVIEW_CHANNEL_ID=str(REVIEW),
                DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine",
                PYTHONPATH=os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(ROOT)] if p),
            )
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", env=env, cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
            if shard == 0:  # one at a time: the first creates the schema
                await fake.wait_for(lambda c: c.method == "PUT" and c.path.endswith("/commands"), timeout=60)
        for _ in range(600):
            if sorted(tuple(i.get("shard", ())) for i in fake.identifies) == [(0, 2), (1, 2)] and \
                    len(fake.sockets) == 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(tuple(i["shard"]) for i in fake.identifies) == [(0, 2), (1, 2)], fake.identifies
        await asyncio.sleep(2.5)  # discord.py's guild-ready wait

        await fake.slash("dalle", {"prompt": "a red circle", "seed": 1}, user_id=101, guild_id=GUILD_0,
                         channel_id=channel_of(GUILD_0))
        await fake.slash("dalle", {"prompt": "a blue square", "seed": 2}, user_id=102, guild_id=GUILD_1,
                         channel_id=channel_of(GUILD_1))
        for guild in (GUILD_0, GUILD_1):
            path = f"/channels/{channel_of(guild)}/messages"
            await fake.wait_for(lambda c, path=path: c.method == "POST" and c.path == path, timeout=60)
        await asyncio.sleep(1.0)  # a duplicate post would show here
        posts = {g: fake.calls_for("POST", f"/channels/{channel_of(g)}/messages") for g in (GUILD_0, GUILD_1)}
        assert {g: len(p) for g, p in posts.items()} == {GUILD_0: 1, GUILD_1: 1}
        # the case that waited in the database is posted once, by the process that runs its guild's shard
        [review] = fake.calls_for("POST", f"/channels/{REVIEW}/messages")
        assert f"dalle:case:history:{case_id}" in str(review.json["components"])
    finally:
        logs = []
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            logs.append(err.decode())
        await fake.close()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
        assert "Traceback" not in log, log[-4000:]
    # each process queued only its own shard's request, and the waiting case went to its guild's process
    assert f"case {case_id} posted" in logs[1] and f"case {case_id} posted" not in logs[0], logs[0][-3000:]
    assert "for user 101" in logs[0] and "for user 102" not in logs[0], logs[0][-3000:]
    assert "for user 102" in logs[1] and "for user 101" not in logs[1], logs[1][-3000:]
    assert fake.unknown == [], [(c.method, c.path) for c in fake.unknown]


def test_shard_settings_are_validated():
    from bot.config import SettingsError, load_settings

    base = {"DALLE_MODE": "local", "DATABASE_URL": "sqlite:///x.db"}
    assert load_settings({**base, "SHARD_COUNT": "4", "SHARD_IDS": "1, 3"}, dotenv_path=None).shard_ids == (1, 3)
    assert load_settings({**base, "SHARD_COUNT": "4"}, dotenv_path=None).shard_ids is None
    for env, variable, words in [({"SHARD_IDS": "0"}, "SHARD_IDS", "needs SHARD_COUNT"),
                                 ({"SHARD_COUNT": "2", "SHARD_IDS": "2"}, "SHARD_IDS", "from 0 to 1"),
                                 ({"SHARD_COUNT": "2", "SHARD_IDS": "1,1"}, "SHARD_IDS", "twice"),
                                 ({"SHARD_COUNT": "0"}, "SHARD_COUNT", "between 1 and")]:
        with pytest.raises(SettingsError) as err:
            load_settings({**base, **env}, dotenv_path=None)
        assert err.value.variable == variable and words in str(err.value), str(err.value)
