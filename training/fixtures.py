"""Tiny random checkpoints for tests and benches, in the layout :func:`engine.pipeline.load_pipeline` reads.

:func:`random_checkpoint` writes a whole checkpoint directory (DalleBart, VQGAN, optionally CLIP, tokenizers trained
on a small built-in corpus) with numpy-random weights in the published parameter trees, so the engine loads it
exactly as it loads the published files (nothing is ever downloaded). :func:`write_checkpoint` writes one from
given configs and params.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from engine import weights
from engine.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, DalleBartConfig, VQGANConfig
from engine.models import clip as clip_model
from engine.models import vqgan as vqgan_model
from engine.models.dallebart import param_shapes
from training.tokenizer import train_bpe, train_clip_bpe

# words for the tokenizers of random checkpoints: the shapes vocabulary plus a few everyday ones
CORPUS = [
    "a red circle", "a small blue square on the left", "a large green star at the top",
    "a yellow triangle below a purple circle", "an orange star on a white background",
    "a black square right of a red triangle", "a cat wearing a hat", "a picture of a dog",
    "an image showing a house in the middle", "the sun over the sea at night",
] * 4


def write_part(directory: Path, config: Any, params: Any, tokenizer_dir: Path | None = None) -> Path:
    """``directory/config.json`` + ``flax_model.msgpack`` (+ tokenizer files copied from ``tokenizer_dir``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    weights.save_params(directory / "flax_model.msgpack", params)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def write_checkpoint(
    directory: str | Path,
    *,
    dallebart: tuple[DalleBartConfig, Any, Path],
    vqgan: tuple[VQGANConfig, Any],
    clip: tuple[CLIPConfig, Any, Path] | None = None,
    safety: dict | None = None,
    checkpoint_id: str | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write a whole checkpoint directory: ``(config, params, tokenizer_dir)`` per model part, ``checkpoint.json``
    with ``checkpoint_id`` (default: the directory's name) and ``metadata``, and ``safety.json`` if given."""
    directory = Path(directory)
    write_part(directory / "dallebart", dallebart[0], dallebart[1], dallebart[2])
    write_part(directory / "vqgan", vqgan[0], vqgan[1])
    if clip is not None:
        write_part(directory / "clip", clip[0], clip[1], clip[2])
    if safety is not None:
        (directory / "safety.json").write_text(json.dumps(safety, indent=2))
    meta = dict(metadata or {})
    meta["id"] = checkpoint_id or directory.name
    (directory / "checkpoint.json").write_text(json.dumps(meta, indent=2))
    return directory


def tiny_configs(grid: int = 4, codes: int = 64) -> tuple[DalleBartConfig, VQGANConfig, CLIPConfig]:
    """Small configs with the published structure (a ``grid``×``grid`` token image, ``codes`` VQGAN codes)."""
    db = DalleBartConfig(
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_vocab_size=400, image_vocab_size=codes,
        decoder_start_token_id=codes, bos_token_id=codes + 1, eos_token_id=codes + 1, pad_token_id=codes + 1,
        max_text_length=16, image_length=grid * grid,
    )
    vq = VQGANConfig(
        resolution=grid * 4, ch=8, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(grid,),
        z_channels=8, embed_dim=8, n_embed=codes,
    )
    clip = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=16),
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=8,
    )
    return db, vq, clip


# leaves a fresh model initialises to a constant, by name (everything else is drawn from N(0, std))
CONSTANT_LEAVES = {"scale": 1.0, "bias": 0.0, "logit_scale": 2.6592}


def leaf_name(path: tuple) -> str:
    """The last key of a pytree path (``kernel``, ``scale``...)."""
    return str(getattr(path[-1], "key", path[-1]))


def random_like(shapes: Any, rng: np.random.Generator, std: float = 0.02) -> Any:
    """Random float32 values for a tree of shapes: N(0, std) weights, LayerNorm/GroupNorm scale 1 and bias 0.

    Much faster than running the models' ``init`` (whose XLA:CPU compile of the random initialisers takes tens of
    seconds for a VQGAN), and the statistics are what a freshly initialised model has.
    """

    def fill(path: tuple, leaf: Any) -> np.ndarray:
        constant = CONSTANT_LEAVES.get(leaf_name(path))
        if constant is not None:
            return np.full(leaf.shape, constant, np.float32)
        return (rng.standard_normal(leaf.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def random_checkpoint(
    directory: str | Path,
    configs: tuple[DalleBartConfig, VQGANConfig, CLIPConfig] | None = None,
    *,
    seed: int = 0,
    with_clip: bool = True,
    safety: dict | None = None,
    checkpoint_id: str | None = None,
) -> Path:
    """A random checkpoint directory (tokenizers trained on :data:`CORPUS`), id ``checkpoint_id`` (default
    ``random-<seed>``). The same ``seed`` and configs give the same weights."""
    directory = Path(directory)
    db_cfg, vq_cfg, clip_cfg = configs or tiny_configs()
    rng = np.random.default_rng(seed)
    tok_dir = train_bpe(CORPUS, db_cfg.encoder_vocab_size, directory / "_tok_bart")
    db_params = random_like(param_shapes(db_cfg), rng)
    vq_params = random_like(vqgan_model.param_shapes(vq_cfg, norm_groups=vq_cfg.norm_groups), rng)
    clip_part = None
    if with_clip:
        clip_tok = train_clip_bpe(CORPUS, clip_cfg.text_config.vocab_size, directory / "_tok_clip")
        clip_part = (clip_cfg, random_like(clip_model.param_shapes(clip_cfg), rng), clip_tok)
    out = write_checkpoint(
        directory, dallebart=(db_cfg, db_params, tok_dir), vqgan=(vq_cfg, vq_params), clip=clip_part,
        safety=safety, checkpoint_id=checkpoint_id or f"random-{seed}",
    )
    for tmp in ("_tok_bart", "_tok_clip"):
        shutil.rmtree(directory / tmp, ignore_errors=True)
    return out
