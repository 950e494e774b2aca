"""XLA's attention: softmax attention as einsums, the default decode-attention backend and the model's own.

:func:`attend` is the attention of the full (training) forward and of the cross-attention in a decode step;
:class:`XLAAttention` is the backend the sampler decodes with where the native kernels do not run
(:mod:`engine.attention`). Scores and softmax are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from engine.config import DalleBartConfig


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Softmax attention of q (B,Q,H,Dh) (scaled) over k, v (B,H,K,Dh) with additive bias (·,·,Q|1,K) ->
    (B,Q,H,Dh)."""
    scores = jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bqhd", probs, v)


def attend_blocks(q: jax.Array, k_blocks: tuple[jax.Array, ...], v_blocks: tuple[jax.Array, ...],
                  bias: jax.Array) -> jax.Array:
    """:func:`attend` over keys/values split along K into blocks (B,H,Kb,Dh) each; bias covers their
    concatenation. One softmax over all blocks' scores; the values are summed block by block, so no block is
    concatenated."""
    scores = jnp.concatenate([jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
                              for k in k_blocks], axis=-1) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    o, start = None, 0
    for v in v_blocks:
        part = jnp.einsum("bhqk,bhkd->bqhd", probs[..., start: start + v.shape[2]].astype(v.dtype), v)
        o, start = (part if o is None else o + part), start + v.shape[2]
    return o


def attend_cached(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                  bias: jax.Array) -> jax.Array:
    """One new query (B,1,H,Dh) over the old cache (B,H,S,Dh) (bias (1,1,1,S) hides unwritten slots) and its own
    key/value (B,H,1,Dh), without writing the cache -> (B,1,H,Dh) (the scanned layout's decode step)."""
    s_cache = jnp.einsum("bqhd,bhkd->bhqk", q, k_cache, preferred_element_type=jnp.float32) + bias
    s_self = jnp.einsum("bqhd,bhqd->bhq", q, k_new, preferred_element_type=jnp.float32)[..., None]
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], axis=-1), axis=-1)
    o = jnp.einsum("bhqk,bhkd->bhqd", probs[..., :-1].astype(v_cache.dtype), v_cache)
    o = o + probs[..., -1:].astype(v_new.dtype) * v_new
    return jnp.swapaxes(o, 1, 2)


def default_cache_blocks(config: DalleBartConfig) -> int:
    """4 cache blocks for the published sizes (d_model >= 512; image_length a multiple of 4, >= 64), else 1.

    Blocks (the steps of segment k read blocks 0..k only) pay where reading the cache is a real share of a step:
    mini at batch 8 on a 2-core CPU, 60-65 instead of 67-76 ms a step. They cost a loop body per block, so
    compiling takes longer (mini at batch 8: the whole loop 8 -> 16 s, the progress chunks 3 -> 13 s). The demo
    model (d_model 128) steps no faster with them (its kernels fit in cache) and would only compile longer
    (4 -> 7 s, chunks 2 -> 8 s).
    """
    ok = config.image_length % 4 == 0 and config.image_length >= 64 and config.d_model >= 512
    return 4 if ok else 1


@dataclass(frozen=True)
class XLAAttention:
    """The decode step's attention as einsums that XLA compiles for any device and dtype.

    The self-attention writes the step's key/value into the cache first and then attends over it (write-then-read
    lets XLA update the loop-carried cache in place; reading first and writing afterwards made it copy the whole
    cache every step, 1.6-2x slower steps). A blocked cache (tuples of n blocks (B,H,S/n,Dh)) is written in block
    ``segment`` and blocks 0..segment are read, ``segment`` being given by the bias's length.
    """

    name: ClassVar[str] = "xla"

    def self_attention(self, q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: Any, v_cache: Any,
                       position: jax.Array, bias: jax.Array) -> tuple[jax.Array, Any, Any]:
        if isinstance(k_cache, tuple):  # blocked: the bias's length says how many blocks are attended
            width = k_cache[0].shape[2]
            segment = bias.shape[-1] // width - 1
            start = (0, 0, position - segment * width, 0)
            k_cache, v_cache = (
                c[:segment] + (jax.lax.dynamic_update_slice(c[segment], new.astype(c[segment].dtype), start),)
                + c[segment + 1:]
                for c, new in ((k_cache, k_new), (v_cache, v_new))
            )
            attended = segment + 1
            return attend_blocks(q, k_cache[:attended], v_cache[:attended], bias), k_cache, v_cache
        start = (0, 0, position, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), start)
        return attend(q, k_cache, v_cache, bias), k_cache, v_cache

    def cross_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
        return attend(q, k, v, bias)

    def cache_blocks(self, config: DalleBartConfig) -> int:
        return default_cache_blocks(config)
