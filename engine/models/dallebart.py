"""DalleBart: DALL·E mini's text→image-token encoder–decoder, written as small Flax linen modules.

Architecture (the published setting, ``ln_positions="normformer"``, ``use_glu=True``, ``force_ln_scale=False``):

    encoder: x = LN_emb(tok_emb[ids] + pos_emb[0..T-1]);  L × EncoderLayer;  final_ln (bias only)
    decoder: y = LN_emb(img_emb[ids] + pos_emb[p]);       L × DecoderLayer;  final_ln (bias only);  y @ lm_head

    EncoderLayer(x):  x += LN_1( SelfAttn( LN_0(x) ) );                x += GLU(x)
    DecoderLayer(y):  y += LN_1( CausalSelfAttn( LN_0(y) ) );
                      y += LN_3( CrossAttn( LN_2(y), enc ) );           y += GLU(y)
    GLU(x)         =  Dense_2( LN_1( gelu(Dense_0 LN_0 x) * Dense_1 LN_0 x ) )

Every LN that feeds a dense layer is bias-only (LN_0, LN_2, GLU LN_0/LN_1, final_ln); the NormFormer post-attention
LNs and ``layernorm_embedding`` have scale and bias. No dense layer has a bias. LN epsilon 1e-5; attention scale
1/sqrt(head_dim); GELU is the exact (erf) one.

Parameter names and shapes are those of the published ``flax_model.msgpack`` files, so a checkpoint restores
directly into this tree. Two layouts exist: *scanned* (``layers/FlaxBartEncoderLayers/...`` with a leading layer
axis; used when ``config.use_scan``) and *unscanned* (``layers/FlaxBartEncoderLayer_{i}/...``). The module builds
whichever layout ``config.use_scan`` names; :func:`engine.models.layout.normalize_layout` converts a tree of either
layout to it (loading and layout conversions live in :mod:`engine.models.layout`).

Methods (``model.apply(params, ..., method=...)``):
    encode(input_ids (B,T) int, attention_mask (B,T))                       -> hidden (B,T,d)
    decode(decoder_input_ids (B,S), encoder_hidden (B,T,d), encoder_mask)   -> logits (B,S,V+1) float32
    __call__(input_ids, attention_mask, decoder_input_ids)                  -> logits (B,S,V+1) float32
    cross_kv(encoder_hidden (B,T,d))                    -> (K, V), each a tuple of L arrays (B,H,T,Dh)
    decode_step(token (B,), position (), cache, cross_kv, encoder_mask[, segment]) -> (logits (B,V+1) f32, new cache)
Plain methods (no params): ``init_cache(batch, dtype[, blocks])`` -> {"k","v"} each a tuple of L zeros
(B,H,image_length,Dh), or with ``blocks`` = n > 1 a tuple of L tuples of n zeros (B,H,image_length/n,Dh).

A *blocked* cache lets the step at ``position`` attend to the blocks written so far only: the step is told its
``segment`` (the block that ``position`` falls in, a static int) and reads blocks 0..segment. Each block is its own
array, so nothing is sliced or copied (a static slice of one (B,H,S,Dh) array made XLA:CPU copy it, 3-4x slower
than attending to all of it); over a 256-token image in 4 blocks the self-attention reads 160 slots a step on
average instead of 256 (measured for mini at batch 8: 16-17 ms instead of 24-31 ms a step for the 12 layers).

The decode state is kept per layer (tuples, not one stacked array): slicing layer ``i`` out of a stacked
``(L,B,H,S,Dh)`` array inside the step loop made XLA:CPU copy it every step (measured for mini at batch 8: the
self-attention over the cache took ~4x longer than over per-layer arrays).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from engine.attention import XLA, AttentionBackend
from engine.attention.xla import attend, attend_cached
from engine.config import DalleBartConfig

Params = dict[str, Any]
Cache = dict[str, tuple[Any, ...]]  # {"k", "v"}: per decoder layer one (B,H,S,Dh) array, or a tuple of blocks
CrossKV = tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]  # (K, V): one (B,H,T,Dh) array per decoder layer

LN_EPS = 1e-5
MASK_VALUE = -1e9  # added to masked attention scores (computed in float32)

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "swish": nn.swish,
    "silu": nn.silu,
}


def _mask_bias(mask: jax.Array) -> jax.Array:
    """(B,T) 0/1 key mask -> (B,1,1,T) float32 additive bias (0 where kept, MASK_VALUE where masked)."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, MASK_VALUE).astype(jnp.float32)


def _causal_bias(length: int) -> jax.Array:
    """(1,1,S,S) float32 bias letting query i see keys 0..i."""
    idx = jnp.arange(length)
    return jnp.where(idx[None, :] <= idx[:, None], 0.0, MASK_VALUE).astype(jnp.float32)[None, None]


def _heads_first(x: jax.Array) -> jax.Array:
    """(B,S,H,Dh) -> (B,H,S,Dh)."""
    return jnp.swapaxes(x, 1, 2)


def _per_layer(stacked: jax.Array) -> tuple[jax.Array, ...]:
    """(L, ...) -> a tuple of L arrays (the decode state's per-layer form)."""
    return tuple(stacked[i] for i in range(stacked.shape[0]))


def _layer_norm(use_scale: bool, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, use_scale=use_scale, use_bias=True, dtype=dtype, name=name)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class Dense(nn.Module):
    """Bias-free dense layer ``(..., in) -> (..., features)`` computed in ``dtype``.

    The kernel is ``(in, features)`` as published, or ``(features, in)`` when ``transposed`` (the sampler's decode
    layout: XLA:CPU streams a kernel whose contracting axis is contiguous faster, see
    :func:`engine.models.layout.to_decode_layout`). Same math and parameter name (``kernel``) either way.
    """

    features: int
    transposed: bool
    dtype: Any
    kernel_init: Any  # shape-agnostic (the DalleBart's normal(init_std)): fan-in is on a different axis when transposed

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = x.shape[-1]
        shape = (self.features, n_in) if self.transposed else (n_in, self.features)
        kernel = self.param("kernel", self.kernel_init, shape).astype(self.dtype)
        x = x.astype(self.dtype)
        if not self.transposed:
            return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        # kernel (features, in) @ x.T (in, rows): with the kernel as the left operand XLA:CPU streams it as stored;
        # as the right operand of x @ kernel.T it repacks the whole kernel on every call (1.5-1.8x slower for the
        # 16-row decode GEMMs). The barriers keep XLA's simplifier from folding the transposes back into that form.
        rows = jax.lax.optimization_barrier(x.reshape(-1, n_in).T)
        out = jax.lax.optimization_barrier(kernel @ rows)
        return out.T.reshape(x.shape[:-1] + (self.features,))


class FlaxBartAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v/out projections; scores and softmax in float32.

    ``__call__(x (B,Q,d), kv_in (B,K,d), bias (·,·,Q|1,K) f32) -> (B,Q,d)``; the other methods expose the pieces
    the cached decoder needs (queries, K/V projected once, the output projection), whose attention itself is the
    decode step's backend's (:mod:`engine.attention`).
    """

    config: DalleBartConfig
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        d = self.config.d_model
        init = nn.initializers.normal(self.config.init_std)
        dense = lambda: Dense(d, self.config.transposed_kernels, self.dtype, init)  # noqa: E731
        self.q_proj = dense()
        self.k_proj = dense()
        self.v_proj = dense()
        self.out_proj = dense()

    def _split(self, x: jax.Array) -> jax.Array:
        """(B,N,d) -> (B,N,H,Dh)."""
        return x.reshape(x.shape[:2] + (self.num_heads, x.shape[-1] // self.num_heads))

    def query(self, x: jax.Array) -> jax.Array:
        """(B,Q,d) -> scaled queries (B,Q,H,Dh)."""
        q = self._split(self.q_proj(x))
        return q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B,K,d) -> keys, values, each heads-first (B,H,K,Dh): the layout of the KV caches."""
        return _heads_first(self._split(self.k_proj(x))), _heads_first(self._split(self.v_proj(x)))

    def output(self, o: jax.Array) -> jax.Array:
        """(B,Q,H,Dh) -> (B,Q,d)."""
        return self.out_proj(o.reshape(o.shape[:2] + (-1,)))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
        """Softmax attention of q (B,Q,H,Dh) over k, v (B,H,K,Dh) with additive bias (·,·,Q|1,K) -> (B,Q,d)."""
        return self.output(attend(q, k, v, bias))

    def __call__(self, x: jax.Array, kv_in: jax.Array, bias: jax.Array) -> jax.Array:
        k, v = self.kv(kv_in)
        return self.attend(self.query(x), k, v, bias)


class GLU(nn.Module):
    """Gated FFN: ``Dense_2( LN_1( act(Dense_0 h) * Dense_1 h ) )`` with ``h = LN_0(x)``; both LNs bias-only.

    (B,N,d) -> (B,N,d); hidden width ``ffn_dim``.
    """

    config: DalleBartConfig
    ffn_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        scale = cfg.force_ln_scale
        h = _layer_norm(scale, self.dtype, "LayerNorm_0")(x)
        t = cfg.transposed_kernels
        w = Dense(self.ffn_dim, t, self.dtype, init, name="Dense_0")(h)
        w = _ACTIVATIONS[cfg.activation_function](w)
        v = Dense(self.ffn_dim, t, self.dtype, init, name="Dense_1")(h)
        h = _layer_norm(scale, self.dtype, "LayerNorm_1")(w * v)
        return Dense(cfg.d_model, t, self.dtype, init, name="Dense_2")(h)


class EncoderLayer(nn.Module):
    """NormFormer encoder layer. ``(x (B,T,d), bias (B,1,1,T)) -> (x (B,T,d), None)`` (scan-compatible)."""

    config: DalleBartConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        h = _layer_norm(cfg.force_ln_scale, self.dtype, "LayerNorm_0")(x)
        h = FlaxBartAttention(cfg, cfg.encoder_attention_heads, self.dtype, name="FlaxBartAttention_0")(h, h, bias)
        x = x + _layer_norm(True, self.dtype, "LayerNorm_1")(h)
        x = x + GLU(cfg, cfg.encoder_ffn_dim, self.dtype, name="GLU_0")(x)
        return x, None


class DecoderLayer(nn.Module):
    """NormFormer decoder layer; ``mode`` picks the computation over the same parameters (scan-compatible).

    - ``"full"``:     ``(y (B,S,d), enc (B,T,d), enc_bias (B,1,1,T), self_bias (1,1,S,S)) -> (y, None)``
    - ``"cross_kv"``: ``(enc (B,T,d)) -> (enc, (K, V) each (B,H,T,Dh))``: cross-attention K/V of this layer.
    - ``"step"``:     ``(y (B,1,d), k_cache, v_cache (B,H,S,Dh), cross_k, cross_v (B,H,T,Dh), enc_bias,
      cache_bias (1,1,1,S)) -> (y, (k_new, v_new) each (B,H,1,Dh))``: attends to the old cache plus itself and
      leaves the cache untouched (scanned layout: the caller writes all layers at once).
    - ``"step_inplace"``: ``(y, k_cache, v_cache (B,H,S,Dh), cross_k, cross_v, enc_bias, self_bias (1,1,1,S),
      position) -> (y, (k_cache, v_cache))``: the unscanned layout's decode step. The ``attention`` backend
      (:mod:`engine.attention`) writes this layer's K/V at ``position`` and attends over the written slots, and
      computes the cross-attention. With a blocked cache (``k_cache``, ``v_cache`` tuples of n blocks
      (B,H,S/n,Dh)) ``self_bias`` covers the blocks attended, (1,1,1,(segment+1)·S/n): the write goes into block
      ``segment`` and blocks 0..segment are read.
    """

    config: DalleBartConfig
    dtype: Any = jnp.float32
    mode: str = "full"
    attention: AttentionBackend = XLA

    @nn.compact
    def __call__(self, y: jax.Array, *args: jax.Array) -> tuple[jax.Array, Any]:
        cfg = self.config
        heads = cfg.decoder_attention_heads
        ln0 = _layer_norm(cfg.force_ln_scale, self.dtype, "LayerNorm_0")
        self_attn = FlaxBartAttention(cfg, heads, self.dtype, name="FlaxBartAttention_0")
        ln1 = _layer_norm(True, self.dtype, "LayerNorm_1")
        ln2 = _layer_norm(cfg.force_ln_scale, self.dtype, "LayerNorm_2")
        cross_attn = FlaxBartAttention(cfg, heads, self.dtype, name="FlaxBartAttention_1")
        ln3 = _layer_norm(True, self.dtype, "LayerNorm_3")
        glu = GLU(cfg, cfg.decoder_ffn_dim, self.dtype, name="GLU_0")

        if self.mode == "cross_kv":
            return y, cross_attn.kv(y)
        if self.mode == "full":
            enc, enc_bias, self_bias = args
            h = ln0(y)
            y = y + ln1(self_attn(h, h, self_bias))
            y = y + ln3(cross_attn(ln2(y), enc, enc_bias))
            return y + glu(y), None
        if self.mode == "step":
            k_cache, v_cache, cross_k, cross_v, enc_bias, cache_bias = args
            h = ln0(y)
            q = self_attn.query(h)
            k_new, v_new = self_attn.kv(h)
            k_new, v_new = k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype)
            y = y + ln1(self_attn.output(attend_cached(q, k_new, v_new, k_cache, v_cache, cache_bias)))
            y = y + ln3(cross_attn.attend(cross_attn.query(ln2(y)), cross_k, cross_v, enc_bias))
            return y + glu(y), (k_new, v_new)
        if self.mode == "step_inplace":
            k_cache, v_cache, cross_k, cross_v, enc_bias, self_bias, position = args
            h = ln0(y)
            q = self_attn.query(h)
            k_new, v_new = self_attn.kv(h)
            o, k_cache, v_cache = self.attention.self_attention(q, k_new, v_new, k_cache, v_cache, position,
                                                                self_bias)
            y = y + ln1(self_attn.output(o))
            o = self.attention.cross_attention(cross_attn.query(ln2(y)), cross_k, cross_v, enc_bias)
            y = y + ln3(cross_attn.output(o))
            return y + glu(y), (k_cache, v_cache)
        raise ValueError(f"unknown DecoderLayer mode {self.mode!r}")


def _run_layers(
    parent: nn.Module,
    layer_cls: type[nn.Module],
    prefix: str,
    num_layers: int,
    carry: jax.Array,
    per_layer: tuple[jax.Array, ...],
    broadcast: tuple[jax.Array, ...],
    **layer_kwargs: Any,
) -> tuple[jax.Array, Any]:
    """Apply ``num_layers`` layers in the layout the config names; returns (carry, per-layer outputs stacked on axis 0).

    Scanned: one ``nn.scan`` module ``{prefix}s`` whose params carry a leading layer axis. Unscanned: modules
    ``{prefix}_{i}``. ``per_layer`` arrays have a leading layer axis (sliced per layer); ``broadcast`` are shared.
    """
    cfg: DalleBartConfig = parent.config  # type: ignore[attr-defined]
    cls = layer_cls
    if cfg.gradient_checkpointing and layer_kwargs.get("mode", "full") == "full":
        cls = nn.remat(layer_cls, prevent_cse=not cfg.use_scan)
    if cfg.use_scan:
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0,) * len(per_layer) + (nn.broadcast,) * len(broadcast),
            length=num_layers,
        )
        return scanned(parent.config, parent.dtype, name=f"{prefix}s", **layer_kwargs)(  # type: ignore[attr-defined]
            carry, *per_layer, *broadcast
        )
    outs = []
    for i in range(num_layers):
        layer = cls(parent.config, parent.dtype, name=f"{prefix}_{i}", **layer_kwargs)  # type: ignore[attr-defined]
        carry, out = layer(carry, *(a[i] for a in per_layer), *broadcast)
        outs.append(out)
    stacked = None if outs[0] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return carry, stacked


class EncoderLayers(nn.Module):
    """Container named ``layers`` holding the encoder layers in the configured layout."""

    config: DalleBartConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x, _ = _run_layers(self, EncoderLayer, "FlaxBartEncoderLayer", self.config.encoder_layers, x, (), (bias,))
        return x


class DecoderLayers(nn.Module):
    """Container named ``layers`` holding the decoder layers; ``mode`` (static) as in :class:`DecoderLayer`."""

    config: DalleBartConfig
    dtype: Any = jnp.float32
    attention: AttentionBackend = XLA

    @nn.compact
    def __call__(self, y: jax.Array, per_layer: tuple, broadcast: tuple, mode: str = "full") -> tuple[jax.Array, Any]:
        cfg = self.config
        if mode == "step_inplace":
            if cfg.use_scan:
                raise ValueError("step_inplace needs the unscanned layout")
            ks, vs, cross_k, cross_v = per_layer  # tuples of per-layer arrays
            new_k, new_v = [], []
            for i in range(cfg.decoder_layers):
                layer = DecoderLayer(cfg, self.dtype, mode=mode, attention=self.attention,
                                     name=f"FlaxBartDecoderLayer_{i}")
                y, (k, v) = layer(y, ks[i], vs[i], cross_k[i], cross_v[i], *broadcast)
                new_k.append(k)
                new_v.append(v)
            return y, (tuple(new_k), tuple(new_v))
        return _run_layers(
            self, DecoderLayer, "FlaxBartDecoderLayer", self.config.decoder_layers, y, per_layer, broadcast, mode=mode
        )


class Encoder(nn.Module):
    """Text encoder: ``(input_ids (B,T), attention_mask (B,T)) -> (B,T,d)``; T <= ``max_text_length``."""

    config: DalleBartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        self.embed_tokens = nn.Embed(cfg.encoder_vocab_size, cfg.d_model, dtype=self.dtype, embedding_init=init)
        self.embed_positions = nn.Embed(cfg.max_text_length, cfg.d_model, dtype=self.dtype, embedding_init=init)
        self.layernorm_embedding = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        self.layers = EncoderLayers(cfg, self.dtype)
        self.final_ln = nn.LayerNorm(epsilon=LN_EPS, use_scale=self.config.force_ln_scale, dtype=self.dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        t = input_ids.shape[1]
        if t > self.config.max_text_length:
            raise ValueError(f"text length {t} exceeds max_text_length {self.config.max_text_length}")
        x = self.embed_tokens(input_ids) + self.embed_positions(jnp.arange(t))[None]
        x = self.layernorm_embedding(x)
        x = self.layers(x, _mask_bias(attention_mask))
        return self.final_ln(x)


class Decoder(nn.Module):
    """Image-token decoder up to (not including) ``lm_head``; returns final hidden states."""

    config: DalleBartConfig
    dtype: Any = jnp.float32
    attention: AttentionBackend = XLA

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        self.embed_tokens = nn.Embed(cfg.image_vocab_size + 1, cfg.d_model, dtype=self.dtype, embedding_init=init)
        self.embed_positions = nn.Embed(cfg.image_length, cfg.d_model, dtype=self.dtype, embedding_init=init)
        self.layernorm_embedding = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        self.layers = DecoderLayers(cfg, self.dtype, self.attention)
        self.final_ln = nn.LayerNorm(epsilon=LN_EPS, use_scale=self.config.force_ln_scale, dtype=self.dtype)

    def __call__(self, ids: jax.Array, enc: jax.Array, enc_mask: jax.Array) -> jax.Array:
        """(B,S) ids at positions 0..S-1, enc (B,T,d), enc_mask (B,T) -> hidden (B,S,d)."""
        s = ids.shape[1]
        if s > self.config.image_length:
            raise ValueError(f"decoder length {s} exceeds image_length {self.config.image_length}")
        y = self.layernorm_embedding(self.embed_tokens(ids) + self.embed_positions(jnp.arange(s))[None])
        y, _ = self.layers(y, (), (enc, _mask_bias(enc_mask), _causal_bias(s)))
        return self.final_ln(y)

    def cross_kv(self, enc: jax.Array) -> CrossKV:
        _, (k, v) = self.layers(enc, (), (), mode="cross_kv")
        return _per_layer(k), _per_layer(v)

    def step(
        self, token: jax.Array, position: jax.Array, cache: Cache, cross: CrossKV, enc_mask: jax.Array,
        segment: int | None = None,
    ) -> tuple[jax.Array, Cache]:
        """token (B,) at ``position`` -> (hidden (B,d), cache with this position's K/V written).

        A blocked cache needs ``segment``: the block ``position`` falls in (static), read with the blocks before it.
        """
        y = self.embed_tokens(token[:, None]) + self.embed_positions(jnp.reshape(position, (1,)))[None]
        y = self.layernorm_embedding(y)
        per_layer = (cache["k"], cache["v"], cross[0], cross[1])
        enc_bias = _mask_bias(enc_mask)
        if isinstance(cache["k"][0], tuple):  # blocked: attend to blocks 0..segment
            if self.config.use_scan:
                raise ValueError("a blocked cache needs the unscanned layout")
            n_blocks, width = len(cache["k"][0]), cache["k"][0][0].shape[2]
            if segment is None or not 0 <= segment < n_blocks:
                raise ValueError(f"a cache of {n_blocks} blocks needs a segment in [0, {n_blocks}), got {segment}")
            slots = jnp.arange((segment + 1) * width)
        else:
            slots = jnp.arange(cache["k"][0].shape[2])
        if not self.config.use_scan:
            self_bias = jnp.where(slots <= position, 0.0, MASK_VALUE).astype(jnp.float32)[None, None, None]
            y, (ks, vs) = self.layers(y, per_layer, (enc_bias, self_bias, position), mode="step_inplace")
            return self.final_ln(y)[:, 0], {"k": ks, "v": vs}
        # scanned layout (tests only; the sampler decodes unscanned): stacks the caches every step (a copy), then
        # writes each layer's new K/V back
        cache_bias = jnp.where(slots < position, 0.0, MASK_VALUE).astype(jnp.float32)[None, None, None]
        y, (k_new, v_new) = self.layers(y, tuple(jnp.stack(x) for x in per_layer), (enc_bias, cache_bias), mode="step")

        def write(old: tuple[jax.Array, ...], new: jax.Array) -> tuple[jax.Array, ...]:
            return tuple(jax.lax.dynamic_update_slice(c, new[i].astype(c.dtype), (0, 0, position, 0))
                         for i, c in enumerate(old))

        return self.final_ln(y)[:, 0], {"k": write(cache["k"], k_new), "v": write(cache["v"], v_new)}


class BartModel(nn.Module):
    """The ``model`` sub-tree: encoder + decoder."""

    config: DalleBartConfig
    dtype: Any = jnp.float32
    attention: AttentionBackend = XLA

    def setup(self) -> None:
        self.encoder = Encoder(self.config, self.dtype)
        self.decoder = Decoder(self.config, self.dtype, self.attention)


class DalleBart(nn.Module):
    """DALL·E mini/Mega encoder–decoder. See the module docstring for the methods and their shapes.

    ``dtype`` is the compute dtype (float32, bfloat16 or float16); params are used in whatever dtype they are
    stored in (see :func:`engine.models.layout.load_dallebart_params`). Logits are always float32. ``attention``:
    the backend of :meth:`decode_step`'s self- and cross-attention (:mod:`engine.attention`; default XLA's).
    """

    config: DalleBartConfig
    dtype: Any = jnp.float32
    attention: AttentionBackend = XLA

    def setup(self) -> None:
        cfg = self.config
        self.model = BartModel(cfg, self.dtype, self.attention)
        self.lm_head = Dense(
            cfg.image_vocab_size + 1, cfg.transposed_kernels, self.dtype, nn.initializers.normal(cfg.init_std)
        )

    def _logits(self, hidden: jax.Array) -> jax.Array:
        return self.lm_head(hidden).astype(jnp.float32)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids (B,T) int32, attention_mask (B,T) 0/1 -> encoder hidden (B,T,d)."""
        return self.model.encoder(input_ids, attention_mask)

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array, encoder_mask: jax.Array) -> jax.Array:
        """Full (non-cached) causal decoder: ids (B,S) at positions 0..S-1 -> logits (B,S,V+1) float32."""
        return self._logits(self.model.decoder(decoder_input_ids, encoder_hidden, encoder_mask))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, decoder_input_ids: jax.Array) -> jax.Array:
        """Training forward: encode + decode -> logits (B,S,V+1) float32."""
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    def cross_kv(self, encoder_hidden: jax.Array) -> CrossKV:
        """Cross-attention keys and values of every decoder layer, computed once per request: (K, V), each a
        tuple of L arrays (B,H,T,Dh)."""
        return self.model.decoder.cross_kv(encoder_hidden)

    def decode_step(
        self,
        token: jax.Array,
        position: jax.Array,
        cache: Cache,
        cross_kv: CrossKV,
        encoder_mask: jax.Array,
        segment: int | None = None,
    ) -> tuple[jax.Array, Cache]:
        """One cached decoder step.

        token (B,) int32 at ``position`` (scalar int, 0-based; the start token is at 0); cache {"k","v"} each a
        tuple of L arrays (B,H,image_length,Dh) holding positions < ``position`` (or, blocked, of L tuples of
        blocks, with ``segment`` = position // block length, a static int); cross_kv from :meth:`cross_kv`;
        encoder_mask (B,T). Returns (logits (B,V+1) float32, cache with ``position`` written).
        """
        hidden, new_cache = self.model.decoder.step(token, position, cache, cross_kv, encoder_mask, segment)
        return self._logits(hidden), new_cache

    def init_cache(self, batch: int, dtype: Any = None, blocks: int = 1) -> Cache:
        """Empty KV cache: {"k","v"} each a tuple of ``decoder_layers`` zeros (batch, heads, image_length, head_dim);
        with ``blocks`` > 1, each layer's entry is a tuple of that many (batch, heads, image_length/blocks, head_dim).

        Heads before positions: the per-step attention then reads the cache without transposing it (the
        ``(B,S,H,Dh)`` order cost a transpose of every layer's cache every step, ≈2× slower steps on CPU).
        """
        cfg = self.config
        if blocks < 1 or cfg.image_length % blocks:
            raise ValueError(f"cache blocks must divide image_length {cfg.image_length}, got {blocks}")
        shape = (batch, cfg.decoder_attention_heads, cfg.image_length // blocks, cfg.head_dim)
        dtype = dtype or self.dtype
        if blocks == 1:
            layer = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        else:
            layer = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(blocks))  # noqa: E731
        zeros = lambda: tuple(layer() for _ in range(cfg.decoder_layers))  # noqa: E731
        return {"k": zeros(), "v": zeros()}


# ----------------------------------------------------------------------------------------------
# Params: the tree this module builds (layouts and loading: engine.models.layout)
# ----------------------------------------------------------------------------------------------


def init_params(config: DalleBartConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random params (``init_std`` normal kernels/embeddings, LN scale 1 / bias 0) in the config's layout."""
    model = DalleBart(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = model.init(rng, ids, jnp.ones((1, 1), jnp.int32), ids)["params"]
    return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)  # every leaf is floating


def param_shapes(config: DalleBartConfig) -> Params:
    """The param tree as ``jax.ShapeDtypeStruct`` leaves (float32), computed without allocating."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.PRNGKey(0))
