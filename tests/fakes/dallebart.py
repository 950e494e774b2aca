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
from engine.models.dallebart import param_shapes
from engine.models.layout import scan_params, unscan_params


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
