"""``python -m engine generate "prompt"``: images, a grid and ``result.json`` from a checkpoint, no bot needed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import secrets
import time
from pathlib import Path
from typing import Any

from PIL import Image

from engine.api import (
    GRID_IMAGES,
    MAX_IMAGES_PER_REQUEST,
    BadRequest,
    GeneratedImage,
    GenerationRequest,
    SamplingParams,
)


def make_grid(pngs: list[bytes], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Images (PNG bytes, equal sizes) in rows of ``columns`` (default: a near-square grid)."""
    import io

    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def image_record(im: GeneratedImage, seed: int, filename: str) -> dict[str, Any]:
    return {
        "file": filename,
        "seed": seed,
        "index": im.index,
        "rank": im.rank,
        "clip_score": round(im.clip_score, 6),
        "safety": im.safety,
        "flagged": im.flagged,
    }


NATIVE_ATTENTION_HELP = ("decode self- and cross-attention through our C++ kernels (engine/attention/native; "
                         "built with g++ on first use): the default for float32 on CPU; --no-native-attention keeps "
                         "XLA's attention (tokens may differ between the two in rare steps)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from engine.pipeline import load_pipeline

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    request = GenerationRequest(
        args.prompt,
        n=args.n,
        seed=seed,
        params=SamplingParams(args.scale, args.top_k, args.top_p, args.temperature),
    )
    request.validate()
    from engine.compile_cache import configure

    configure(args.xla_cache_dir)
    t0 = time.perf_counter()
    pipeline = load_pipeline(args.checkpoint, dtype=args.dtype, buckets=(1, 2, 4, 8, 9, 16),
                             eager_text_programs=False,  # one request: compile only what it needs
                             native_attention=args.native_attention)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = pipeline.generate([request])[0]
    t_generate = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for im in result.images:
        name = f"rank{im.rank:02d}_index{im.index:02d}.png"
        (out / name).write_bytes(im.png)
        records.append(image_record(im, seed, name))
    make_grid([im.png for im in result.images]).save(out / "grid.png")
    summary = {
        "prompt": args.prompt,
        "seed": seed,
        "checkpoint": result.checkpoint_id,
        "attention": result.attention,
        "params": dataclasses.asdict(request.params.resolve(pipeline.sampling_defaults)),
        "images": records,
        "timings": {"load_s": round(t_load, 3), "generate_s": round(t_generate, 3),
                    **{k: round(v, 3) for k, v in result.timings.items()}},
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.checkpoint import CheckpointMissing
    from engine.config import ConfigError
    from engine.weights import CheckpointError

    try:
        summary = run(args)
    except (BadRequest, CheckpointMissing, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}")
        return 2
    out = Path(args.out)
    for rec in summary["images"]:
        flag = "  FLAGGED" if rec["flagged"] else ""
        print(f"{out / rec['file']}  clip={rec['clip_score']:.3f}{flag}")
    print(f"{out / 'grid.png'}\n{out / 'result.json'}  (seed {summary['seed']}, "
          f"{summary['timings']['generate_s']:.1f} s incl. compile)")
    return 0


def add_generate(subparsers: Any) -> None:
    from engine.checkpoint import DEFAULT_CHECKPOINT

    p = subparsers.add_parser("generate", help="generate images for one prompt")
    p.add_argument("prompt")
    p.add_argument("--n", type=int, default=GRID_IMAGES,
                   help=f"number of candidates (1-{MAX_IMAGES_PER_REQUEST}, default {GRID_IMAGES})")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output directory (default ./outputs)")
    p.add_argument("--scale", type=float, default=None,
                   help="super-conditioning scale (default: the checkpoint's recommendation, else 10)")
    p.add_argument("--top-k", type=int, default=None, help="top-k, 0 = off (default: the checkpoint's, else 50)")
    p.add_argument("--top-p", type=float, default=None, help="top-p (default: the checkpoint's, else 1.0 = off)")
    p.add_argument("--temperature", type=float, default=None, help="(default: the checkpoint's, else 1.0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--native-attention", action=argparse.BooleanOptionalAction, default=None,
                   help=NATIVE_ATTENTION_HELP)
    from engine import compile_cache

    compile_cache.add_argument(p)
    p.set_defaults(func=cmd_generate)



