"""The bot's Prometheus endpoint: shared gauges read from the database, counters of this process, and a scrape
that still answers when the database is down."""

from __future__ import annotations

import socket

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.metrics import BotMetrics, start_metrics_server
from store.models import Status
from store.repository import NewImage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        return resp.status, samples(await resp.text())


async def test_metrics_endpoint_reports_the_shared_queue_open_cases_and_this_process_counters(repo):
    await repo.create_generation(user_id=1, prompt="a")
    await repo.create_generation(user_id=2, prompt="b")
    running = await repo.create_generation(user_id=3, prompt="c")
    await repo.set_status(running.id, Status.RUNNING)
    shown = await repo.create_generation(user_id=4, prompt="d")
    rows = await repo.add_images(shown.id, [NewImage(index=0, tokens=np.zeros(256, np.int16), rank=0)])
    await repo.open_case("report", image_id=rows[0].id, reason="nsfw")

    metrics = BotMetrics()
    metrics.refused("sexual")
    metrics.refused("rate:user")
    metrics.refused("rate:user")
    metrics.ack_latency.observe(0.04)
    metrics.results_posted.labels("ok").inc()
    port = free_port()
    runner = await start_metrics_server(metrics, repo, "127.0.0.1", port)
    try:
        status, got = await scrape(port)
    finally:
        await runner.cleanup()
    assert status == 200
    assert got[("bot_queue_length", ())] == 3  # four created (a new one starts queued), one moved to running
    assert got[("bot_generations_running", ())] == 1
    assert got[("bot_open_cases", ())] == 1
    assert got[("bot_refusals_total", (("reason", "rate:user"),))] == 2
    assert got[("bot_refusals_total", (("reason", "sexual"),))] == 1
    assert got[("bot_ack_latency_seconds_count", ())] == 1
    assert got[("bot_ack_latency_seconds_bucket", (("le", "0.05"),))] == 1
    assert got[("bot_results_posted_total", (("outcome", "ok"),))] == 1
    assert got[("bot_metrics_refresh_errors_total", ())] == 0


class BrokenRepo:
    async def generation_counts(self):
        raise ConnectionRefusedError("database down")

    async def open_case_count(self):
        return 0


@pytest.mark.parametrize("backend", ["none"])  # no database at all: a stand-in that fails like a dead server
async def test_a_scrape_while_the_database_is_down_answers_with_the_last_values(backend):
    metrics = BotMetrics()
    metrics.queued.set(7)
    port = free_port()
    runner = await start_metrics_server(metrics, BrokenRepo(), "127.0.0.1", port)
    try:
        status, got = await scrape(port)
    finally:
        await runner.cleanup()
    assert status == 200
    assert got[("bot_queue_length", ())] == 7
    assert got[("bot_metrics_refresh_errors_total", ())] == 1
