"""End to end: a bot with METRICS_PORT serves Prometheus metrics that count what happened in Discord (the fake):
the acknowledgement of ``/dalle``, a refusal by its reason, the posted result, and the shared queue."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.botkit import make_repo
from tests.fakes.discordkit import channel_posts, discord_settings, interaction_callback, start_bot
from tests.fakes.engine import FakeEngine


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def scrape(port: int) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_bot_metrics_count_acknowledgements_refusals_and_posted_results(fake, bot_db_url, tmp_path):
    port = free_port()
    repo = make_repo(bot_db_url)
    engine = FakeEngine(steps=2, step_s=0.01)
    run = await start_bot(discord_settings(tmp_path, METRICS_PORT=str(port)), engine, repo)
    try:
        before = await scrape(port)
        assert before[("bot_ack_latency_seconds_count", ())] == 0
        assert before[("bot_queue_length", ())] == 0

        await fake.slash("dalle", {"prompt": "a red circle", "images": 2, "seed": 1}, user_id=11)
        await fake.wait_for(channel_posts(fake))
        refused = await fake.slash("dalle", {"prompt": "a nude portrait"}, user_id=12)
        await interaction_callback(fake, refused)
        await fake.wait_for(lambda c: c.method == "POST" and c.path.startswith("/webhooks/") and
                            refused.token in c.path)  # the ephemeral refusal

        got = await scrape(port)
        assert got[("bot_ack_latency_seconds_count", ())] == 2
        assert got[("bot_ack_latency_seconds_bucket", (("le", "3.0"),))] == 2  # both inside Discord's deadline
        assert got[("bot_refusals_total", (("reason", "sexual"),))] == 1
        assert got[("bot_results_posted_total", (("outcome", "ok"),))] == 1
        assert got[("bot_queue_length", ())] == 0 and got[("bot_open_cases", ())] == 0
    finally:
        await run.stop()
        await engine.close()
        await repo.close()
    async with aiohttp.ClientSession() as http:  # the endpoint goes with the bot
        try:
            await http.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=2))
            closed = False
        except aiohttp.ClientConnectionError:
            closed = True
    assert closed
