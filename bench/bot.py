"""The whole bot under a burst of users: ``python -m bench bot [--users 100] [--checkpoint DIR]``.

The strict fake Discord runs in its own process (``bench/fakes/discord_process.py``); this process runs the real
bot: discord.py ``AutoShardedBot`` + ``GenerationService`` + SQLite in a temporary directory + an
``InProcessEngine`` over the pipeline. ``--users`` users each send ``/dalle`` (``--images`` images) at once, or
``--rate`` per second. Measured, all by the fake's clock:

- acknowledgement latency: dispatch of INTERACTION_CREATE → the bot's defer callback (p50/p95/p99/max);
- time to result: dispatch → the result message posted to the channel;
- bot images/s: images delivered / (last result posted − first dispatch).

In the same run, the engine alone serves the same number of requests and images, submitted at once straight
through an ``InProcessEngine`` over the same pipeline (before and after the bot; the mean is the baseline),
and the bot's images/s is printed as a share of it. Targets (issue): ack p99 < 500 ms, share ≥ 90 %.

The default pipeline is the deterministic fake with ``bench engine``'s default cost model and buckets
(50 ms/pass + 2 ms/padded candidate, buckets 1..16); ``--checkpoint DIR`` loads a real checkpoint and warms
every bucket up first. ``--workers`` sets the service's engine concurrency (ENGINE_CONCURRENCY, default 16); a list
(``2,16``) runs one bot round per value against one shared baseline.

``--engine-url URL`` measures the hosted layout instead: the model runs in its own process
(``python -m engine serve``, started by you), and both the baseline and the bot talk to it through
``HttpEngine``, so the bot's Python work does not share a GIL with the pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.engine import percentile, warm_up
from bot.outcome import MAX_IMAGES
from engine.api import GenerationRequest, Pipeline

if TYPE_CHECKING:
    from bot.config import Settings

ROOT = Path(__file__).resolve().parents[1]
ACK_TARGET_S = 0.5
SHARE_TARGET = 0.90


# -- the fake Discord process --------------------------------------------------------------------------------


class FakeDiscordProcess:
    """``bench.fakes.discord_process`` as a child process; ``call`` sends one command and returns its reply."""

    def __init__(self, proc: asyncio.subprocess.Process, api_base: str, gateway_url: str) -> None:
        self.proc, self.api_base, self.gateway_url = proc, api_base, gateway_url

    @classmethod
    async def start(cls, timeout: float = 60.0) -> FakeDiscordProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fakes.discord_process", cwd=str(ROOT), env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)  # type: ignore[union-attr]
            hello = json.loads(line) if line else None
        except (TimeoutError, json.JSONDecodeError):
            hello = None
        if not hello:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError("the fake Discord process did not start (see its stderr above)")
        return cls(proc, hello["api_base"], hello["gateway_url"])

    async def call(self, cmd: str, timeout: float = 600.0, **args: Any) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the fake Discord process exited during {cmd!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"fake Discord: {reply['error']}")
        return reply

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("quit", timeout=10)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@contextlib.contextmanager
def discord_pointed_at(api_base: str, gateway_url: str):
    """Route discord.py's REST and gateway to the fake (the two class attributes; restored afterwards)."""
    import discord
    import yarl

    saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved


# -- one bot round -------------------------------------------------------------------------------------------


def bot_settings(workdir: Path, images: int, workers: int | None) -> Settings:
    """Production defaults (``bot.config.Settings``) except limits that would refuse a deliberate burst from one
    guild."""
    from bot.config import load_settings

    env = dict(SYNC_COMMANDS="true", DATABASE_URL=f"sqlite:///{workdir / 'bench.db'}", AUTO_MIGRATE="true",
               OUTPUT_DIR=str(workdir / "out"), DEFAULT_IMAGES=str(images), RATE_LIMIT_USER="1000 per minute",
               RATE_LIMIT_GUILD="1000000 per minute", DAILY_QUOTA="0", MAX_QUEUE_PER_USER="5",
               MAX_QUEUE_TOTAL="100000")
    if workers is not None:
        env["ENGINE_CONCURRENCY"] = str(workers)
    return load_settings(env, dotenv_path=None)


EngineFactory = Callable[[], Any]


def engine_factory(pipeline: Pipeline | None, window_ms: float, engine_url: str | None) -> EngineFactory:
    """A fresh engine per round: in-process over ``pipeline``, or an ``HttpEngine`` client of a running service."""
    if engine_url:
        from engine.client import HttpEngine

        token = os.environ.get("ENGINE_TOKEN") or None
        return lambda: HttpEngine(engine_url, token, timeout=600.0)
    from engine.client import InProcessEngine

    return lambda: InProcessEngine(pipeline, window_ms=window_ms)


async def bot_round(fake: FakeDiscordProcess, make_engine: EngineFactory, *, users: int, images: int, rate: float,
                    workers: int | None, user_base: int, timeout: float) -> dict[str, Any]:
    """Start a fresh bot (new database), send the burst, collect what the fake saw, stop the bot."""
    from bot.app import create_bot

    with tempfile.TemporaryDirectory(prefix="bench-bot-") as tmp:
        engine = make_engine()
        bot = create_bot(bot_settings(Path(tmp), images, workers), engine, guild_ready_timeout=0.05)
        ready = asyncio.Event()

        async def on_ready() -> None:
            ready.set()

        bot.add_listener(on_ready, "on_ready")
        task = asyncio.create_task(bot.start("bench-token"))
        try:
            await asyncio.wait_for(asyncio.wait({task, asyncio.ensure_future(ready.wait())},
                                                return_when=asyncio.FIRST_COMPLETED), 60)
            if task.done():
                task.result()  # raises the start failure
            if not ready.is_set():
                raise RuntimeError("the bot did not become ready within 60 s")
            await fake.call("reset")
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await fake.call("burst", users=users, images=images, rate=rate, user_base=user_base)
            seen = await fake.call("collect", timeout=timeout + 30, wait_s=timeout)
            seen["fake_cpu_share"] = seen.pop("cpu_share", float("nan"))
            # CPU seconds of this process (event loop + engine thread) per wall second of the round: near 1.0
            # means the bot is bound by its own Python work (one GIL), not by the engine
            seen["cpu_share"] = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
            seen["workers"] = bot.service.runner.concurrency if bot.service else workers
        finally:
            await bot.close()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 30)
            await engine.close()
    return summarise_bot(seen, users, images)


def summarise_bot(seen: dict, users: int, images: int) -> dict[str, Any]:
    recs = seen["users"]
    acks = [r["ack_s"] for r in recs if r["ack_s"] is not None]
    good_acks = [r for r in recs if r["ack_status"] == 200 and r["ack_type"] == 5]
    results = [r["result_s"] for r in recs if r["result_s"] is not None]
    delivered = sum(r["images"] for r in recs)
    last = max((r["result_at_s"] for r in recs if r["result_at_s"] is not None), default=float("nan"))
    return {
        "workers": seen.get("workers"),
        "users": users,
        "acked": len(good_acks),
        "answered": len(results),
        "complete_users": sum(1 for r in recs if r["images"] == images and r["result_status"] == 200),
        "images": delivered,
        "wall_s": last,
        "images_per_s": delivered / last if last and last == last and last > 0 else 0.0,
        "ack_p50_s": percentile(acks, 50), "ack_p95_s": percentile(acks, 95), "ack_p99_s": percentile(acks, 99),
        "ack_max_s": max(acks, default=float("nan")),
        "result_p50_s": percentile(results, 50), "result_p95_s": percentile(results, 95),
        "result_max_s": max(results, default=float("nan")),
        "fake_errors": seen["error_count"], "fake_error_sample": seen["errors"][:5], "unknown_routes": seen["unknown"],
        "complete": bool(seen["complete"]),
        "bot_cpu_share": seen.get("cpu_share", float("nan")),
        "fake_cpu_share": seen.get("fake_cpu_share", float("nan")),
    }


# -- the engine alone ----------------------------------------------------------------------------------------


async def engine_round(make_engine: EngineFactory, *, requests: int, images: int, rate: float) -> dict[str, Any]:
    """The same requests straight through the engine (no bot): released like the users, all awaited."""
    engine = make_engine()
    latencies: list[float] = []
    delivered = 0
    try:
        t0 = time.perf_counter()

        async def one(k: int) -> None:
            nonlocal delivered
            if rate > 0:
                await asyncio.sleep(max(0.0, t0 + k / rate - time.perf_counter()))
            start = time.perf_counter()
            rid = await engine.submit(GenerationRequest(f"bench prompt {k % 7}", n=images, seed=k))
            res = await engine.result(rid)
            latencies.append(time.perf_counter() - start)
            delivered += len(res.images)

        await asyncio.gather(*(one(k) for k in range(requests)))
        wall = time.perf_counter() - t0
    finally:
        await engine.close()
    return {"images": delivered, "wall_s": wall, "images_per_s": delivered / wall,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95)}


# -- command line --------------------------------------------------------------------------------------------


def make_pipeline(args: argparse.Namespace) -> tuple[Pipeline | None, str]:
    if args.engine_url:
        return None, f"engine service at {args.engine_url} (python -m engine serve, its own process)"
    if args.checkpoint:
        from engine.__main__ import load_checkpoint_pipeline

        pipeline = load_checkpoint_pipeline(args.checkpoint)
        warm_up(pipeline, args.images)
        return pipeline, f"checkpoint {args.checkpoint} ({pipeline.checkpoint_id}), buckets {pipeline.batch_buckets}"
    from engine.fake import FakePipeline

    buckets = tuple(int(b) for b in args.buckets.split(","))
    pipeline = FakePipeline(batch_buckets=buckets, fixed_latency=args.fake_fixed_ms / 1000.0,
                            per_candidate_latency=args.fake_per_candidate_ms / 1000.0)
    return pipeline, (f"fake pipeline ({args.fake_fixed_ms:g} ms/pass + {args.fake_per_candidate_ms:g} ms/padded "
                      f"candidate, buckets {buckets})")


def _ms(x: float) -> str:
    return "n/a" if x != x else f"{1000 * x:.0f}"


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


async def run(args: argparse.Namespace, pipeline: Pipeline | None, workers: list[int | None]) -> dict[str, Any]:
    make_engine = engine_factory(pipeline, args.window_ms, args.engine_url)
    if args.engine_url:  # the service compiles each batch bucket on first use: one unmeasured round first
        await engine_round(make_engine, requests=args.users, images=args.images, rate=args.rate)
    engine_runs = [await engine_round(make_engine, requests=args.users, images=args.images, rate=args.rate)]
    fake = await FakeDiscordProcess.start()
    rounds = []
    try:
        with discord_pointed_at(fake.api_base, fake.gateway_url):
            for k, w in enumerate(workers):
                rounds.append(await bot_round(fake, make_engine, users=args.users, images=args.images,
                                              rate=args.rate, workers=w, user_base=100_000 * (k + 1),
                                              timeout=args.timeout))
    finally:
        await fake.close()
    if not args.quick:
        engine_runs.append(await engine_round(make_engine, requests=args.users, images=args.images,
                                              rate=args.rate))
    return {"engine_runs": engine_runs, "rounds": rounds}


def report(args: argparse.Namespace, source: str, out: dict[str, Any], load_before: str, load_after: str) -> bool:
    engine_runs, rounds = out["engine_runs"], out["rounds"]
    engine_ips = statistics.fmean(r["images_per_s"] for r in engine_runs)
    burst = "at once" if args.rate <= 0 else f"{args.rate:g}/s"
    print(f"bot bench: {source}")
    print(f"{args.users} users x 1 /dalle x {args.images} images, released {burst}; fake Discord in its own process; "
          f"batch window {args.window_ms:g} ms")
    print("engine alone (same requests, no bot): " + ", ".join(
        f"{r['images_per_s']:.1f} images/s in {r['wall_s']:.2f} s" for r in engine_runs)
        + f" -> baseline {engine_ips:.1f} images/s")
    ok = True
    lines = [
        "| workers | users | acked | results | ack p50 ms | ack p95 ms | ack p99 ms | ack max ms | result p50 s "
        "| result max s | bot images/s | engine images/s | share | bot CPU | fake Discord CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        share = r["images_per_s"] / engine_ips if engine_ips else float("nan")
        r["share"] = share
        lines.append(
            f"| {r['workers']} | {r['users']} | {r['acked']} | {r['complete_users']} | {_ms(r['ack_p50_s'])} "
            f"| {_ms(r['ack_p95_s'])} | {_ms(r['ack_p99_s'])} | {_ms(r['ack_max_s'])} | {r['result_p50_s']:.2f} "
            f"| {r['result_max_s']:.2f} | {r['images_per_s']:.1f} | {engine_ips:.1f} | {100 * share:.0f}% "
            f"| {100 * r['bot_cpu_share']:.0f}% | {100 * r['fake_cpu_share']:.0f}% |")
        verdict_ack = "meets" if r["ack_p99_s"] < ACK_TARGET_S else "MISSES"
        verdict_share = "meets" if share >= SHARE_TARGET else "MISSES"
        print(f"workers={r['workers']}: ack p99 {_ms(r['ack_p99_s'])} ms ({verdict_ack} < {_ms(ACK_TARGET_S)} ms); "
              f"bot {r['images_per_s']:.1f} images/s = {100 * share:.0f}% of the engine ({verdict_share} >= "
              f"{SHARE_TARGET:.0%}); acked {r['acked']}/{r['users']}, results {r['complete_users']}/{r['users']}, "
              f"fake errors {r['fake_errors']}, unknown routes {len(r['unknown_routes'])}")
        if r["fake_errors"]:
            print(f"  fake refused: {r['fake_error_sample']}")
        if r["unknown_routes"]:
            print(f"  unknown routes: {r['unknown_routes']}")
        ok = ok and r["complete"] and r["acked"] == r["users"] and r["complete_users"] == r["users"]
    print()
    print("\n".join(lines))
    print(f"\nload average before {load_before}, after {load_after} (1/5/15 min); {os.cpu_count()} CPUs; "
          "bot CPU = CPU seconds of the bot process per wall second of the round (fake Discord CPU: the same for the "
          "fake's process, which a real deployment does not have on its machine)")
    if not ok:
        print("error: not every user was acknowledged and answered with all images", file=sys.stderr)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench bot", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--images", type=int, default=4, help=f"images per /dalle (1-{MAX_IMAGES})")
    p.add_argument("--rate", type=float, default=0.0, help="users released per second (0: all at once)")
    p.add_argument("--workers", default=None,
                   help="service engine concurrency; a comma list runs one bot round each (default: the bot's own)")
    p.add_argument("--window-ms", type=float, default=10.0, help="batching window of the InProcessEngine")
    p.add_argument("--checkpoint", default=None, help="real checkpoint directory (default: the fake pipeline)")
    p.add_argument("--engine-url", default=None,
                   help="use a running `python -m engine serve` at this URL (token: env ENGINE_TOKEN) instead of "
                        "an in-process engine")
    p.add_argument("--fake-fixed-ms", type=float, default=None, help="fake: cost of one pass (default 50; quick 10)")
    p.add_argument("--fake-per-candidate-ms", type=float, default=None,
                   help="fake: cost per padded candidate (default 2; quick 0.5)")
    p.add_argument("--buckets", default="1,2,4,8,16", help="fake: batch buckets")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every result of a round")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: one engine baseline, cheap fake passes")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.users < 1:
        p.error("--users must be at least 1")
    if args.engine_url and args.checkpoint:
        p.error("--engine-url and --checkpoint are exclusive (the service loads its own checkpoint)")
    if not 1 <= args.images <= MAX_IMAGES:
        p.error(f"--images must be between 1 and {MAX_IMAGES}")
    try:
        workers = [None] if args.workers is None else [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers must be a comma list of integers, not {args.workers!r}")
    if any(w is not None and w < 1 for w in workers):
        p.error("--workers values must be at least 1")
    if args.fake_fixed_ms is None:
        args.fake_fixed_ms = 10.0 if args.quick else 50.0
    if args.fake_per_candidate_ms is None:
        args.fake_per_candidate_ms = 0.5 if args.quick else 2.0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("discord", "bot", "engine"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    try:
        pipeline, source = make_pipeline(args)
    except (SystemExit, Exception) as exc:  # noqa: BLE001 - one line, nothing measured
        print(f"cannot load checkpoint {args.checkpoint}: {exc}; nothing measured", file=sys.stderr)
        return 2
    load_before = loadavg()
    out = asyncio.run(run(args, pipeline, workers))
    ok = report(args, source, out, load_before, loadavg())
    if args.json:
        Path(args.json).write_text(json.dumps({"source": source, "args": vars(args), "ok": ok, **out}, indent=2,
                                              default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
