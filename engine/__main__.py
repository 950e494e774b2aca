"""Command line of the engine: ``python -m engine <command>``.

Each command is an ``add_<name>(subparsers)`` function in ``COMMANDS`` that registers its sub-parser and sets
``func``; add ``inspect`` and ``generate`` the same way. Heavy imports (JAX, the pipeline) stay inside the
command functions so ``--help`` and the fake server start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo"


def load_checkpoint_pipeline(checkpoint: str | Path, **opts: Any) -> Any:
    """``engine.pipeline.load_pipeline`` imported lazily, with clear errors for a missing module or directory."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise SystemExit(f"error: checkpoint directory not found: {path}")
    try:
        from engine.pipeline import load_pipeline
    except ImportError as exc:
        raise SystemExit(f"error: the model pipeline cannot be imported ({exc}); use --fake to serve the fake") from exc
    return load_pipeline(path, **opts)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.auth import parse_client_tokens
    from engine.server import ServerSettings, serve

    token = args.token if args.token is not None else os.environ.get("ENGINE_TOKEN") or None
    try:
        tokens = parse_client_tokens(os.environ.get("ENGINE_TOKENS"))
    except ValueError as exc:
        print(f"error: ENGINE_TOKENS: {exc}", file=sys.stderr)
        return 2
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        token=token,
        tokens=tokens,
        window_ms=args.window_ms,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        result_ttl=args.result_ttl,
        max_result_bytes=int(args.max_result_mb * 2**20),
        shutdown_grace=args.shutdown_grace,
        shutdown_linger=args.shutdown_linger,
        warmup=not args.no_warmup,
        model_nice=args.model_nice,
    )
    try:
        settings.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.fake:
        from engine.fake import FakePipeline

        pipeline = FakePipeline(
            fixed_latency=args.fake_latency_ms / 1000.0, per_candidate_latency=args.fake_per_candidate_ms / 1000.0
        )
    else:
        from engine.compile_cache import configure

        configure(args.xla_cache_dir)
        opts: dict[str, Any] = {"dtype": args.dtype, "eager_text_programs": not args.no_warmup}
        if args.model_parallel is not None:
            opts["model_parallel"] = args.model_parallel
        if args.native_attention is not None:
            opts["native_attention"] = args.native_attention
        pipeline = load_checkpoint_pipeline(args.checkpoint or DEMO_CHECKPOINT, **opts)
    serve(pipeline, settings)
    return 0


def add_serve(subparsers: Any) -> None:
    from engine import compile_cache
    from engine.priority import DEFAULT_MODEL_NICE

    p = subparsers.add_parser(
        "serve",
        help="run the engine HTTP service",
        description="Serve generation jobs over HTTP (see engine/server.py for the routes).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8808, help="port (default 8808)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: the shipped demo)")
    p.add_argument(
        "--token",
        default=None,
        help="bearer token clients must send (default: env ENGINE_TOKEN; without one, only loopback is allowed). "
        "Env ENGINE_TOKENS=name:token,... gives clients their own tokens: each sees and cancels only its jobs",
    )
    p.add_argument("--window-ms", type=float, default=10.0, help="batching window in milliseconds (default 10)")
    p.add_argument("--max-batch", type=int, default=None, help="cap candidates per pass (default: biggest bucket)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests allowed to wait (default 1024)")
    p.add_argument("--result-ttl", type=float, default=600.0, help="seconds results stay retrievable (default 600)")
    p.add_argument("--max-result-mb", type=float, default=512.0,
                   help="MiB of finished results held at once; the oldest are dropped first (default 512)")
    p.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds to finish work on shutdown")
    p.add_argument("--shutdown-linger", type=float, default=5.0,
                   help="then seconds clients get to fetch results that finished during the drain")
    p.add_argument("--model-nice", type=int, default=DEFAULT_MODEL_NICE,
                   help="nice value of the threads that run the model (Linux), so the service's event loop answers "
                        f"first when they share the cores; 0 turns it off (default {DEFAULT_MODEL_NICE})")
    p.add_argument(
        "--model-parallel",
        type=int,
        default=None,
        help="shard DalleBart over a (data, model) mesh of all devices, this many per model replica "
        "(default: one device)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="DalleBart weights and activations (logits and guidance stay float32); bfloat16 halves the "
                   "memory and is the way to serve Mega on an accelerator (default float32)")
    p.add_argument("--no-warmup", action="store_true",
                   help="compile each batch size on first use instead of while idle after start-up")
    from engine.generate import NATIVE_ATTENTION_HELP

    p.add_argument("--native-attention", action=argparse.BooleanOptionalAction, default=None,
                   help=NATIVE_ATTENTION_HELP)
    compile_cache.add_argument(p)
    p.add_argument("--fake", action="store_true", help="serve the deterministic fake pipeline instead of a model")
    p.add_argument("--fake-latency-ms", type=float, default=0.0, help="fake: fixed cost of one pass")
    p.add_argument("--fake-per-candidate-ms", type=float, default=0.0, help="fake: extra cost per padded candidate")
    p.set_defaults(func=cmd_serve)


def add_inspect(subparsers: Any) -> None:
    from engine.inspection import add_inspect as add

    add(subparsers)


def add_generate(subparsers: Any) -> None:
    from engine.generate import add_generate as add

    add(subparsers)


def add_calibrate(subparsers: Any) -> None:
    from engine.calibrate import add_calibrate as add

    add(subparsers)


COMMANDS: list[Callable[[Any], None]] = [add_serve, add_inspect, add_generate, add_calibrate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="dalle-bot model engine")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(max(logging.WARNING, logging.getLogger().level))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
