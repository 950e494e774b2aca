"""Roofline model of one DalleBart decode step, and this machine's measured ceilings.

``python -m bench roofline [--preset mini] [--batch 8]`` prints the machine's measured matmul throughput
and memory bandwidth, and the FLOPs and bytes one cached decode step moves, hence the fastest a step can
possibly run here. ``bench sampler`` uses the same functions to report its measured step time as a share
of that bound.

Cost of one step for ``R = 2·B`` rows (conditional and unconditional branch in one batch), ``L`` decoder
layers, width ``d``, GLU width ``f``, ``T`` text positions, ``V`` logits, and ``S`` the KV-cache slots a step
must read: on average over an image of ``image_length`` positions, the ``(image_length + 1) / 2`` written so
far (the least a step can read; the native attention kernels read exactly these):

* FLOPs = R · [L · (8d² (q,k,v,o) + 4dS (scores, values) + 4d² (cross q,o) + 4dT + 6df (GLU)) + 2dV]
* bytes = weights read once (L · (6d² + 3df) + dV) · w  +  KV cache R · L · 2 · S · d · a
  + cross K/V R · L · 2 · T · d · a   (w, a: bytes per weight / activation element)
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import DalleBartConfig, preset


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float

    def bound_seconds(self, flops_per_s: float, bytes_per_s: float) -> float:
        return max(self.flops / flops_per_s, self.bytes / bytes_per_s)


def decode_step_cost(cfg: DalleBartConfig, batch: int, weight_bytes: int = 4, act_bytes: int = 4) -> StepCost:
    """FLOPs and bytes of one cached decode step for ``batch`` images (2·batch rows)."""
    rows = 2 * batch
    d, f, layers = cfg.d_model, cfg.decoder_ffn_dim, cfg.decoder_layers
    slots, text, vocab = (cfg.image_length + 1) / 2, cfg.max_text_length, cfg.image_vocab_size + 1
    per_layer = 8 * d * d + 4 * d * slots + 4 * d * d + 4 * d * text + 6 * d * f
    flops = rows * (layers * per_layer + 2 * d * vocab)
    weights = (layers * (6 * d * d + 3 * d * f) + d * vocab) * weight_bytes
    cache = rows * layers * 2 * (slots + text) * d * act_bytes
    return StepCost(flops=float(flops), bytes=float(weights + cache))


def _best_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` calls of ``fn`` after one warm-up; its result may be jax or host (numpy) values."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_flops(n: int = 2048, repeats: int = 3, dtype: str = "float32") -> float:
    """GEMM throughput (FLOP/s) of an ``n³`` matmul in ``dtype`` on the default device. On CPU the better of
    XLA's and numpy's (BLAS) fp32 matmul, so the ceiling does not depend on how XLA happens to be configured; on
    an accelerator XLA's alone (random data: zeros run faster on some GPUs)."""
    a_np = np.random.default_rng(0).standard_normal((n, n), np.float32)
    a = jnp.asarray(a_np).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    best = _best_time(lambda: f(a), repeats)
    if jax.default_backend() == "cpu":
        best = min(best, _best_time(lambda: a_np @ a_np, repeats))
    return 2 * n**3 / best


def measure_bandwidth(mbytes: int = 512, repeats: int = 3) -> float:
    """Streaming read bandwidth (bytes/s) of the default device: an XLA reduction over a large array; on CPU the
    better of that and numpy's ``max`` over it split across every core (XLA's figure depends on its CPU library
    flags: 20 vs 9 GB/s measured with and without its YNNPACK reductions; numpy's threaded ``max`` reaches the
    same 20 GB/s)."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda v: jnp.sum(v))
    best = _best_time(lambda: f(x), repeats)
    if jax.default_backend() == "cpu":
        host = np.ones(x.size, np.float32)
        parts = np.array_split(host, os.cpu_count() or 1)
        with ThreadPoolExecutor(len(parts)) as pool:
            best = min(best, _best_time(lambda: list(pool.map(np.max, parts)), repeats))
    return x.size * 4 / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench roofline", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    flops_s, bw = measure_matmul_flops(), measure_bandwidth()
    cost = decode_step_cost(preset(args.preset), args.batch)
    bound = cost.bound_seconds(flops_s, bw)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"measured: matmul {flops_s / 1e9:.1f} GFLOP/s, bandwidth {bw / 1e9:.1f} GB/s")
    print(
        f"{args.preset} batch {args.batch}: {cost.flops / 1e9:.2f} GFLOP and {cost.bytes / 1e6:.0f} MB per step "
        f"-> roofline {bound * 1e3:.1f} ms/step, {bound * 256:.1f} s per {args.batch} images"
    )
    return 0
