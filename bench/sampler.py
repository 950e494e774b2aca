"""Image-token sampling speed: our jitted sampler vs min-dalle (PyTorch) vs the roofline, in one run.

``python -m bench sampler [--configs demo,mini] [--batches 1,8,32] [--dtypes float32,bfloat16] [--steps N]
[--repeats R] [--skip-mindalle] [--torch-threads 2,1] [--attention auto|native|xla] [--quick] [--json OUT]
[--demo-checkpoint DIR]``

``--quick`` (< 2 min): demo config, batches 1 and 8, float32, 16 steps. ``--torch-threads`` times min-dalle at
several torch thread counts (default: the machine's cores, as min-dalle itself sets, and 1); on a loaded machine
PyTorch's OpenMP threads stall each other at every op, so one thread can be several times faster — ours/min-dalle
is always taken against the fastest min-dalle row. Every figure carries the 1-minute load average before and
after it: re-run figures taken under load.

What is compared, per (config, dtype, batch B):

* **ours**: ``engine.sampling.Sampler`` on ``2B`` decoder rows (cond + uncond in one batch), static KV cache, the
  step loop inside ``jax.jit``/``lax.scan``. Compile time (``Sampler.warmup``) is reported on its own. The
  ``attention`` column says how its decode attention ran: ``native`` (our C++ kernel, ``engine.attention.native``,
  the sampler's default for float32 on CPU) or ``xla`` (XLA's dots; ``--attention xla`` asks for it).
* **min-dalle** 0.4.11: its ``DalleBartDecoder.sample_tokens`` step and KV cache, driven like its own loop
  (see ``bench/reference/mindalle.py``), PyTorch on the CPU with ``torch.set_num_threads(cores)``.
* **roofline**: ``bench.roofline.decode_step_cost`` (FLOPs and bytes of one step) against the matmul FLOP/s and
  memory bandwidth measured at the start of this run: the fastest a step could run here.

Both samplers get the SAME random weights (one numpy tree, mapped into min-dalle's modules), the same prompt for
all B images, the same start token and the same sampling settings (super-conditioning 10, top-k 50, temperature 1).

How a step is timed (``--steps N``): only ``N``-step chunks are timed and the loop time is extrapolated
(``image_length × ms/step``). Ours runs with ``chunk_size=N`` and a progress hook: the first chunk (encoder +
cross K/V + N steps, first run of the executables) is a warm-in, then chunks of N steps are timed between hook
calls. Our KV cache may be in blocks (``Sampler.cache_blocks``: 4 for the published sizes), and a step reads
only the blocks written so far, so a step costs more the later it comes: the whole image is run, the fastest of
the first ``R`` whole chunks inside each block counts, and ms/step is the mean over the blocks (with one block,
R chunks after the warm-in, as before). ``encoder`` = first chunk − fastest chunk of the first block.
min-dalle's cache is static (256 slots, attended in full under a mask), so its step cost is constant: its encoder
is timed on its own (second of two calls), then 2 warm-in steps, then R timed blocks of N steps, fastest counts.
``--steps`` defaults to half a cache block for the demo config (128 steps: its one block) and 4 for larger ones;
it must be <= half a block (image_length/2 with one block).

Columns: ms/step (one decoder step for all 2B rows, sampling included), tokens/s = B / step time (image tokens of
B images), images/s = B / (image_length × step time) (decoder loop only, no encoder, no VQGAN), ours/min-dalle =
ratio of images/s, % roofline = roofline step time / measured step time. The roofline of a bfloat16 run counts 2
bytes per weight/activation against the float32 matmul rate (this CPU has no native bf16 matmul).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from engine.config import ConfigError, DalleBartConfig, preset

# d_model 256, 4+4 layers, 4 heads, GLU 683, 1024 image codes, 1024 text tokens, 256 image positions
DEMO = DalleBartConfig(
    d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=683, decoder_ffn_dim=683, encoder_vocab_size=1024, image_vocab_size=1024,
    max_text_length=64, image_length=256, decoder_start_token_id=1024, bos_token_id=1025, eos_token_id=1025,
    pad_token_id=1025,
)
# seconds-scale config for tests: the published structure, min-dalle's 256 positions, toy widths
TINY = DalleBartConfig(
    d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_vocab_size=64, image_vocab_size=64,
    max_text_length=16, image_length=256, decoder_start_token_id=64, bos_token_id=65, eos_token_id=65,
    pad_token_id=65, init_std=0.1,
)

SCALE, TOP_K, TEMPERATURE = 10.0, 50, 1.0
PROMPT_SEED = 1234


class _Stop(Exception):
    """Raised from the progress hook to end a timed sample early."""


def bench_config(name: str, demo_checkpoint: str | Path | None = None) -> DalleBartConfig:
    """``demo`` (or ``DIR/dallebart/config.json`` with ``--demo-checkpoint``), ``tiny``, or a preset (mini, mega)."""
    if name == "demo":
        if demo_checkpoint is None:
            return DEMO
        path = Path(demo_checkpoint)
        path = path / "dallebart" if (path / "dallebart").is_dir() else path
        return DalleBartConfig.from_json(path)
    if name == "tiny":
        return TINY
    cfg = preset(name)
    if not isinstance(cfg, DalleBartConfig):
        raise ConfigError(f"preset {name!r} is not a DalleBart config")
    return cfg


def random_params(config: DalleBartConfig, seed: int = 0, std: float | None = None) -> dict:
    """Random float32 numpy params in the unscanned published layout, without running ``init`` (mini: ~5 s).

    Kernels and embeddings ~ N(0, std) (default ``config.init_std``); LayerNorm scales 1 + N(0, 0.1) and biases
    N(0, 0.1), so no layer is an identity.
    """
    from engine.models.dallebart import param_shapes

    rng = np.random.default_rng(seed)
    std = config.init_std if std is None else std
    shapes = param_shapes(dataclasses.replace(config, use_scan=False))
    out = {}
    for path, spec in traverse_util.flatten_dict(shapes).items():
        x = rng.standard_normal(spec.shape, dtype=np.float32)
        if path[-1] == "scale":
            x = 1.0 + np.float32(0.1) * x
        elif path[-1] == "bias":
            x *= np.float32(0.1)
        else:
            x *= np.float32(std)
        out[path] = x
    return traverse_util.unflatten_dict(out)


def prompt(config: DalleBartConfig, seed: int = PROMPT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """One prompt of ``max_text_length`` ids (bos, 20 words, eos, padding 1) and its unconditional counterpart."""
    t = config.max_text_length
    rng = np.random.default_rng(seed)
    n = min(20, t - 2)
    cond = np.ones((t,), np.int32)
    cond[0], cond[1 : 1 + n], cond[1 + n] = 0, rng.integers(3, config.encoder_vocab_size, n), 2
    uncond = np.ones((t,), np.int32)
    uncond[:2] = (0, 2)
    return cond, uncond


def loadavg() -> float:
    """1-minute load average (the machine is shared; a figure taken under load is flagged)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


# the native kernel's step reads the slots written so far, so it costs more later in the image: it is timed over
# the whole image in this many segments, like a blocked cache
NATIVE_SEGMENTS = 4


def time_ours(sampler: Any, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Compile, then one sample with ``chunk_size == steps``: a warm-in chunk, then timed chunks (module docstring).

    Returns compile_s, encoder_s and step_s (per cache block the fastest of its first ``repeats`` whole chunks,
    / steps, averaged over the blocks).
    """
    cfg = sampler.config
    if sampler.chunk_size != steps:
        raise ValueError(f"sampler chunk_size {sampler.chunk_size} != steps {steps}")
    blocks = getattr(sampler, "cache_blocks", 1)
    if getattr(sampler, "native_attention", False):
        blocks = NATIVE_SEGMENTS
    width = cfg.image_length // blocks
    repeats = max(1, min(repeats, cfg.image_length // steps - 1))
    t0 = time.perf_counter()
    compiled = sampler.warmup([batch], chunked=True)
    compile_s = time.perf_counter() - t0

    cond, uncond = prompt(cfg)
    ids, un = np.tile(cond, (batch, 1)), np.tile(uncond, (batch, 1))
    marks: list[tuple[int, float]] = []

    def hook(done: int, tokens: np.ndarray) -> None:
        marks.append((done, time.perf_counter()))
        if blocks == 1 and len(marks) >= 1 + repeats:
            raise _Stop

    start = time.perf_counter()
    try:
        sampler.sample(ids, (ids != 1).astype(np.int32), un, (un != 1).astype(np.int32), seeds=list(range(batch)),
                       indices=[0] * batch, scale=SCALE, top_k=TOP_K, top_p=1.0, temperature=TEMPERATURE,
                       on_chunk=hook)
    except _Stop:
        pass
    if sampler.warmup([batch], chunked=True) != compiled:
        raise RuntimeError("the timed sample compiled a program: the timing would include a compile")
    times = [start] + [t for _, t in marks]
    chunks = [(marks[i][0] - (marks[i - 1][0] if i else 0), times[i + 1] - times[i]) for i in range(len(marks))]
    per_block: dict[int, list[float]] = {}
    for i, (n, dt) in enumerate(chunks[1:], start=1):
        end = marks[i][0]
        if n == steps and (end - n) // width == (end - 1) // width:  # a whole chunk inside one block
            per_block.setdefault((end - 1) // width, []).append(dt)
    if not per_block or (blocks > 1 and len(per_block) != blocks):
        raise RuntimeError(f"no whole timed chunk of {steps} steps in some cache block (chunks: {chunks})")
    best = {b: min(dts[:repeats]) for b, dts in per_block.items()}
    return {"compile_s": compile_s, "encoder_s": max(chunks[0][1] - best[min(best)], 0.0),
            "step_s": float(np.mean([t / steps for t in best.values()]))}


MINDALLE_WARM_STEPS = 2  # PyTorch has no compile; two steps take its first-call allocations out of the timing


def time_mindalle(md: Any, batch: int, steps: int, repeats: int, threads: int) -> dict[str, float]:
    """min-dalle on ``threads`` torch threads: encoder (second of two calls), 2 warm-in steps, then ``repeats``
    timed blocks of ``steps``."""
    cfg = md.config
    md.torch.set_num_threads(threads)
    warm = min(MINDALLE_WARM_STEPS, cfg.image_length - steps)
    repeats = max(1, min(repeats, (cfg.image_length - warm) // steps))
    cond, uncond = prompt(cfg)
    md.encode(cond, uncond)
    t0 = time.perf_counter()
    encoded = md.encode(cond, uncond)
    encoder_s = time.perf_counter() - t0
    md.torch.manual_seed(0)
    state = md.start(encoded, batch, scale=SCALE, top_k=TOP_K, temperature=TEMPERATURE)
    md.steps(state, 0, warm)
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        md.steps(state, warm + steps * r, steps)
        best = min(best, time.perf_counter() - t0)
    return {"compile_s": float("nan"), "encoder_s": encoder_s, "step_s": best / steps}


def ceilings(quick: bool) -> dict[str, float]:
    """This machine's fp32 matmul FLOP/s and streaming bandwidth (bench.roofline), measured now."""
    from bench.roofline import measure_bandwidth, measure_matmul_flops

    if quick:
        return {"flops_per_s": measure_matmul_flops(1024, 2), "bytes_per_s": measure_bandwidth(128, 2)}
    return {"flops_per_s": measure_matmul_flops(), "bytes_per_s": measure_bandwidth()}


def roofline_step_s(cfg: DalleBartConfig, batch: int, dtype: str, ceil: dict[str, float]) -> float:
    from bench.roofline import decode_step_cost

    width = 2 if dtype == "bfloat16" else 4
    cost = decode_step_cost(cfg, batch, weight_bytes=width, act_bytes=width)
    return cost.bound_seconds(ceil["flops_per_s"], ceil["bytes_per_s"])


# ----------------------------------------------------------------------------------------------
# rows and the table
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    config: str
    dtype: str
    batch: int
    sampler: str  # ours | min-dalle | roofline
    step_s: float
    image_length: int
    attention: str = ""  # ours: "native" (engine.attention.native's kernel) or "xla"
    compile_s: float = float("nan")
    encoder_s: float = float("nan")
    steps_timed: int = 0
    vs_mindalle: float = float("nan")
    roofline_pct: float = float("nan")
    load_before: float = float("nan")
    load_after: float = float("nan")
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.image_length * self.step_s)

    @property
    def loop_s(self) -> float:
        return self.image_length * self.step_s

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(tokens_per_s=self.tokens_per_s, images_per_s=self.images_per_s, loop_s=self.loop_s)
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}


HEADER = (
    "| config | dtype | B | sampler | attention | compile s | encoder ms | ms/step | tokens/s | images/s | loop s "
    "| ours/min-dalle | % roofline | load before→after |"
)


def _fmt(x: float, spec: str) -> str:
    return "—" if not np.isfinite(x) else format(x, spec)


def _pct(x: float) -> str:
    """A share in percent: whole numbers from 10 up, two significant digits below (a tiny config's step is far
    from its roofline, and "0%" would read as none)."""
    return _fmt(x, ".0f" if not np.isfinite(x) or x >= 10 else ".2g")


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [HEADER, "|" + " --- |" * (HEADER.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.config} | {r.dtype} | {r.batch} | {r.sampler} | {r.attention or '—'} | {_fmt(r.compile_s, '.1f')} "
            f"| {_fmt(r.encoder_s * 1e3, '.0f')} | {_fmt(r.step_s * 1e3, '.3g')} | {_fmt(r.tokens_per_s, '.1f')} "
            f"| {_fmt(r.images_per_s, '.3g')} | {_fmt(r.loop_s, '.3g')} | {_fmt(r.vs_mindalle, '.2f')}× "
            f"| {_pct(r.roofline_pct)}% | {_fmt(r.load_before, '.1f')}→{_fmt(r.load_after, '.1f')} |"
        )
    return "\n".join(lines).replace("| —× |", "| — |").replace("| —% |", "| — |")


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def _csv(text: str, cast: Any = str) -> list[Any]:
    items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench sampler", description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=_csv, default=None, help="demo, mini, mega, tiny (default demo,mini)")
    ap.add_argument("--batches", type=lambda s: _csv(s, int), default=None, help="images per batch (default 1,8,32)")
    ap.add_argument("--dtypes", type=_csv, default=None, help="float32,bfloat16 (default both)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per timed chunk, <= half a cache block (default half a block for demo/tiny, else 4)")
    ap.add_argument("--cache-blocks", type=int, default=None,
                    help="our KV cache in this many blocks (default: the sampler's, 4 for the published sizes, 1 for "
                         "the demo; 1: one array read in full every step)")
    ap.add_argument("--attention", choices=("auto", "native", "xla"), default="auto",
                    help="our decode attention: auto (the sampler's default: our C++ kernel, engine.attention.native, "
                         "for float32 on CPU), native (the kernel for float32 rows), xla (XLA's dots)")
    ap.add_argument("--native-attention", dest="attention", action="store_const", const="native",
                    help="the same as --attention native")
    ap.add_argument("--repeats", type=int, default=None, help="timed chunks per figure, fastest counts (default 1)")
    ap.add_argument("--skip-mindalle", action="store_true", help="time only our sampler")
    ap.add_argument("--torch-threads", type=lambda s: _csv(s, int), default=None,
                    help="torch thread counts to time min-dalle with (default: the machine's cores and 1); "
                    "ours/min-dalle is against the fastest")
    ap.add_argument("--quick", action="store_true",
                    help="< 2 min: demo config, batches 1,8, float32, 16 steps (explicit options override)")
    ap.add_argument("--demo-checkpoint", default=None, help="read the demo config from DIR/dallebart/config.json")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = ap.parse_args(argv)
    quick = args.quick
    args.configs = args.configs or (["demo"] if quick else ["demo", "mini"])
    args.batches = args.batches or ([1, 8] if quick else [1, 8, 32])
    args.dtypes = args.dtypes or (["float32"] if quick else ["float32", "bfloat16"])
    args.repeats = args.repeats or 1
    args.torch_threads = args.torch_threads or sorted({os.cpu_count() or 1, 1}, reverse=True)
    if any(n < 1 for n in args.torch_threads):
        ap.error("--torch-threads must be >= 1")
    for d in args.dtypes:
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtypes: {d!r} is not float32 or bfloat16")
    if any(b < 1 for b in args.batches):
        ap.error("--batches must be >= 1")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.cache_blocks is not None and args.cache_blocks < 1:
        ap.error("--cache-blocks must be >= 1")
    return args


def steps_for(cfg: DalleBartConfig, name: str, args: argparse.Namespace) -> int:
    """Steps per timed chunk: at most half a KV-cache block (image_length/2 with one block), so that every block
    holds a whole timed chunk, the first one after the warm-in chunk too."""
    from engine.attention.xla import default_cache_blocks

    width = cfg.image_length // (args.cache_blocks or default_cache_blocks(cfg))
    if getattr(args, "attention", "auto") != "xla":  # the native kernel may run: time it over the whole image
        width = min(width, cfg.image_length // NATIVE_SEGMENTS)
    limit = width // 2
    if args.steps is not None:
        if args.steps > limit:
            raise SystemExit(f"--steps {args.steps} > {limit} for {name}: at most half a KV-cache block ({width} "
                             "steps), so that the first block holds a timed chunk after the warm-in chunk")
        return args.steps
    if args.quick:
        return min(16, limit)
    return limit if name in ("demo", "tiny") else min(4, limit)


def _native_attention_choice(attention: str, dtype: str) -> bool | None:
    """``Sampler(native_attention=...)`` for ``--attention``: None lets the sampler choose; the kernel is float32."""
    return {"auto": None, "xla": False, "native": dtype == "float32"}[attention]


def run(args: argparse.Namespace, out=sys.stdout) -> tuple[list[Row], dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from bench.reference import mindalle
    from engine.sampling import Sampler

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    cores = os.cpu_count() or 1
    info: dict[str, Any] = {
        "machine": f"{platform.machine()} {cores} cores, {jax.devices()[0].platform}",
        "jax": jax.__version__,
        "args": {k: v for k, v in vars(args).items()},
    }
    t0 = time.perf_counter()
    ceil = ceilings(args.quick)
    info["ceilings"] = ceil
    say(f"machine: {info['machine']}, jax {jax.__version__}; measured fp32 matmul "
        f"{ceil['flops_per_s'] / 1e9:.1f} GFLOP/s, bandwidth {ceil['bytes_per_s'] / 1e9:.1f} GB/s "
        f"({time.perf_counter() - t0:.1f} s)")
    rows: list[Row] = []
    for name in args.configs:
        cfg = bench_config(name, args.demo_checkpoint)
        steps = steps_for(cfg, name, args)
        t = time.perf_counter()
        params = random_params(cfg, seed=args.seed)
        say(f"[{name}] d_model {cfg.d_model}, {cfg.encoder_layers}+{cfg.decoder_layers} layers, image vocab "
            f"{cfg.image_vocab_size}; random weights in {time.perf_counter() - t:.1f} s; timing {steps} of "
            f"{cfg.image_length} steps per chunk")
        reason = "skipped (--skip-mindalle)" if args.skip_mindalle else mindalle.unavailable_reason(cfg)
        if reason and not args.skip_mindalle:
            say(f"[{name}] min-dalle: {reason}")
        for dtype in args.dtypes:
            sampler = Sampler(None, params, cfg, jnp.dtype(dtype), buckets=tuple(sorted(set(args.batches))),
                              chunk_size=steps, cache_blocks=args.cache_blocks,
                              native_attention=_native_attention_choice(args.attention, dtype))
            md = None if reason else mindalle.MinDalleSampler(cfg, params, dtype, threads=cores)
            for batch in args.batches:
                base = dict(config=name, dtype=dtype, batch=batch, image_length=cfg.image_length, steps_timed=steps)
                lb = loadavg()
                ours = time_ours(sampler, batch, steps, args.repeats)
                mine = Row(sampler="ours", attention="native" if sampler.native_attention else "xla",
                           step_s=ours["step_s"], compile_s=ours["compile_s"],
                           encoder_s=ours["encoder_s"], load_before=lb, load_after=loadavg(), **base)
                group = [mine]
                for threads in (args.torch_threads if md is not None else []):
                    lb = loadavg()
                    theirs = time_mindalle(md, batch, steps, args.repeats, threads)
                    label = "min-dalle" if len(args.torch_threads) == 1 else f"min-dalle {threads}thr"
                    group.append(Row(sampler=label, step_s=theirs["step_s"], encoder_s=theirs["encoder_s"],
                                     load_before=lb, load_after=loadavg(), note=f"{threads} torch threads", **base))
                if len(group) > 1:  # against the fastest min-dalle setting
                    mine.vs_mindalle = mine.images_per_s / max(r.images_per_s for r in group[1:])
                bound = roofline_step_s(cfg, batch, dtype, ceil)
                for r in group:
                    r.roofline_pct = 100.0 * bound / r.step_s
                group.append(Row(sampler="roofline", step_s=bound, roofline_pct=100.0, **base))
                for r in group[:-1]:
                    say(f"  {name} {dtype} B={batch} {r.sampler:9s}: {r.step_s * 1e3:8.2f} ms/step, "
                        f"{r.tokens_per_s:8.1f} tok/s, {r.images_per_s:.3g} img/s, {_pct(r.roofline_pct)}% roofline"
                        + (f", {r.vs_mindalle:.2f}x min-dalle" if np.isfinite(r.vs_mindalle) else "")
                        + f"  (load {r.load_before:.1f}->{r.load_after:.1f})")
                rows.extend(group)
            del sampler, md
            gc.collect()
        del params
        gc.collect()
    info["wall_s"] = time.perf_counter() - t0
    return rows, info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows, info = run(args)
    print()
    print(f"Sampler speed, {info['machine']}, decoder loop only (encoder separate), "
          f"ms/step timed over --steps and extrapolated to 256 steps; total wall {info['wall_s']:.0f} s")
    print()
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": [r.to_dict() for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
