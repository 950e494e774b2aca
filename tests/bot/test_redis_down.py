"""Chaos: Redis goes away while the bot runs. Rate limiting degrades as bot.ratelimit documents (each process counts
in its own memory, one warning, Redis tried again every few seconds, one line when it is back) and nothing
crashes: requests are still admitted, limited and finished."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from bot.ratelimit import LimitPolicy, RateLimiter, StrikePolicy
from tests.fakes.redis_server import PrivateRedis

ROOT = Path(__file__).resolve().parents[2]


async def test_the_limiter_degrades_to_memory_while_redis_is_down_and_comes_back(tmp_path, caplog):
    server = PrivateRedis(tmp_path).start()
    limiter = RateLimiter(server.url, namespace="chaos", policy=LimitPolicy(user="3 per minute", guild="",
                                                                          daily_quota=None),
                          strikes=StrikePolicy(free=1, base_s=60), retry_s=0.3)
    probe = redis.Redis(port=server.port)
    try:
        assert (await limiter.hit(1, None)).allowed and (await limiter.hit(1, None)).allowed
        assert probe.dbsize() > 0 and not limiter.degraded  # the counts are in Redis

        server.kill()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bot.ratelimit"):
            started = time.monotonic()
            decisions = [await limiter.hit(1, None) for _ in range(4)]
            assert [d.allowed for d in decisions] == [True, True, True, False]  # the same limit, in memory
            assert decisions[-1].scope == "user" and "too fast" in decisions[-1].message
            assert await limiter.strike(2) == (1, 0.0) and await limiter.cooldown_remaining(2) == 0.0
            assert time.monotonic() - started < 2.0  # calls between retries do not wait on the dead Redis
            assert limiter.degraded
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "memory" in warnings[0].getMessage()  # one line per outage

            server.start()
            time.sleep(0.4)  # past retry_s: the next call tries Redis again
            assert (await limiter.hit(3, None)).allowed
            assert not limiter.degraded and probe.dbsize() > 0  # shared again: the new count is in Redis
            assert any("answers again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
        await limiter.reset_user(2)
    finally:
        probe.close()
        server.kill()


def test_python_m_bot_keeps_serving_when_redis_dies(tmp_path):
    """The terminal front end as a real process on a private Redis: a prompt is served, Redis is killed, the next
    prompts are still admitted and finished, and the process exits cleanly (no traceback)."""
    server = PrivateRedis(tmp_path).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_"))}
    env.update(PYTHONPATH=str(ROOT), DALLE_MODE="local", LOG_LEVEL="WARNING", REDIS_URL=server.url,
               DATABASE_URL=f"sqlite:///{tmp_path / 'chaos.db'}", OUTPUT_DIR=str(tmp_path / "out"),
               RATE_LIMIT_USER="100 per minute", DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine")
    proc = subprocess.Popen([sys.executable, "-m", "bot"], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()

    def wait_for(text: str, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in line for line in list(lines)) < count:
            assert time.monotonic() < deadline and proc.poll() is None, (text, lines)
            time.sleep(0.05)

    try:
        wait_for("local mode")
        proc.stdin.write("a red square --n 1\n")
        proc.stdin.flush()
        wait_for("done: 1 image(s)")
        server.kill()
        proc.stdin.write("a blue circle --n 1\na green star --n 1\n")
        proc.stdin.flush()
        wait_for("done: 1 image(s)", count=3)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.kill()
    err = proc.stderr.read()
    reader.join(5)
    assert "Traceback" not in err, err[-3000:]
    assert not [line for line in lines if "refused" in line or "error" in line], lines
    assert "counting in this process's memory" in err  # the one warning the outage is worth
