"""min-dalle 0.4.11 (PyTorch, CPU) as the baseline sampler, running OUR weights.

min-dalle's own modules do the work: ``DalleBartEncoder``, ``DalleBartDecoder`` and its per-step sampler
``DalleBartDecoder.sample_tokens`` (its KV cache ``(L, 4B, 256, d)``, keys of all rows then values, written in
place). :class:`MinDalleSampler` drives them the way ``MinDalle.generate_raw_image_stream`` does: one prompt
encoded as two rows ``[uncond; cond]``, expanded to ``2B`` rows (B unconditional first, then B conditional), the
same start token for every row, then one ``sample_tokens`` call per image position. The start token is our
config's ``decoder_start_token_id`` (min-dalle hard-codes 2**14 - 1, which small vocabularies do not have), so
both samplers decode from the same input. What we leave out of its
loop: the progressive VQGAN decode, ``torch.cuda.empty_cache()`` and CUDA autocast (no-ops on a CPU).

Weights come from our param tree (published names, either layout): every flax kernel ``[in, out]`` becomes a
torch ``Linear.weight`` ``[out, in]``; bias-only LayerNorms get weight 1. ``dtype="bfloat16"`` casts the modules,
the encoder state and the cache to bfloat16 (min-dalle's own bf16 path is CUDA autocast, which does nothing on
a CPU, so a cast is the closest CPU equivalent).

Limits of min-dalle itself: 256 image positions (``IMAGE_TOKEN_COUNT``), its encoder embeds exactly two rows,
and it samples among the first 2**14 logits (so with fewer codes it may emit the start token).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from engine.config import DalleBartConfig
from engine.models.layout import unscan_params

_LAYER_LN = {
    "pre_self_attn_layer_norm": "LayerNorm_0",
    "self_attn_layer_norm": "LayerNorm_1",
    "pre_encoder_attn_layer_norm": "LayerNorm_2",
    "encoder_attn_layer_norm": "LayerNorm_3",
}
_ATTN = {"self_attn": "FlaxBartAttention_0", "encoder_attn": "FlaxBartAttention_1"}
_GLU = {"ln0": "LayerNorm_0", "ln1": "LayerNorm_1", "fc0": "Dense_0", "fc1": "Dense_1", "fc2": "Dense_2"}


def unavailable_reason(config: DalleBartConfig | None = None) -> str | None:
    """Why min-dalle cannot run here (not installed, or a config it cannot express); None when it can."""
    try:
        from min_dalle.models import dalle_bart_decoder
    except Exception as exc:  # ImportError, or its __init__ failing on a missing `requests`
        return f"min-dalle not importable ({type(exc).__name__}: {exc})"
    if config is not None and config.image_length != dalle_bart_decoder.IMAGE_TOKEN_COUNT:
        return (
            f"min-dalle hard-codes {dalle_bart_decoder.IMAGE_TOKEN_COUNT} image positions; "
            f"this config has image_length={config.image_length}"
        )
    return None


def _leaf(tree: dict, path: list[str], torch_leaf: str, width: int) -> np.ndarray:
    """Our value for one torch parameter, found at ``path`` in our unscanned tree."""
    node = tree
    for part in path:
        node = node[part]
    if torch_leaf == "weight":
        if "kernel" in node:
            return np.asarray(node["kernel"]).T
        if "embedding" in node:
            return np.asarray(node["embedding"])
        return np.asarray(node["scale"]) if "scale" in node else np.ones((width,), np.float32)
    if torch_leaf == "bias":
        return np.asarray(node["bias"])
    raise KeyError(f"no mapping for torch leaf {torch_leaf!r} at {'/'.join(path)}")


def state_dict_for(module: Any, params: dict, side: str) -> dict:
    """Torch state dict (float32) for min-dalle's ``DalleBartEncoder`` (side "encoder") or decoder from our params.

    Every key of ``module.state_dict()`` is filled; a shape mismatch raises ``ValueError`` naming the key.
    """
    import torch

    tree = unscan_params(params)
    side_tree = tree["model"][side]
    layer_name = "FlaxBartEncoderLayer_" if side == "encoder" else "FlaxBartDecoderLayer_"
    out = {}
    for key, ref in module.state_dict().items():
        parts = key.split(".")
        leaf, node = parts[-1], parts[:-1]
        if node == ["lm_head"]:
            value = np.asarray(tree["lm_head"]["kernel"]).T
        elif node[0] == "layers":
            path = ["layers", f"{layer_name}{node[1]}"]
            sub = node[2:]
            if sub[0] in _LAYER_LN:
                path.append(_LAYER_LN[sub[0]])
            elif sub[0] in _ATTN:
                path += [_ATTN[sub[0]], sub[1]]
            elif sub[0] == "glu":
                path += ["GLU_0", _GLU[sub[1]]]
            else:
                raise KeyError(f"no mapping for min-dalle parameter {key}")
            value = _leaf(side_tree, path, leaf, ref.shape[0])
        else:
            value = _leaf(side_tree, node, leaf, ref.shape[0])
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{key}: our shape {tuple(value.shape)} != min-dalle shape {tuple(ref.shape)}")
        out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out


def build_modules(config: DalleBartConfig, params: dict) -> tuple[Any, Any]:
    """min-dalle's ``DalleBartEncoder`` and ``DalleBartDecoder`` (float32, CPU) holding our ``params``."""
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder

    encoder = DalleBartEncoder(
        layer_count=config.encoder_layers,
        embed_count=config.d_model,
        attention_head_count=config.encoder_attention_heads,
        text_vocab_count=config.encoder_vocab_size,
        text_token_count=config.max_text_length,
        glu_embed_count=config.encoder_ffn_dim,
        device="cpu",
    )
    encoder.load_state_dict(state_dict_for(encoder, params, "encoder"), strict=True)
    decoder = DalleBartDecoder(
        image_vocab_count=config.image_vocab_size,
        embed_count=config.d_model,
        attention_head_count=config.decoder_attention_heads,
        glu_embed_count=config.decoder_ffn_dim,
        layer_count=config.decoder_layers,
        device="cpu",
    )
    decoder.load_state_dict(state_dict_for(decoder, params, "decoder"), strict=True)
    return encoder, decoder


class MinDalleSampler:
    """min-dalle's encoder, decoder and sampling step with our weights (see the module docstring).

    ``MinDalleSampler(config, params, dtype="float32", threads=None)``; ``threads`` defaults to the machine's
    cores (what min-dalle sets on import). Use :meth:`encode`, :meth:`start` and :meth:`steps` to time the parts,
    or :meth:`sample` for the whole loop.
    """

    def __init__(self, config: DalleBartConfig, params: dict, dtype: str = "float32", threads: int | None = None):
        reason = unavailable_reason(config)
        if reason:
            raise RuntimeError(reason)
        import torch

        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"min-dalle baseline runs float32 or bfloat16, not {dtype!r}")
        torch.set_num_threads(int(threads or os.cpu_count() or 1))
        self.torch = torch
        self.config = config
        self.dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        self.encoder, self.decoder = build_modules(config, params)
        self.encoder = self.encoder.to(self.dtype).eval()
        self.decoder = self.decoder.to(self.dtype).eval()

    def encode(self, enc_ids: Any, uncond_ids: Any) -> Any:
        """One prompt: enc_ids, uncond_ids (T,) ints (pad id 1) -> encoder state (2, T, d), rows [uncond, cond]."""
        torch = self.torch
        tokens = torch.from_numpy(np.stack([np.asarray(uncond_ids), np.asarray(enc_ids)]).astype(np.int64))
        with torch.inference_mode():
            return self.encoder.forward(tokens), tokens

    def start(
        self, encoded: Any, batch: int, scale: float = 10.0, top_k: int = 50, temperature: float = 1.0,
        start_token: int | None = None,
    ) -> dict:
        """Expand one prompt's encoding to ``batch`` images and make the empty cache (min-dalle's loop set-up)."""
        torch = self.torch
        state, tokens = encoded
        rows = [0] * batch + [1] * batch
        start = self.config.decoder_start_token_id if start_token is None else int(start_token)
        image_tokens = torch.full((batch, self.config.image_length + 1), start, dtype=torch.long)
        return {
            "encoder_state": state[rows].contiguous(),
            "attention_mask": tokens[rows].not_equal(1)[:, None, None, :],
            "attention_state": torch.zeros(
                (self.config.decoder_layers, 4 * batch, self.config.image_length, self.config.d_model),
                dtype=self.dtype,
            ),
            "image_tokens": image_tokens,
            "settings": torch.tensor([temperature, top_k, scale], dtype=torch.float32),
            "token_indices": torch.arange(self.config.image_length),
        }

    def steps(self, state: dict, begin: int, count: int) -> None:
        """Sample positions ``begin .. begin+count-1`` in place (one ``sample_tokens`` call each)."""
        torch = self.torch
        tokens = state["image_tokens"]
        with torch.inference_mode():
            for i in range(begin, begin + count):
                tokens[:, i + 1], state["attention_state"] = self.decoder.sample_tokens(
                    settings=state["settings"],
                    attention_mask=state["attention_mask"],
                    encoder_state=state["encoder_state"],
                    attention_state=state["attention_state"],
                    prev_tokens=tokens[:, [i]],
                    token_index=state["token_indices"][[i]],
                )

    def sample(
        self, enc_ids: Any, uncond_ids: Any, batch: int, *, seed: int = 0, scale: float = 10.0, top_k: int = 50,
        temperature: float = 1.0, start_token: int | None = None,
    ) -> np.ndarray:
        """All ``image_length`` tokens for ``batch`` images of one prompt -> (batch, image_length) int64."""
        self.torch.manual_seed(seed)
        state = self.start(self.encode(enc_ids, uncond_ids), batch, scale, top_k, temperature, start_token)
        self.steps(state, 0, self.config.image_length)
        return state["image_tokens"][:, 1:].numpy()
