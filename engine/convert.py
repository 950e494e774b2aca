"""PyTorch-layout state dicts → our Flax parameter trees (renames and transposes only, no torch needed).

Rules (as transformers' ``rename_key_and_reshape_tensor`` does for Flax):
  * Linear ``weight`` [out, in]      → ``kernel`` [in, out] (transpose);
  * Conv ``weight`` [O, I, H, W]     → ``kernel`` [H, W, I, O];
  * LayerNorm/GroupNorm ``weight``   → ``scale``;
  * Embedding ``weight``             → ``embedding``.

Supported sources:
  * HF ``CLIPModel`` (``model.safetensors`` / ``pytorch_model.bin``) → :mod:`engine.models.clip` tree;
  * taming-transformers ``VQModel`` (``state_dict`` of the ``.ckpt``; ``loss.*`` discriminator entries are
    dropped) and min-dalle's ``VQGanDetokenizer`` (decoder path only) → :mod:`engine.models.vqgan` tree.

Values are numpy arrays in, numpy arrays out; a torch tensor is accepted and converted with ``.numpy()``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import unflatten_dict


class ConversionError(ValueError):
    """A state dict has a key or shape the converter does not understand."""


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _weight(path: list[str], value: np.ndarray, *, embedding_names: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Rename/reshape one ``weight`` leaf by the kind of layer its shape and name reveal."""
    owner = path[-2] if len(path) >= 2 else ""
    if owner in embedding_names:
        return path[:-1] + ["embedding"], value
    if value.ndim == 4:
        return path[:-1] + ["kernel"], np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
        return path[:-1] + ["kernel"], value.T
    if value.ndim == 1:
        return path[:-1] + ["scale"], value
    raise ConversionError(f"don't know how to convert {'.'.join(path)} with shape {value.shape}")


# ----------------------------------------------------------------------------------------------
# CLIP (HF CLIPModel)
# ----------------------------------------------------------------------------------------------

_CLIP_SKIP = re.compile(r"(^|\.)position_ids$")


def clip_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """HF ``CLIPModel`` torch state dict → nested tree for :class:`engine.models.clip.CLIPModel`.

    Key layout is unchanged apart from ``.`` → nesting (``text_model/encoder/layers/0/...``); the
    ``position_ids`` buffers are dropped; ``class_embedding`` and ``logit_scale`` are copied as they are.
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        if _CLIP_SKIP.search(key):
            continue
        arr = _to_numpy(value)
        path = key.split(".")
        if path[-1] == "weight":
            path, arr = _weight(path, arr, embedding_names=("token_embedding", "position_embedding"))
        flat[tuple(path)] = arr
    if not any(k[0] == "text_model" for k in flat) and not any(k[0] == "vision_model" for k in flat):
        raise ConversionError("not a CLIPModel state dict: no text_model.* or vision_model.* keys")
    return unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# VQGAN (taming-transformers / min-dalle)
# ----------------------------------------------------------------------------------------------

_LIST_MODULES = re.compile(r"^(down|up|block|attn)$")


def vqgan_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """taming ``VQModel`` or min-dalle ``VQGanDetokenizer`` state dict → our VQGAN tree.

    ``decoder.up.4.block.0.norm1.weight`` → ``decoder/up_4/block_0/norm1/scale``; min-dalle's top-level
    ``embedding.weight`` and taming's ``quantize.embedding.weight`` → ``quantize/embedding/embedding``.
    A taming checkpoint's ``{"state_dict": ...}`` wrapper is accepted; ``loss.*`` entries are dropped.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        if key.startswith("loss."):
            continue
        arr = _to_numpy(value)
        parts = key.split(".")
        if parts[0] == "embedding":  # min-dalle keeps the codebook at the top level
            parts = ["quantize"] + parts
        path: list[str] = []
        i = 0
        while i < len(parts):
            # taming's ModuleLists ``down.0`` / ``block.1`` become ``down_0`` / ``block_1``
            if _LIST_MODULES.match(parts[i]) and i + 1 < len(parts) and parts[i + 1].isdigit():
                path.append(f"{parts[i]}_{parts[i + 1]}")
                i += 2
            else:
                path.append(parts[i])
                i += 1
        if path[-1] == "weight":
            path, arr = _weight(path, arr, embedding_names=("embedding",))
        flat[tuple(path)] = arr
    if not any(k[0] in ("decoder", "encoder") for k in flat):
        raise ConversionError("not a VQGAN state dict: no encoder.* or decoder.* keys")
    return unflatten_dict(flat)


def detect_and_convert(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Pick the converter from the keys: CLIP (``text_model.*``/``vision_model.*``) or VQGAN."""
    keys = list(state_dict.keys())
    if "state_dict" in state_dict:
        return vqgan_from_torch(state_dict)
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        return clip_from_torch(state_dict)
    if any(k.startswith(("decoder.", "encoder.")) for k in keys):
        return vqgan_from_torch(state_dict)
    sample = ", ".join(sorted(keys)[:3])
    raise ConversionError(f"unrecognised PyTorch state dict (first keys: {sample}); pass a converter explicitly")
