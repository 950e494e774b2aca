"""The native decode-attention backend: a decode step's self- and cross-attention through our C++ kernels.

:mod:`engine.attention.native.kernels` builds the kernels with the system compiler on first use and calls them as
XLA FFI custom calls; :class:`NativeAttention` is the backend the model calls (:mod:`engine.attention`). The kernels
compute in float32 on CPU devices. Traced under a mesh (``jax.set_mesh``, as the sampler compiles on one), each
device runs them on its own rows and heads, as the sampler's KV cache is split, so a (row, head) pair is computed
the same way on one device and on a mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax

from engine.attention.native import kernels
from engine.config import DalleBartConfig


def _mesh() -> Any:
    """The mesh the program is being traced under, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


@dataclass(frozen=True)
class NativeAttention:
    """Our C++ kernels (:func:`kernels.load` must have returned True). ``threads``: how many runs a kernel splits
    its (row, head) pairs into (None: :func:`kernels.default_threads`, read when the program is traced).

    The self-attention writes the step's key/value at ``position`` of the float32 cache (one array or a tuple of
    blocks, aliased through the call so nothing is copied) and attends over slots ``0..position`` only; the bias
    is not needed for that. The cache defaults to one block: the kernel reads only the written slots already.
    """

    threads: int | None = None
    name: ClassVar[str] = "native"

    def self_attention(self, q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: Any, v_cache: Any,
                       position: jax.Array, bias: jax.Array) -> tuple[jax.Array, Any, Any]:
        blocked = isinstance(k_cache, tuple)
        o, k_out, v_out = kernels.decode_attention(
            q, k_new, v_new, position, k_cache if blocked else (k_cache,), v_cache if blocked else (v_cache,),
            threads=self.threads, mesh=_mesh())
        k_cache, v_cache = (k_out, v_out) if blocked else (k_out[0], v_out[0])
        return o.astype(q.dtype), k_cache, v_cache

    def cross_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
        return kernels.cross_attention(q, k, v, bias, threads=self.threads, mesh=_mesh()).astype(q.dtype)

    def cache_blocks(self, config: DalleBartConfig) -> int:
        return 1
