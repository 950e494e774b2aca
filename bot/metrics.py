"""Prometheus metrics of one bot process, served on ``METRICS_PORT`` (``GET /metrics``), in their own registry.

Counters and the acknowledgement histogram are this process's own (Prometheus sums them over processes); the
queue and open-case gauges are read from the shared database when scraped, so every process reports the same
backlog. A scrape while the database is down answers with the last values and counts the failure.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from store.models import Status

log = logging.getLogger(__name__)

_ACK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10)  # Discord's deadline is 3 s
REFRESH_TIMEOUT_S = 2.0


class BotMetrics:
    """Queue length, acknowledgement latency, refusals by reason, open cases and results posted."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queued = Gauge("bot_queue_length", "Generations waiting to run (the shared queue)", registry=r)
        self.running = Gauge("bot_generations_running", "Generations running now (all processes)", registry=r)
        self.ack_latency = Histogram(
            "bot_ack_latency_seconds", "Interaction created to /dalle acknowledged", buckets=_ACK_BUCKETS, registry=r
        )
        self.refusals = Counter("bot_refusals", "Requests refused, by reason", ["reason"], registry=r)
        self.open_cases = Gauge("bot_open_cases", "Moderation cases awaiting a decision", registry=r)
        self.results_posted = Counter("bot_results_posted", "Results delivered to Discord or the terminal",
                                      ["outcome"], registry=r)
        self.refresh_errors = Counter("bot_metrics_refresh_errors", "Scrapes that could not read the database",
                                      registry=r)

    def refused(self, category: str | None) -> None:
        """One refusal; ``rate:user`` and the like keep their scope, anything else its category."""
        self.refusals.labels(category or "unknown").inc()

    async def refresh(self, repo: Any) -> None:
        """Read the shared gauges from the database (bounded in time)."""
        counts, open_cases = await asyncio.wait_for(
            asyncio.gather(repo.generation_counts(), repo.open_case_count()), REFRESH_TIMEOUT_S
        )
        self.queued.set(counts.get(Status.QUEUED.value, 0))
        self.running.set(counts.get(Status.RUNNING.value, 0))
        self.open_cases.set(open_cases)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", BotMetrics)
REPO = web.AppKey("repo", object)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    try:
        await metrics.refresh(request.app[REPO])
    except Exception as exc:  # noqa: BLE001 - a scrape must answer; the gauges keep their last values
        metrics.refresh_errors.inc()
        log.warning("metrics: could not read the database (%s)", type(exc).__name__,
                    exc_info=log.isEnabledFor(logging.DEBUG))
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


async def start_metrics_server(metrics: BotMetrics, repo: Any, host: str, port: int) -> web.AppRunner:
    """Serve ``GET /metrics`` on ``host:port`` until the returned runner is cleaned up."""
    app = web.Application()
    app[METRICS] = metrics
    app[REPO] = repo
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%s/metrics", host, port)
    return runner
