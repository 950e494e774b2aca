"""Dynamic batching against no batching, measured in one run: ``python -m bench.engine [--checkpoint DIR]``.

``--clients`` concurrent clients (default 16) each send ``--requests`` requests one after another and wait for
each result. Two modes share one pipeline object: *batched* (the window and every bucket) and *unbatched*
(window 0, at most 1 candidate per pass). Printed: images/s, p50/p95 latency, passes, and the ratios.

By default the deterministic fake pipeline stands in for the model with an accelerator-like cost model
(``--fake-fixed-ms`` per pass + ``--fake-per-candidate-ms`` per padded candidate); ``--checkpoint DIR`` loads
the real pipeline (``engine.pipeline.load_pipeline``) instead and warms every bucket up before timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from engine.api import GenerationRequest, Pipeline
from engine.batching import pass_sizes


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_mode(
    pipeline: Pipeline,
    *,
    window_ms: float,
    max_batch: int | None,
    clients: int,
    requests: int,
    n: int,
    transport: str,
) -> dict[str, Any]:
    """Run the closed-loop client population once; returns throughput, latency percentiles and pass counts."""
    from engine.client import HttpEngine, InProcessEngine
    from engine.server import ServerSettings, start_server

    async with contextlib.AsyncExitStack() as stack:
        if transport == "http":
            server = await start_server(
                pipeline, ServerSettings(port=0, window_ms=window_ms, max_batch=max_batch, shutdown_grace=0)
            )
            stack.push_async_callback(server.stop)
            metrics = server.batcher.metrics
            engines = [HttpEngine(server.url, timeout=600) for _ in range(clients)]
            for e in engines:
                stack.push_async_callback(e.close)
        else:
            engine = InProcessEngine(pipeline, window_ms=window_ms, max_batch=max_batch)
            stack.push_async_callback(engine.close)
            metrics = engine.batcher.metrics
            engines = [engine] * clients
        latencies: list[float] = []
        images = 0

        async def client(c: int) -> None:
            nonlocal images
            for k in range(requests):
                req = GenerationRequest(f"bench prompt {c % 7}", n=n, seed=c * 1000 + k)
                t0 = time.perf_counter()
                rid = await engines[c].submit(req)
                res = await engines[c].result(rid)
                latencies.append(time.perf_counter() - t0)
                images += len(res.images)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        passes = int(metrics.pipeline_calls._value.get())
    return {
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "mean_s": statistics.fmean(latencies),
        "passes": passes,
        "candidates_per_pass": images / max(passes, 1),
    }


def warm_up(pipeline: Pipeline, images: int | None = None) -> None:
    """Compile before timing: one pass at every bucket (buckets above the per-request image limit are filled
    with several requests, as the batcher fills them), and, when ``images`` is given, one pass of r requests
    of ``images`` images for every r the batcher can pack into a pass."""
    passes = [pass_sizes(bucket) for bucket in sorted(pipeline.batch_buckets)]
    if images:
        passes += [[images] * r for r in range(1, max(pipeline.batch_buckets) // images + 1)]
    for p, sizes in enumerate(passes):
        pipeline.generate([GenerationRequest(f"warm-up {k}", n=n, request_id=f"warm-{p}-{k}")
                           for k, n in enumerate(sizes)],
                          on_progress=lambda *_: None, should_cancel=lambda _: False)  # the batcher's code path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="real checkpoint directory (default: the fake pipeline)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    p.add_argument("--n", type=int, default=2, help="images per request")
    p.add_argument("--window-ms", type=float, default=10.0, help="batching window of the batched mode")
    p.add_argument("--transport", choices=("http", "inprocess"), default="http")
    p.add_argument("--fake-fixed-ms", type=float, default=50.0, help="fake: cost of one pass")
    p.add_argument("--fake-per-candidate-ms", type=float, default=2.0, help="fake: cost per padded candidate")
    p.add_argument("--buckets", default="1,2,4,8,16", help="fake: batch buckets")
    args = p.parse_args(argv)

    if args.checkpoint:
        from engine.__main__ import load_checkpoint_pipeline

        try:
            pipeline = load_checkpoint_pipeline(args.checkpoint)
        except (SystemExit, Exception) as exc:
            print(f"cannot load checkpoint {args.checkpoint}: {exc}; nothing measured", file=sys.stderr)
            return 2
        source = f"checkpoint {args.checkpoint} ({pipeline.checkpoint_id})"
        warm_up(pipeline, args.n)
    else:
        from engine.fake import FakePipeline

        buckets = tuple(int(b) for b in args.buckets.split(","))
        pipeline = FakePipeline(
            batch_buckets=buckets,
            fixed_latency=args.fake_fixed_ms / 1000.0,
            per_candidate_latency=args.fake_per_candidate_ms / 1000.0,
        )
        source = (
            f"fake pipeline ({args.fake_fixed_ms:g} ms/pass + {args.fake_per_candidate_ms:g} ms/padded candidate, "
            f"buckets {buckets})"
        )

    common = dict(clients=args.clients, requests=args.requests, n=args.n, transport=args.transport)
    print(f"engine batching bench: {source}")
    print(f"{args.clients} clients x {args.requests} requests x {args.n} images, transport {args.transport}")
    modes = {
        f"batched (window {args.window_ms:g} ms, buckets up to {max(pipeline.batch_buckets)})": asyncio.run(
            run_mode(pipeline, window_ms=args.window_ms, max_batch=None, **common)
        ),
        "unbatched (window 0, bucket 1)": asyncio.run(run_mode(pipeline, window_ms=0.0, max_batch=1, **common)),
    }
    print(f"{'mode':<44} {'images/s':>9} {'p50 s':>8} {'p95 s':>8} {'passes':>7} {'cand/pass':>9}")
    for name, r in modes.items():
        print(
            f"{name:<44} {r['images_per_s']:>9.2f} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f} "
            f"{r['passes']:>7d} {r['candidates_per_pass']:>9.2f}"
        )
    batched, unbatched = modes.values()
    print(f"throughput ratio batched/unbatched: {batched['images_per_s'] / unbatched['images_per_s']:.2f}x")
    print(f"p50 latency ratio unbatched/batched: {unbatched['p50_s'] / batched['p50_s']:.2f}x")
    print(f"p95 latency ratio unbatched/batched: {unbatched['p95_s'] / batched['p95_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
