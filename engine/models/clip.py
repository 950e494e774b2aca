"""OpenAI CLIP (Radford et al., 2021) in Flax linen, parameter tree in the HF Flax ``CLIPModel`` layout.

Used to rank generated images against their prompt: score = exp(logit_scale) · cos(image, text).

Layout (so an HF ``flax_model.msgpack`` restores as is)::

    text_model/embeddings/{token_embedding,position_embedding}/embedding
    text_model/encoder/layers/{i}/{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/{fc1,fc2}, layer_norm2}
    text_model/final_layer_norm
    vision_model/embeddings/{class_embedding, patch_embedding/kernel, position_embedding/embedding}
    vision_model/pre_layrnorm (sic), vision_model/encoder/layers/{i}/..., vision_model/post_layernorm
    visual_projection/kernel, text_projection/kernel, logit_scale

Images are NHWC. :func:`preprocess` does CLIP's resize → centre crop → normalise in jax.image, jittable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engine.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, ConfigError

Array = jax.Array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ConfigError(f"CLIP: hidden_act={name!r} is not supported")


class Attention(nn.Module):
    """Multi-head self-attention: (B, T, D) → (B, T, D); ``bias`` is additive, broadcast to (B, H, T, T)."""

    hidden: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        b, t, _ = x.shape
        if self.hidden % self.heads:
            raise ConfigError(f"CLIP: hidden_size {self.hidden} is not divisible by {self.heads} heads")
        hd = self.hidden // self.heads

        def proj(name: str) -> Array:
            return nn.Dense(self.hidden, dtype=self.dtype, name=name)(x).reshape(b, t, self.heads, hd)

        q, k, v = proj("q_proj") * hd**-0.5, proj("k_proj"), proj("v_proj")
        w = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            w = w + bias
        w = jax.nn.softmax(w, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, self.hidden)
        return nn.Dense(self.hidden, dtype=self.dtype, name="out_proj")(out)


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)); x + MLP(LN(x)) with fc1 → act → fc2."""

    hidden: int
    heads: int
    intermediate: int
    act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        h = nn.LayerNorm(self.eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + Attention(self.hidden, self.heads, self.dtype, name="self_attn")(h, bias)
        h = nn.LayerNorm(self.eps, dtype=self.dtype, name="layer_norm2")(x)
        x = x + MLP(self.hidden, self.intermediate, self.act, self.dtype, name="mlp")(h)
        return x


class MLP(nn.Module):
    hidden: int
    intermediate: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _activation(self.act)(nn.Dense(self.intermediate, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.hidden, dtype=self.dtype, name="fc2")(x)


class LayerStack(nn.Module):
    """``num_hidden_layers`` × :class:`EncoderLayer`, named ``0``, ``1``, ... (the HF layout)."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        c = self.config
        for i in range(c.num_hidden_layers):
            x = EncoderLayer(
                c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                self.dtype, name=str(i),
            )(x, bias)
        return x


class Encoder(nn.Module):
    """The transformer body: ``encoder/layers/{i}``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        return LayerStack(self.config, self.dtype, name="layers")(x, bias)


class TextTransformer(nn.Module):
    """input_ids (B, T) int → pooled (B, D) at the EOS position (argmax of the ids, as OpenAI/HF do)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        c = self.config
        b, t = input_ids.shape
        if t > c.max_position_embeddings:
            raise ValueError(f"CLIP text: {t} tokens exceed max_position_embeddings={c.max_position_embeddings}")
        emb = Embeddings(c, self.dtype, name="embeddings")
        x = emb(input_ids)
        neg = jnp.finfo(jnp.float32).min
        causal = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, neg)[None, None]
        bias = causal
        if attention_mask is not None:
            bias = bias + jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg)
            bias = jnp.maximum(bias, neg)
        x = Encoder(c, self.dtype, name="encoder")(x, bias)
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        eos = jnp.argmax(input_ids, axis=-1)
        return x[jnp.arange(b), eos]


class Embeddings(nn.Module):
    """Token + learned absolute position embeddings (text)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        c = self.config
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(input_ids.shape[1])[None]
        )
        return tok + pos


class VisionEmbeddings(nn.Module):
    """pixels (B, S, S, C) → [class; patches] + positions: (B, 1 + (S/p)², D). Patch conv has no bias."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        c = self.config
        b, s1, s2, _ = pixel_values.shape
        if (s1, s2) != (c.image_size, c.image_size):
            raise ValueError(f"CLIP vision: expected {c.image_size}×{c.image_size} pixels, got {s1}×{s2}")
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        patches = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size), padding="VALID",
            use_bias=False, dtype=self.dtype, name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
        n_pos = (c.image_size // c.patch_size) ** 2 + 1
        pos = nn.Embed(n_pos, c.hidden_size, dtype=self.dtype, name="position_embedding")(jnp.arange(n_pos)[None])
        return x + pos


class VisionTransformer(nn.Module):
    """pixel_values (B, S, S, 3) normalised → pooled class token (B, D) after post-LN."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        c = self.config
        x = VisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        x = Encoder(c, self.dtype, name="encoder")(x, None)
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
    """CLIP with both towers. Methods (via ``apply(..., method=CLIPModel.get_image_features)``):

    * ``get_image_features(pixel_values (B, S, S, 3)) -> (B, projection_dim)`` (not normalised)
    * ``get_text_features(input_ids (B, T), attention_mask (B, T) | None) -> (B, projection_dim)``
    * ``__call__(input_ids, pixel_values, attention_mask=None) ->
      (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img), image_embeds, text_embeds)``
      with L2-normalised embeds and logits = exp(logit_scale) · cosine.
    """

    config: CLIPConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.text_model = TextTransformer(c.text_config, self.dtype)
        self.vision_model = VisionTransformer(c.vision_config, self.dtype)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale", lambda _k, shape: jnp.full(shape, c.logit_scale_init_value, jnp.float32), ()
        )

    def get_image_features(self, pixel_values: Array) -> Array:
        return self.visual_projection(self.vision_model(pixel_values))

    def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def __call__(
        self, input_ids: Array, pixel_values: Array, attention_mask: Array | None = None
    ) -> tuple[Array, Array, Array, Array]:
        image = self.get_image_features(pixel_values).astype(jnp.float32)
        text = self.get_text_features(input_ids, attention_mask).astype(jnp.float32)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        logits_per_text = jnp.exp(self.logit_scale) * text @ image.T
        return logits_per_text.T, logits_per_text, image, text


def dummy_inputs(config: CLIPConfig, batch: int = 1) -> tuple[Array, Array]:
    """Zero ``(input_ids (B, 77), pixel_values (B, S, S, 3))`` for ``init`` / ``jax.eval_shape``."""
    v = config.vision_config
    ids = jnp.zeros((batch, config.text_config.max_position_embeddings), jnp.int32)
    return ids, jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)


def preprocess(images: Array | np.ndarray, image_size: int = 224) -> Array:
    """CLIP image preprocessing, jittable: (B, H, W, 3) uint8 or float in [0, 1] → (B, S, S, 3) normalised.

    Resize so the shortest side is ``image_size`` (bicubic, antialiased when shrinking), centre-crop to
    ``image_size`` square, then ``(x - mean) / std`` with the CLIP statistics. Unlike HF's PIL path the
    resized image is not rounded back to uint8 (differences are at the 1/255 level).
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"CLIP preprocess: expected (B, H, W, 3) images, got shape {x.shape}")
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    b, h, w, _ = x.shape
    short = min(h, w)
    # HF: the long side becomes int(size * long / short)
    nh = image_size if h == short else int(image_size * h / short)
    nw = image_size if w == short else int(image_size * w / short)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, 3), method="bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def param_shapes(config: CLIPConfig) -> dict[str, Any]:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no allocation): the ``expected_shapes`` for
    :func:`engine.weights.load_params`."""
    return jax.eval_shape(lambda: CLIPModel(config).init(jax.random.PRNGKey(0), *dummy_inputs(config)))["params"]
