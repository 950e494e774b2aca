"""No secret reaches a log or a message: the redaction rules, and whole runs of ``python -m bot`` at DEBUG.

The full run (terminal mode, the fake engine) is the real process against a real PostgreSQL and a real Redis that
requires a password: every secret it is given must be absent from everything it wrote (stdout and stderr),
while the run really used the database and Redis (a generation was admitted, rate-limited and finished).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.logsafe import MASK, RedactingFormatter, install, redact
from tests.fakes.redis_server import PrivateRedis

ROOT = Path(__file__).resolve().parents[2]
DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GhIjKl.secret-discord-token-part"


@pytest.mark.parametrize("line,hidden", [
    ("POST https://discord.com/api/v10/interactions/1234/aW50ZXJhY3Rpb246MTIzNDp0b2tlbg/callback with {} has"
     " returned 204", "aW50ZXJhY3Rpb246MTIzNDp0b2tlbg"),
    ("PATCH https://discord.com/api/v10/webhooks/999/aW50ZXJhY3Rpb24tdG9rZW4/messages/@original",
     "aW50ZXJhY3Rpb24tdG9rZW4"),
    ("For Shard ID 0: WebSocket Event: {'t': 'INTERACTION_CREATE', 'd': {'id': '1', 'token': 'tok-in-event'}}",
     "tok-in-event"),
    ('{"token": "json-token-value", "type": 2}', "json-token-value"),
    ("cannot open postgresql://bot:pw-in-url@db/dalle?password=pw-in-query&sslpassword=pw-ssl", "pw-"),
    ("redis://default:redis-pw@127.0.0.1:6379/0?token=tk-q", "redis-pw"),
    ("redis://default:redis-pw@127.0.0.1:6379/0?token=tk-q", "tk-q"),
    ("headers {'Authorization': 'Bot abc.def.ghi'}", "abc.def.ghi"),
    ("Authorization: Bearer engine-bearer-xyz", "engine-bearer-xyz"),
])
def test_secret_shaped_parts_are_masked(line, hidden):
    shown = redact(line)
    assert hidden not in shown and MASK in shown


def test_known_secrets_are_masked_also_url_quoted_and_ordinary_text_is_kept():
    assert redact("token s3cr/et+1 and s3cr%2Fet%2B1", ["s3cr/et+1"]) == f"token {MASK} and {MASK}"
    ordinary = "a red square: 3 images, seed 42, /dalle prompt with a bot and a webhook"
    assert redact(ordinary, ["ab"]) == ordinary  # too short to be a secret: never masks words


def test_the_formatter_redacts_tracebacks_and_install_is_idempotent():
    logger = logging.getLogger("test_secrets.formatter")
    handler = logging.StreamHandler(stream := __import__("io").StringIO())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        install(["engine-token-abc"], logger)
        install(["engine-token-abc"], logger)  # again: wraps the original formatter, not itself
        assert isinstance(handler.formatter, RedactingFormatter)
        assert not isinstance(handler.formatter.inner, RedactingFormatter)
        try:
            raise RuntimeError("failed with engine-token-abc")
        except RuntimeError:
            logger.exception("calling %s", "http://u:pw-x@engine:8000")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "engine-token-abc" not in text and "pw-x" not in text and "Traceback" in text


def test_settings_list_every_secret_and_redact_engine_urls():
    s = load_settings({"DISCORD_TOKEN": DISCORD_TOKEN, "ENGINE_TOKEN": "eng-tok-1", "ENGINE_MODE": "http",
                       "ENGINE_URLS": "http://svc:eng-url-pw@10.0.0.1:8000,http://10.0.0.2:8000?token=eng-q-tok",
                       "DATABASE_URL": "postgresql://bot:db-pw-1@db/dalle?password=db-pw-2&sslpassword=db-pw-3",
                       "REDIS_URL": "redis://default:redis-pw-1@127.0.0.1:6379/0?password=redis-pw-2"},
                      dotenv_path=None)
    secrets = {DISCORD_TOKEN, "eng-tok-1", "eng-url-pw", "eng-q-tok", "db-pw-1", "db-pw-2", "db-pw-3", "redis-pw-1",
               "redis-pw-2"}
    assert set(s.secrets()) == secrets
    shown = repr(s)
    assert not [x for x in secrets if x in shown], shown
    assert "10.0.0.1:8000" in shown and "sslpassword=***" in shown and "redis://default:***@" in shown


# --- a whole run of python -m bot -------------------------------------------------------------------------------


@pytest.fixture
def redis_with_password(tmp_path):
    """A private redis-server that requires a password (the shared one on 6379 requires none)."""
    redis = PrivateRedis(tmp_path, password="redis-secret-pw-77").start()
    try:
        yield redis.url, redis.password
    finally:
        redis.kill()


def test_a_debug_run_of_python_m_bot_never_prints_a_secret(tmp_path, pg_url, redis_with_password):
    """Terminal mode, LOG_LEVEL=DEBUG, with a password in DATABASE_URL (user part and ``?password=``; the local
    PostgreSQL trusts local connections, so any password is accepted and really sent), one in REDIS_URL (a Redis
    that requires it), ENGINE_TOKEN and engine URLs with credentials (ENGINE_MODE=http; the fake engine factory
    stands in for the service) and a DISCORD_TOKEN (DALLE_MODE=local keeps it unused but loaded)."""
    redis_url, redis_password = redis_with_password
    db = pg_url.replace("postgresql://postgres@", "postgresql://postgres:db-secret-pw-11@").replace(
        "postgresql://root@", "postgresql://root:db-secret-pw-11@") + "?password=db-query-pw-22"
    assert "db-secret-pw-11" in db
    secrets = ["db-secret-pw-11", "db-query-pw-22", redis_password, "engine-token-secret-33", "engine-url-pw-44",
               DISCORD_TOKEN]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_", "ENGINE_"))}
    env.update(PYTHONPATH=str(ROOT), DALLE_MODE="local", LOG_LEVEL="DEBUG", DATABASE_URL=db, AUTO_MIGRATE="true",
               REDIS_URL=redis_url, ENGINE_MODE="http", ENGINE_URLS="http://svc:engine-url-pw-44@127.0.0.1:1",
               ENGINE_TOKEN="engine-token-secret-33", DISCORD_TOKEN=DISCORD_TOKEN, OUTPUT_DIR=str(tmp_path / "out"),
               DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine")
    out = subprocess.run([sys.executable, "-m", "bot"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         input="a red square --n 2\n/queue\n", timeout=120)
    everything = out.stdout + out.stderr
    assert out.returncode == 0, everything[-3000:]
    assert "done: 2 image(s)" in out.stdout, everything[-3000:]  # it really ran: database, Redis, engine
    assert "DEBUG" in out.stderr and "starting in local mode" in out.stderr
    assert "postgresql://postgres:***@" in everything or "postgresql://root:***@" in everything
    leaked = [s for s in secrets if s in everything]
    assert not leaked, f"secrets printed: {leaked}"


async def test_a_debug_run_in_discord_mode_never_logs_an_interaction_token(fake, tmp_path):
    """``python -m bot`` in Discord mode against the fake Discord at LOG_LEVEL=DEBUG, where discord.py logs every
    gateway event (INTERACTION_CREATE carries the interaction's token) and every request URL (the callback and
    the follow-up webhooks carry it in their path): neither the interaction token nor DISCORD_TOKEN is printed."""
    import asyncio
    import signal

    from tests.fakes.discordkit import bot_process_ready, channel_posts

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DALLE_", "DISCORD_", "DATABASE_", "ENGINE_"))}
    env.update(
        DISCORD_TOKEN=DISCORD_TOKEN, DISCORD_API_BASE=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url,
        LOG_LEVEL="DEBUG", SYNC_COMMANDS="true", DATABASE_URL=f"sqlite:///{tmp_path / 'sub.db'}",
        OUTPUT_DIR=str(tmp_path / "out"), DEFAULT_IMAGES="2", ENGINE_TOKEN="engine-token-secret-33",
        DALLE_ENGINE_FACTORY="tests.fakes.engine:inprocess_fake_engine", PYTHONPATH=str(ROOT),
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", env=env, cwd=tmp_path,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await bot_process_ready(fake)
        rec = await fake.slash("dalle", {"prompt": "a red circle", "seed": 4}, user_id=90)
        post = await fake.wait_for(channel_posts(fake), timeout=30)
        assert post.status == 200
        await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path, timeout=30)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    everything = out.decode() + err.decode()
    assert proc.returncode == 0, everything[-3000:]
    assert fake.identifies and fake.identifies[0]["token"] == DISCORD_TOKEN  # the token was really used
    # discord.py really logged what carries the token, masked
    assert "INTERACTION_CREATE" in everything and f"/webhooks/{fake_app_id()}/{MASK}" in everything, everything[-3000:]
    leaked = [s for s in (rec.token, DISCORD_TOKEN, "engine-token-secret-33") if s in everything]
    assert not leaked, f"secrets printed: {leaked}" + "".join(
        "\n" + line[:400] for line in everything.splitlines() if any(s in line for s in leaked))


def fake_app_id() -> int:
    from bench.fakes.discord import APP_ID

    return APP_ID
