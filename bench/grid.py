"""Seconds for one ``/dalle`` grid end to end: prompt → n candidates → VQGAN decode → CLIP rank → PNGs.

``python -m bench grid [--config mega|mini|tiny] [--checkpoint DIR] [--n 9] [--dtype bfloat16]
[--layouts auto,published,transposed] [--buckets auto,9] [--repeats 3] [--no-clip] [--vqgan-dtype float32]
[--png-threads N] [--out DIR] [--json FILE]``

The product's unit of work is a grid, not a decoder step: this times :meth:`engine.pipeline.ModelPipeline.generate`
on one request of ``n`` candidates (``n=9``: the 3×3 grid that issue 4 sets a target for, < 2 s for Mega in
bfloat16 on one H100), with the timings the pipeline itself reports (``sample_s``: encoder + all
``image_length`` decoder steps + the tokens back on the host; ``decode_s``: VQGAN; ``rank_s``: CLIP image and
text embeddings and the safety scores; ``encode_s``: PNG encoding, on the pipeline's PNG threads; ``total_s``: all
of it plus the host work between).

Weights: ``--config mega|mini`` builds the published shapes (DalleBart preset, ``vqgan-f16``, ``clip-b32``) with
random values drawn ON the default device (seconds even for Mega's 2.6 B parameters, no file written), and
tokenizers trained on a small built-in corpus; ``tiny`` is the test-sized triple of
:func:`training.fixtures.tiny_configs`; ``--checkpoint DIR`` loads a real checkpoint instead (the shipped demo:
``engine/assets/demo``). Random weights make noise images, but the work per grid is the real one.

Baseline in the same run: the first call of each pipeline (compiles every program) against the timed calls, and
the decoder loop against its roofline (``bench.roofline.decode_step_cost`` × ``image_length`` over the matmul
rate in ``--dtype`` and the bandwidth measured at the start of the run on the same device). ``--layouts``
compares the sampler's kernel layouts (``engine.sampling.default_transposed_kernels``: transposed on CPU,
published on accelerators) on the same weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.api import GRID_IMAGES, MAX_IMAGES_PER_REQUEST

PROMPT = "a red circle on the left of a small blue square"
LAYOUTS = ("auto", "published", "transposed")


@functools.cache
def _normal_program(shape: tuple[int, ...]) -> Any:
    """A jitted N(0, std) draw of one shape. One program per distinct shape: a single program drawing a whole
    model's tree took 3.4 minutes to compile for Mega on an H200 (XLA GPU), these take well under a second each."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda key, std: jax.random.normal(key, shape, jnp.float32) * std)


def device_random_like(shapes: Any, seed: int, std: float) -> Any:
    """Random float32 leaves for a tree of shapes, drawn on the default device (:func:`training.fixtures.random_like`
    statistics: N(0, std) weights, norm scales 1 and biases 0, CLIP's logit scale)."""
    import jax
    import jax.numpy as jnp

    from training.fixtures import CONSTANT_LEAVES, leaf_name

    base = jax.random.PRNGKey(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        constant = CONSTANT_LEAVES.get(leaf_name(path))
        if constant is not None:
            out.append(jnp.full(leaf.shape, constant, jnp.float32))
        else:
            out.append(_normal_program(tuple(leaf.shape))(jax.random.fold_in(base, i), jnp.float32(std)))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_parts(name: str, seed: int, workdir: Path) -> dict[str, Any]:
    """Configs, on-device random params and tokenizers for ``name`` (mega, mini, tiny)."""
    import jax

    from engine.config import ConfigError, DalleBartConfig, preset
    from engine.models import clip as clip_model
    from engine.models import vqgan as vqgan_model
    from engine.models.dallebart import param_shapes
    from engine.text import CLIPTokenizer, DalleBartTokenizer
    from training.fixtures import CORPUS, tiny_configs
    from training.tokenizer import train_bpe, train_clip_bpe

    if name == "tiny":
        db_cfg, vq_cfg, clip_cfg = tiny_configs()
    else:
        db_cfg = preset(name)
        if not isinstance(db_cfg, DalleBartConfig):
            raise ConfigError(f"--config {name!r} is not a DalleBart preset (mini, mega) nor tiny")
        vq_cfg, clip_cfg = preset("vqgan-f16"), preset("clip-b32")
    std = db_cfg.init_std
    t0 = time.perf_counter()
    db = device_random_like(param_shapes(db_cfg), seed, std)
    vq = device_random_like(vqgan_model.param_shapes(vq_cfg, norm_groups=vq_cfg.norm_groups), seed + 1, 0.02)
    clip = device_random_like(clip_model.param_shapes(clip_cfg), seed + 2, 0.02)
    jax.block_until_ready((db, vq, clip))
    weights_s = time.perf_counter() - t0
    # tokenizers from the small corpus: ids stay below each model's vocabulary, whatever its size
    bart_dir = train_bpe(CORPUS, min(db_cfg.encoder_vocab_size, 1024), workdir / "tok_bart")
    clip_dir = train_clip_bpe(CORPUS, min(clip_cfg.text_config.vocab_size, 1024), workdir / "tok_clip")
    return dict(
        dallebart_config=db_cfg, dallebart_params=db, vqgan_config=vq_cfg, vqgan_params=vq,
        clip_config=clip_cfg, clip_params=clip,
        tokenizer=DalleBartTokenizer.from_dir(bart_dir, max_length=db_cfg.max_text_length),
        clip_tokenizer=CLIPTokenizer.from_dir(clip_dir, max_length=clip_cfg.text_config.max_position_embeddings),
        weights_s=weights_s,
    )


def time_grid(pipeline: Any, n: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """First call (compiles) then ``repeats`` timed calls of one request of ``n`` candidates."""
    from engine.api import GenerationRequest

    t0 = time.perf_counter()
    first = pipeline.generate([GenerationRequest(PROMPT, n=n, seed=seed)])[0]
    first_s = time.perf_counter() - t0
    runs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        res = pipeline.generate([GenerationRequest(PROMPT, n=n, seed=seed + 1 + r)])[0]
        wall = time.perf_counter() - t0
        runs.append(dict(res.timings, wall_s=wall))
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "total_s", "sample_s", "decode_s", "rank_s",
                                                         "encode_s")}
    return {"first_s": first_s, "runs": runs, "median": med, "min_wall_s": min(r["wall_s"] for r in runs),
            "pngs": [img.png for img in res.images], "first_pngs": [img.png for img in first.images]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench grid", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="mega", help="mega, mini or tiny: published shapes, random weights")
    ap.add_argument("--checkpoint", default=None, help="a real checkpoint directory instead of --config")
    ap.add_argument("--n", type=int, default=GRID_IMAGES, help=f"candidates in the grid (default {GRID_IMAGES}: 3x3)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--vqgan-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--layouts", default="auto",
                    help="comma list of sampler kernel layouts: auto, published, transposed (default auto)")
    ap.add_argument("--buckets", default="auto",
                    help="comma list: auto (the engine's buckets, engine.api.DEFAULT_BUCKETS) and/or row counts to "
                    "run the grid as exactly (each layout is timed with each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-clip", action="store_true", help="skip CLIP ranking and safety")
    ap.add_argument("--png-threads", type=int, default=None,
                    help="threads that PNG-encode a grid (default: the pipeline's, one per core up to 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the last grid's PNG here (grid.png)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in args.layouts if x not in LAYOUTS]
    if bad or not args.layouts:
        ap.error(f"--layouts: {', '.join(bad) or 'empty'}; choose from {', '.join(LAYOUTS)}")
    if args.checkpoint is not None and args.layouts != ["auto"]:
        ap.error("--layouts other than auto need --config (random weights), not --checkpoint")
    if not 1 <= args.n <= MAX_IMAGES_PER_REQUEST:
        ap.error(f"--n must be between 1 and {MAX_IMAGES_PER_REQUEST}")
    try:
        args.buckets = [None if x.strip() == "auto" else int(x) for x in args.buckets.split(",") if x.strip()]
    except ValueError:
        ap.error("--buckets: 'auto' or whole numbers")
    if not args.buckets or any(b is not None and b < args.n for b in args.buckets):
        ap.error("--buckets must name 'auto' or row counts >= --n")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.png_threads is not None and args.png_threads < 1:
        ap.error("--png-threads must be >= 1")
    return args


def run(args: argparse.Namespace, out=sys.stdout) -> dict[str, Any]:
    import jax

    from bench.roofline import decode_step_cost, measure_bandwidth, measure_matmul_flops
    from engine.api import DEFAULT_BUCKETS, bucket_for
    from engine.generate import make_grid
    from engine.pipeline import ModelPipeline, PipelineOptions, load_pipeline

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    dev = jax.devices()[0]
    cpu = dev.platform == "cpu"
    info: dict[str, Any] = {"device": f"{dev.device_kind} ({dev.platform}) x{jax.device_count()}",
                            "host": f"{platform.machine()} {platform.node()}", "jax": jax.__version__,
                            "args": vars(args).copy()}
    t0 = time.perf_counter()
    mm_dtype = "float32" if cpu else args.dtype  # no native bf16 matmul on this CPU: its fp32 rate is the ceiling
    flops = measure_matmul_flops(2048 if cpu else 8192, 3, dtype=mm_dtype)
    bw = measure_bandwidth(512 if cpu else 4096, 3)
    info["ceilings"] = {"flops_per_s": flops, "bytes_per_s": bw, "matmul_dtype": mm_dtype}
    say(f"device {info['device']}, jax {jax.__version__}: {mm_dtype} matmul {flops / 1e12:.2f} TFLOP/s, "
        f"read bandwidth {bw / 1e9:.0f} GB/s ({time.perf_counter() - t0:.1f} s)")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        parts = None
        if args.checkpoint is None:
            parts = random_parts(args.config, args.seed, Path(tmp))
            say(f"[{args.config}] random weights on {dev.platform} in {parts.pop('weights_s'):.1f} s")
        for layout, bucket in [(lay, b) for lay in args.layouts for b in args.buckets]:
            buckets = (bucket,) if bucket else DEFAULT_BUCKETS
            transposed = None if layout == "auto" else layout == "transposed"
            opts = dict(dtype=args.dtype, vqgan_dtype=args.vqgan_dtype, buckets=buckets, use_clip=not args.no_clip,
                        png_threads=args.png_threads)
            t0 = time.perf_counter()
            if parts is None:
                pipe = load_pipeline(args.checkpoint, **opts)
            else:
                p = dict(parts)
                if args.no_clip:
                    p.update(clip_config=None, clip_params=None, clip_tokenizer=None)
                pipe = ModelPipeline(**p, options=PipelineOptions(**opts), checkpoint_id=f"random-{args.config}",
                                     transposed_kernels=transposed)
            build_s = time.perf_counter() - t0
            say(f"  pipeline built in {build_s:.1f} s (layout {layout}, buckets {buckets}); first call compiles")
            cfg = pipe.config
            t = time_grid(pipe, args.n, args.repeats, args.seed)
            rows = bucket_for(args.n, pipe.batch_buckets)
            width = 4 if args.dtype == "float32" else 2
            step = decode_step_cost(cfg, rows, weight_bytes=width, act_bytes=width)
            loop_floor = cfg.image_length * step.bound_seconds(flops, bw)
            name = Path(args.checkpoint).name if args.checkpoint else args.config
            row = {
                "config": name, "layout": "transposed" if pipe.sampler.transposed_kernels else "published",
                "dtype": args.dtype, "n": args.n, "bucket": rows, "build_s": build_s, "first_s": t["first_s"],
                **{f"median_{k}": v for k, v in t["median"].items()}, "min_wall_s": t["min_wall_s"],
                "loop_floor_s": loop_floor, "loop_roofline_pct": 100.0 * loop_floor / t["median"]["sample_s"],
                "runs": t["runs"],
            }
            results.append(row)
            m = t["median"]
            say(f"  {name} {row['layout']:10s} {args.dtype} n={args.n} (bucket {rows}): "
                f"first call {t['first_s']:.1f} s;"
                f" grid {m['wall_s']:.3f} s median of {args.repeats} (min {t['min_wall_s']:.3f}) = sample "
                f"{m['sample_s']:.3f} + VQGAN {m['decode_s']:.3f} + CLIP {m['rank_s']:.3f} + PNG {m['encode_s']:.3f} s;"
                f" decoder-loop floor {loop_floor:.3f} s ({row['loop_roofline_pct']:.0f}% of roofline)")
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                make_grid(t["pngs"]).save(Path(args.out) / f"grid-{layout}-{row['layout']}-{rows}.png")
            del pipe
    info["results"] = results
    return info


HEADER = ("| config | layout | dtype | n (bucket) | first call s | grid s (median) | min s | sample s | VQGAN s "
          "| CLIP s | PNG s | loop floor s | % roofline |")


def markdown_table(info: dict[str, Any]) -> str:
    lines = [HEADER, "|" + " --- |" * (HEADER.count("|") - 1)]
    for r in info["results"]:
        lines.append(
            f"| {r['config']} | {r['layout']} | {r['dtype']} | {r['n']} ({r['bucket']}) | {r['first_s']:.1f} "
            f"| {r['median_wall_s']:.3f} | {r['min_wall_s']:.3f} | {r['median_sample_s']:.3f} "
            f"| {r['median_decode_s']:.3f} | {r['median_rank_s']:.3f} | {r['median_encode_s']:.3f} "
            f"| {r['loop_floor_s']:.3f} "
            f"| {r['loop_roofline_pct']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = run(args)
    print()
    print(f"Grid time, {info['device']}, jax {info['jax']}")
    print()
    print(markdown_table(info))
    if args.json:
        slim = json.loads(json.dumps(info, default=str))
        Path(args.json).write_text(json.dumps(slim, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
