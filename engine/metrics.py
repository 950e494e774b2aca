"""Prometheus metrics of one engine instance, in their own registry (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 9, 16, 32, 64, 128, 256)  # 9: one default /dalle


class EngineMetrics:
    """Queue depth, batch sizes, latencies, throughput and errors of one batcher (and its HTTP front)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("engine_queue_depth", "Requests waiting for a sampling pass", registry=r)
        self.running = Gauge("engine_running_requests", "Requests started and not finished", registry=r)
        self.batch_candidates = Histogram(
            "engine_batch_size", "Candidates (images) per sampling pass", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "engine_batch_requests", "Requests (or request parts) per sampling pass", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "engine_batch_seconds", "Wall time of one pipeline pass", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "engine_queue_wait_seconds", "Submit to start of sampling", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "engine_request_latency_seconds", "Submit to result of done requests", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.pipeline_calls = Counter("engine_pipeline_calls", "Calls into Pipeline.generate", registry=r)
        self.images = Counter("engine_images", "Images delivered to requesters", registry=r)
        self.image_tokens = Counter("engine_image_tokens", "Image tokens sampled for delivered images", registry=r)
        self.requests = Counter("engine_requests", "Requests that reached a final state", ["outcome"], registry=r)
        self.errors = Counter("engine_errors", "Errors by kind", ["kind"], registry=r)

    def render(self) -> bytes:
        """The exposition text of this registry."""
        return generate_latest(self.registry)
