"""``python -m engine inspect DIR_OR_PRESET``: config summary and parameter counts, without allocating weights.

Counting uses ``jax.eval_shape`` only, so ``inspect mini`` and ``inspect mega`` (2.6 B parameters) run on a
laptop. A directory may be a whole checkpoint (``dallebart/``, ``vqgan/``, ``clip/``) or one part of it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np

from engine.config import PRESETS, CLIPConfig, ConfigError, DalleBartConfig, VQGANConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _shapes(config: Any) -> Any:
    if isinstance(config, DalleBartConfig):
        from engine.models.dallebart import param_shapes

        return param_shapes(config)
    if isinstance(config, VQGANConfig):
        from engine.models.vqgan import param_shapes

        return param_shapes(config, norm_groups=config.norm_groups)
    from engine.models.clip import param_shapes

    return param_shapes(config)


def component_counts(config: Any) -> dict[str, int]:
    """Parameter count per top-level component (e.g. encoder / decoder / lm_head), by shape evaluation."""
    counts: dict[str, int] = defaultdict(int)
    flat = jax.tree_util.tree_flatten_with_path(_shapes(config))[0]
    for path, leaf in flat:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] == "model" and len(keys) > 1:  # DalleBart: model/encoder, model/decoder
            keys = keys[1:]
        counts[keys[0]] += int(np.prod(leaf.shape))
    return dict(counts)


def summary(config: Any) -> str:
    if isinstance(config, DalleBartConfig):
        return (
            f"DalleBart d_model={config.d_model} layers={config.encoder_layers}+{config.decoder_layers} "
            f"heads={config.decoder_attention_heads} glu={config.decoder_ffn_dim} "
            f"text_vocab={config.encoder_vocab_size} "
            f"image_vocab={config.image_vocab_size}(+1) codes={config.num_image_codes} "
            f"text_len={config.max_text_length} image_len={config.image_length}"
        )
    if isinstance(config, VQGANConfig):
        return (
            f"VQGAN resolution={config.resolution} ch={config.ch} ch_mult={list(config.ch_mult)} "
            + (f"decoder_ch_mult={list(config.decoder_ch_mult)} " if config.decoder_ch_mult is not None else "")
            + f"res_blocks={config.num_res_blocks} codebook={config.n_embed}x{config.embed_dim} "
            f"factor={config.downsample_factor} grid={config.grid_size}x{config.grid_size}"
        )
    v, t = config.vision_config, config.text_config
    return (
        f"CLIP vision {v.hidden_size}d x{v.num_hidden_layers} patch={v.patch_size} image={v.image_size}; "
        f"text {t.hidden_size}d x{t.num_hidden_layers} vocab={t.vocab_size} len={t.max_position_embeddings}; "
        f"projection={config.projection_dim}"
    )


def _part_config(directory: Path) -> Any:
    import json

    raw = json.loads((directory / "config.json").read_text())
    if "text_config" in raw and "vision_config" in raw:
        return CLIPConfig.from_json(directory)
    if "n_embed" in raw or "ch_mult" in raw:
        return VQGANConfig.from_json(directory)
    return DalleBartConfig.from_json(directory)


def targets(name: str) -> list[tuple[str, Any, Path | None]]:
    """(label, config, directory or None) for a preset name or a checkpoint directory."""
    if name in PRESETS:
        return [(name, PRESETS[name], None)]
    path = Path(name)
    if not path.is_dir():
        raise ConfigError(f"{name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    if (path / "config.json").is_file():
        return [(path.name, _part_config(path), path)]
    parts = [(p, _part_config(path / p), path / p) for p in ("dallebart", "vqgan", "clip")
             if (path / p / "config.json").is_file()]
    if not parts:
        raise ConfigError(f"{path}: no config.json here or in dallebart/, vqgan/, clip/")
    return parts


def report(name: str, dtype: str = "float32") -> str:
    lines = []
    total = 0
    for label, config, directory in targets(name):
        counts = component_counts(config)
        n = sum(counts.values())
        total += n
        lines.append(f"[{label}] {summary(config)}")
        for comp, c in sorted(counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {comp:<24} {c:>15,d}")
        lines.append(f"    {'total':<24} {n:>15,d} params = {n * _BYTES[dtype] / 2**20:,.1f} MiB as {dtype}")
        if directory is not None:
            files = [f for f in directory.iterdir() if f.is_file() and f.suffix in (".msgpack", ".safetensors", ".bin")]
            for f in files:
                lines.append(f"    file {f.name}: {f.stat().st_size / 2**20:,.1f} MiB on disk")
    if len(lines) and total:
        lines.append(f"all parts: {total:,d} params = {total * _BYTES[dtype] / 2**20:,.1f} MiB as {dtype}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        print(report(args.target, args.dtype))
    except (ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    return 0


def add_inspect(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="config summary and parameter counts (no weights allocated)")
    p.add_argument("target", help=f"a checkpoint directory or a preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--dtype", choices=sorted(_BYTES), default="float32", help="dtype for the size estimate")
    p.set_defaults(func=cmd_inspect)
