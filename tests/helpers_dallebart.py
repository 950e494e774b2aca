"""Tiny DalleBart configs, random params and checkpoint writers in the published layouts (for tests).

Reusable by other test modules: ``tiny_config()``, ``random_params(config, seed)``,
``write_checkpoint(dir, params, config, scanned=True)`` writes ``config.json`` + ``flax_model.msgpack``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import serialization, traverse_util

from engine.config import DalleBartConfig
from engine.models.dallebart import param_shapes, scan_params, unscan_params


def tiny_config(**overrides: Any) -> DalleBartConfig:
    """A DalleBart with the published structure and toy sizes (d 64, 2+2 layers, 4 heads, GLU 48)."""
    base = dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        encoder_vocab_size=100,
        image_vocab_size=64,
        max_text_length=16,
        image_length=16,
        decoder_start_token_id=64,
        bos_token_id=65,
        eos_token_id=65,
        pad_token_id=65,
        valid_image_codes=60,
        init_std=0.1,
    )
    base.update(overrides)
    return DalleBartConfig(**base)


def random_params(config: DalleBartConfig, seed: int = 0, std: float = 0.1) -> dict:
    """Random numpy float32 params in the config's layout; LN scales ≈ 1 and biases ≈ 0 but all perturbed."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(param_shapes(config))
    out = {}
    for path, spec in flat.items():
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        if path[-1] == "scale":
            out[path] = 1.0 + 0.1 * noise
        elif path[-1] == "bias":
            out[path] = 0.1 * noise
        else:
            out[path] = std * noise
    return traverse_util.unflatten_dict(out)


def write_checkpoint(directory: str | Path, params: dict, config: DalleBartConfig, scanned: bool = True) -> Path:
    """Write ``config.json`` and ``flax_model.msgpack`` (scanned or unscanned layout) like HF ``save_pretrained``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tree = _to_numpy(scan_params(params) if scanned else unscan_params(params))
    (directory / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    cfg = config.to_dict()
    cfg["use_scan"] = scanned
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


# ----------------------------------------------------------------------------------------------
# min-dalle (PyTorch) mapping, for parity tests
# ----------------------------------------------------------------------------------------------

_LAYER_LN = {
    "pre_self_attn_layer_norm": "LayerNorm_0",
    "self_attn_layer_norm": "LayerNorm_1",
    "pre_encoder_attn_layer_norm": "LayerNorm_2",
    "encoder_attn_layer_norm": "LayerNorm_3",
}
_ATTN = {"self_attn": "FlaxBartAttention_0", "encoder_attn": "FlaxBartAttention_1"}
_GLU = {"ln0": "LayerNorm_0", "ln1": "LayerNorm_1", "fc0": "Dense_0", "fc1": "Dense_1", "fc2": "Dense_2"}


def _flax_leaf(side_tree: dict, parts: list[str], torch_leaf: str, width: int) -> np.ndarray:
    """Value for one torch parameter given the flax sub-tree it comes from (LN weight ≡ 1 when no scale)."""
    node = side_tree
    for p in parts:
        node = node[p]
    if torch_leaf == "weight" and "kernel" in node:
        return np.asarray(node["kernel"]).T
    if torch_leaf == "weight" and "embedding" in node:
        return np.asarray(node["embedding"])
    if torch_leaf == "weight":  # LayerNorm
        return np.asarray(node["scale"]) if "scale" in node else np.ones((width,), np.float32)
    if torch_leaf == "bias":
        return np.asarray(node["bias"])
    raise KeyError(torch_leaf)


def torch_state_dict(module: Any, params: dict, side: str) -> dict:
    """Build a state dict for a min-dalle ``DalleBartEncoder``/``DalleBartDecoder`` from our (any-layout) params."""
    import torch

    tree = unscan_params(params)
    side_tree = tree["model"][side]
    layer_prefix = "FlaxBartEncoderLayer_" if side == "encoder" else "FlaxBartDecoderLayer_"
    out = {}
    for key, ref in module.state_dict().items():
        parts = key.split(".")
        leaf = parts[-1]
        if parts[0] == "lm_head":
            value = np.asarray(tree["lm_head"]["kernel"]).T
        elif parts[0] == "layers":
            path = ["layers", f"{layer_prefix}{parts[1]}"]
            rest = parts[2:-1]
            if rest[0] in _LAYER_LN:
                path.append(_LAYER_LN[rest[0]])
            elif rest[0] in _ATTN:
                path += [_ATTN[rest[0]], rest[1]]
            elif rest[0] == "glu":
                path += ["GLU_0", _GLU[rest[1]]]
            else:
                raise KeyError(key)
            value = _flax_leaf(side_tree, path, leaf, ref.shape[0])
        else:
            value = _flax_leaf(side_tree, parts[:-1], leaf, ref.shape[0])
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{key}: mapped shape {value.shape} != torch shape {tuple(ref.shape)}")
        out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out
