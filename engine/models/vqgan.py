"""Taming-transformers VQGAN in Flax linen (encoder, vector quantiser, decoder).

Follows the ``vqgan_imagenet_f16_16384`` architecture (Esser et al., 2021) as ported to JAX by
``vqgan-jax``, with the 2022-07-09 fix: inside a resolution level ``attn_j`` follows ``block_j``.

Conventions
  * images are NHWC floats in [0, 1] on both ends, fed and returned without rescaling (the dalle-mini
    convention: the published model is used on [0, 1] pixels, not taming's [-1, 1]);
    ``decode``/``decode_code`` return the raw decoder output unless ``clip=True``;
  * conv kernels are HWIO, GroupNorm has ``scale``/``bias``;
  * parameter names match the published ``flax_model.msgpack`` exactly (no ``model/`` prefix):
    ``encoder/conv_in``, ``encoder/down_{i}/block_{j}``, ``quantize/embedding/embedding``,
    ``decoder/up_{i}/attn_{j}``, ... so the published file restores without renaming.

GroupNorm groups: the published model uses 32 groups everywhere. Tiny test/demo configs may have fewer
than 32 channels, so every norm uses ``min(norm_groups, channels)`` groups (``norm_groups`` is a
``VQModel`` field, default 32); channels must then be divisible by that number.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from engine.config import ConfigError, VQGANConfig

Array = jax.Array


def _swish(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


class GroupNorm(nn.Module):
    """GroupNorm with ``min(groups, C)`` groups, eps 1e-6, two-pass variance (matches torch)."""

    groups: int = 32
    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        groups = min(self.groups, channels)
        if channels % groups:
            raise ConfigError(f"VQGAN: {channels} channels are not divisible into {groups} GroupNorm groups")
        # the published tree stores the affine parameters directly on the module (``norm1/scale``)
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        shape = x.shape
        xf = x.astype(jnp.float32).reshape(shape[:-1] + (groups, channels // groups))
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        xf = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = xf.reshape(shape) * scale + bias
        return y.astype(self.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Any, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """norm → swish → conv3×3 → norm → swish → dropout → conv3×3, plus a 1×1 shortcut when C changes.

    (B, H, W, C_in) → (B, H, W, C_out)
    """

    out_channels: int
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        h = _swish(GroupNorm(self.norm_groups, dtype=self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = _swish(GroupNorm(self.norm_groups, dtype=self.dtype, name="norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "nin_shortcut", self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions with 1×1 conv projections and a residual.

    (B, H, W, C) → (B, H, W, C); weights softmax(q·kᵀ/√C) in float32.
    """

    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        h = GroupNorm(self.norm_groups, dtype=self.dtype, name="norm")(x)
        q = _conv(c, 1, "q", self.dtype)(h).reshape(b, hh * ww, c)
        k = _conv(c, 1, "k", self.dtype)(h).reshape(b, hh * ww, c)
        v = _conv(c, 1, "v", self.dtype)(h).reshape(b, hh * ww, c)
        w = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
        w = jax.nn.softmax(w, axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, hh, ww, c)
        return x + _conv(c, 1, "proj_out", self.dtype)(h)


class Downsample(nn.Module):
    """Pad bottom/right by one, conv3×3 stride 2 VALID: (B, H, W, C) → (B, H/2, W/2, C)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then conv3×3: (B, H, W, C) → (B, 2H, 2W, C)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class MidBlock(nn.Module):
    """block_1 → attn_1 → block_2 at the lowest resolution."""

    channels: int
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        kw = dict(norm_groups=self.norm_groups, dropout=self.dropout, dtype=self.dtype)
        x = ResnetBlock(self.channels, **kw, name="block_1")(x, deterministic)
        x = AttnBlock(self.norm_groups, self.dtype, name="attn_1")(x)
        return ResnetBlock(self.channels, **kw, name="block_2")(x, deterministic)


class Level(nn.Module):
    """One resolution level: ``n_blocks`` × (block_j [→ attn_j]) then an optional down/upsample."""

    out_channels: int
    n_blocks: int
    use_attn: bool
    resample: str | None  # "down", "up" or None
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        for j in range(self.n_blocks):
            x = ResnetBlock(
                self.out_channels, self.norm_groups, self.dropout, self.dtype, name=f"block_{j}"
            )(x, deterministic)
            if self.use_attn:
                x = AttnBlock(self.norm_groups, self.dtype, name=f"attn_{j}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsample")(x)
        return x


class Encoder(nn.Module):
    """(B, R, R, in_channels) → (B, R/f, R/f, z_channels)."""

    config: VQGANConfig
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        n_levels = len(cfg.ch_mult)
        h = _conv(cfg.ch, 3, "conv_in", self.dtype)(x)
        res = cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            h = Level(
                cfg.ch * mult,
                cfg.num_res_blocks,
                res in cfg.attn_resolutions,
                "down" if i != n_levels - 1 else None,
                self.norm_groups,
                cfg.dropout,
                self.dtype,
                name=f"down_{i}",
            )(h, deterministic)
            if i != n_levels - 1:
                res //= 2
        h = MidBlock(cfg.ch * cfg.ch_mult[-1], self.norm_groups, cfg.dropout, self.dtype, name="mid")(h, deterministic)
        h = _swish(GroupNorm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
        return _conv(cfg.z_channels, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    """(B, r, r, z_channels) → (B, r·2^(n-1), r·2^(n-1), out_ch) for n = len(config.decoder_mult) levels (the
    encoder's factor f, or more with extra upsampling levels); levels run from the deepest (``up_{n-1}``) to
    ``up_0``, level i with ``ch · config.decoder_mult[i]`` channels."""

    config: VQGANConfig
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        mult = cfg.decoder_mult
        n_levels = len(mult)
        res = cfg.grid_size
        h = _conv(cfg.ch * mult[-1], 3, "conv_in", self.dtype)(z)
        h = MidBlock(cfg.ch * mult[-1], self.norm_groups, cfg.dropout, self.dtype, name="mid")(h, deterministic)
        for i in reversed(range(n_levels)):
            h = Level(
                cfg.ch * mult[i],
                cfg.num_res_blocks + 1,
                res in cfg.attn_resolutions,
                "up" if i != 0 else None,
                self.norm_groups,
                cfg.dropout,
                self.dtype,
                name=f"up_{i}",
            )(h, deterministic)
            if i != 0:
                res *= 2
        h = _swish(GroupNorm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
        return _conv(cfg.out_ch, 3, "conv_out", self.dtype)(h)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser (``quantize/embedding/embedding``: (n_embed, embed_dim)).

    ``__call__(z)`` with z (B, h, w, D) returns ``(z_q, indices (B, h*w), losses)`` where z_q carries the
    straight-through gradient (forward value = codebook entry, gradient flows to z) and ``losses`` holds
    ``codebook_loss`` = mean‖sg(z) − e‖², ``commitment_loss`` = mean‖z − sg(e)‖² (unweighted; taming uses
    ``codebook_loss + beta * commitment_loss`` with beta 0.25, given as ``quant_loss``).
    """

    n_embed: int
    embed_dim: int
    beta: float = 0.25
    dtype: Any = jnp.float32

    def setup(self) -> None:
        lim = 1.0 / self.n_embed

        def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
            # taming's codebook init: U(-1/n_embed, 1/n_embed)
            return jax.random.uniform(key, shape, dtype, -lim, lim)

        self.embedding = nn.Embed(self.n_embed, self.embed_dim, embedding_init=init, name="embedding")

    def nearest(self, z: Array) -> Array:
        """Indices (B, h*w) of the codebook rows closest to z (B, h, w, D) in squared distance."""
        b, hh, ww, d = z.shape
        flat = z.reshape(-1, d).astype(jnp.float32)
        codebook = self.embedding.embedding.astype(jnp.float32)
        dist = (
            jnp.sum(flat**2, axis=1, keepdims=True)
            - 2.0 * flat @ codebook.T
            + jnp.sum(codebook**2, axis=1)[None, :]
        )
        return jnp.argmin(dist, axis=1).reshape(b, hh * ww).astype(jnp.int32)

    def lookup(self, indices: Array, grid: tuple[int, int] | None = None) -> Array:
        """Codebook rows for indices (B, h*w) → (B, h, w, D); a square grid unless ``grid`` is given."""
        b, n = indices.shape
        if grid is None:
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(f"VQGAN: {n} codes do not form a square grid; pass grid=(h, w)")
            grid = (side, side)
        return self.embedding(indices).reshape(b, grid[0], grid[1], self.embed_dim).astype(self.dtype)

    def __call__(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
        indices = self.nearest(z)
        z_q = self.lookup(indices, (z.shape[1], z.shape[2])).astype(z.dtype)
        sg = jax.lax.stop_gradient
        codebook_loss = jnp.mean(jnp.square(sg(z).astype(jnp.float32) - z_q.astype(jnp.float32)))
        commitment_loss = jnp.mean(jnp.square(z.astype(jnp.float32) - sg(z_q).astype(jnp.float32)))
        z_st = z + sg(z_q - z)
        losses = {
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "quant_loss": codebook_loss + self.beta * commitment_loss,
        }
        return z_st, indices, losses


class VQModel(nn.Module):
    """The full VQGAN. Images (B, R, R, 3) in [0, 1]; codes (B, (R/f)²) int32; decoded images (B, R', R', 3) with
    R' = ``config.output_resolution`` (R unless the decoder has extra upsampling levels).

    Methods (call with ``model.apply({"params": p}, x, method=VQModel.encode)`` etc.):
      * ``encode(images) -> (quantised (B, r, r, embed_dim), indices (B, r*r))``
      * ``decode(quantised, clip=False) -> images (B, R', R', out_ch)``
      * ``decode_code(indices, clip=False) -> images (B, R', R', out_ch)``
      * ``__call__(images, deterministic=True) -> (reconstruction, aux)`` for training (with dropout > 0 and
        ``deterministic=False`` pass ``rngs={"dropout": key}``), with
        aux = {"indices", "quantised", "codebook_loss", "commitment_loss", "quant_loss"}.
    """

    config: VQGANConfig
    norm_groups: int = 32
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.norm_groups, self.dtype)
        self.quant_conv = nn.Conv(cfg.embed_dim, (1, 1), dtype=self.dtype)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, dtype=self.dtype)
        self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1), dtype=self.dtype)
        self.decoder = Decoder(cfg, self.norm_groups, self.dtype)

    def _pre_quant(self, images: Array, deterministic: bool) -> Array:
        # no [-1, 1] rescaling: the published dalle-mini VQGAN is used with [0, 1] pixels on both ends
        x = images.astype(self.dtype)
        return self.quant_conv(self.encoder(x, deterministic))

    def encode(self, images: Array, deterministic: bool = True) -> tuple[Array, Array]:
        z_q, indices, _ = self.quantize(self._pre_quant(images, deterministic))
        return z_q, indices

    def decode(self, quantised: Array, clip: bool = False, deterministic: bool = True) -> Array:
        x = self.decoder(self.post_quant_conv(quantised), deterministic)
        x = x.astype(jnp.float32)
        return jnp.clip(x, 0.0, 1.0) if clip else x

    def decode_code(self, indices: Array, clip: bool = False) -> Array:
        g = self.config.grid_size
        if indices.ndim != 2:
            raise ValueError(f"VQGAN: indices must be (B, h*w), got shape {indices.shape}")
        grid = (g, g) if indices.shape[1] == g * g else None
        return self.decode(self.quantize.lookup(indices, grid), clip=clip)

    def __call__(self, images: Array, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
        z_q, indices, losses = self.quantize(self._pre_quant(images, deterministic))
        recon = self.decode(z_q, deterministic=deterministic)
        return recon, {"indices": indices, "quantised": z_q, **losses}


def decoder_param_names() -> tuple[str, ...]:
    """Top-level entries the generation path needs (``decode_code``): the encoder may be dropped."""
    return ("quantize", "post_quant_conv", "decoder")


def param_shapes(config: VQGANConfig, norm_groups: int = 32) -> dict[str, Any]:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no allocation): the ``expected_shapes`` for
    :func:`engine.weights.load_params`."""
    x = jnp.zeros((1, config.resolution, config.resolution, config.in_channels))
    return jax.eval_shape(lambda: VQModel(config, norm_groups).init(jax.random.PRNGKey(0), x))["params"]
