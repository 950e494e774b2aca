"""Decode-attention backends: how a DalleBart decode step computes its self- and cross-attention.

The model (:mod:`engine.models.dallebart`) is built with a backend (``DalleBart(config, dtype, attention=...)``) and
calls its two methods in every decode step; it knows nothing else about it. The sampler picks the backend with
:func:`select_backend` and records its :attr:`~AttentionBackend.name` in every result, because the backends agree
only to float rounding (README: "Same seed, same image").

- ``"xla"`` (:class:`engine.attention.xla.XLAAttention`): einsums that XLA compiles for any device and dtype.
- ``"native"`` (:class:`engine.attention.native.NativeAttention`): our C++ kernels for float32 on CPU devices,
  built with the system compiler on first use.

A backend is a frozen dataclass: hashable, so it is part of the key under which compiled programs are shared, and
static to ``jax.jit`` (the model holds it as a module attribute, never as a traced value).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from engine.attention.xla import XLAAttention
from engine.config import DalleBartConfig

log = logging.getLogger(__name__)

NAMES = ("xla", "native")


class AttentionBackend(Protocol):
    """One decode step's attention. Shapes: q (B,1,H,Dh) scaled queries; k_new, v_new (B,H,1,Dh) the step's key
    and value; a KV cache per layer is one (B,H,S,Dh) array or a tuple of blocks (B,H,S/n,Dh); ``position`` the
    step's slot (traced int32 scalar); ``bias`` (1,1,1,A) float32, 0 for the slots ``<= position`` among the A
    attended and a large negative value elsewhere (A: the whole cache, or blocks 0..segment of a blocked one)."""

    name: ClassVar[str]

    def self_attention(self, q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: Any, v_cache: Any,
                       position: jax.Array, bias: jax.Array) -> tuple[jax.Array, Any, Any]:
        """Write k_new, v_new at ``position`` of the cache, attend q over slots 0..position ->
        (out (B,1,H,Dh) in q's dtype, k_cache, v_cache with the slot written)."""
        ...

    def cross_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
        """q over each row's text keys and values (B,H,T,Dh) with the mask bias (B,1,1,T) -> (B,1,H,Dh)."""
        ...

    def cache_blocks(self, config: DalleBartConfig) -> int:
        """How many blocks the KV cache should default to with this backend."""
        ...


XLA = XLAAttention()


def why_not_native(dtype: Any, platform: str) -> str:
    """Why the native kernels cannot run for this dtype on devices of this platform ("cpu", "gpu"...), or ""."""
    if jnp.dtype(dtype) != jnp.float32:
        return f"native_attention computes in float32, not {jnp.dtype(dtype).name}"
    return "" if platform == "cpu" else f"native_attention is a CPU kernel; the sampler's devices are {platform}"


def select_backend(native: bool | None, dtype: Any, platform: str) -> AttentionBackend:
    """The backend for the user's ``native_attention`` choice (``Sampler``/``PipelineOptions.native_attention``,
    ``ENGINE_NATIVE_ATTENTION``, ``--[no-]native-attention``):

    - None (auto): the native kernels wherever they apply (float32 on CPU devices), else XLA's attention;
    - True: the native kernels; a ValueError saying why where they do not apply;
    - False: XLA's attention.

    Where the kernels apply but cannot be built (no compiler, a failed build), one warning says why and XLA's
    attention is used.
    """
    why = why_not_native(dtype, platform)
    if native and why:
        raise ValueError(why)
    if native is None:
        native = not why
    if not native:
        return XLA
    from engine.attention.native import NativeAttention, kernels

    return NativeAttention() if kernels.load() else XLA
