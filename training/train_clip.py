"""Contrastive CLIP training on (image, caption) pairs of the shapes dataset.

Symmetric InfoNCE over the batch (Radford et al. 2021) with one change for this dataset: many images share a
caption ("a red circle"), so every pair whose captions are equal counts as a positive — the target of each
row is uniform over the rows with the same caption — instead of punishing the model for matching them.
Blank captions are left out (CLIP ranks images against a prompt; an empty prompt is never scored).
``hard_negative_rate`` fills that share of each batch with counterfactual partners of the batch's other
examples (:func:`training.data.shapes.counterfactual_scene`: one named attribute changed, image redrawn,
caption rewritten), so the loss rewards telling apart images that differ in a single attribute — exactly what
ranking one prompt's candidates asks of CLIP; random batches rarely contain such pairs.
Images go through ``engine.models.clip.preprocess`` inside the step, exactly as at inference.

``vqgan_dir`` trains on what CLIP is shown at inference: every image (base and counterfactual) is encoded and
decoded by that VQGAN inside the step (no gradient through it), so CLIP learns the tokenizer's blur and artefacts
instead of the crisp renders it never ranks. ``init_from`` continues an exported CLIP (its config, tokenizer
and weights), e.g. to fine-tune a clean-trained one on the round-trips.

The result is a checkpoint directory: ``config.json`` (HF ``CLIPConfig`` layout), ``flax_model.msgpack`` and
the CLIP tokenizer files.
"""

from __future__ import annotations

import functools
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from engine.models.clip import CLIPModel, dummy_inputs, preprocess
from engine.text import CLIPTokenizer
from engine.weights import load_params
from training.checkpoint import export_trained
from training.data.shapes import ShapeExample, ShapesConfig, ShapesDataset, counterfactual_scene, render_scene
from training.loop import TrainResult, init_key, train
from training.optim import OptimConfig
from training.prefix_noise import PrefixNoise

CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json")


def small_clip_config(tokenizer: CLIPTokenizer, *, image_size: int = 64, patch_size: int = 8, width: int = 128,
                      layers: int = 2, heads: int = 4, projection_dim: int = 128,
                      max_text_length: int = 32) -> CLIPConfig:
    """A demo-sized CLIP (ViT + text transformer) for a trained CLIP BPE ``tokenizer``."""
    text = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_text_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def caption_key(caption: str) -> int:
    """A stable 31-bit id of a caption (equal captions ⇒ equal ids), for the same-caption positives."""
    return zlib.crc32(" ".join(caption.lower().split()).encode("utf-8")) & 0x7FFFFFFF


class CaptionedImageBatches:
    """Batch ``k``: ``batch_size`` non-blank examples of a shapes dataset, tokenised.

    Blank-caption examples are skipped; the example index where batch ``k`` starts is found by scanning the
    (cheap, image-free) scene specs, cached, so batch k is a pure function of (seed, k). With
    ``hard_negative_rate`` > 0, the last ``round(rate * batch_size)`` rows are counterfactual partners of the
    first ones (drawn with a generator seeded by (dataset seed, k)).
    """

    def __init__(self, dataset: ShapesDataset, tokenizer: CLIPTokenizer, batch_size: int,
                 hard_negative_rate: float = 0.0):
        if batch_size < 2:
            raise ValueError(f"contrastive training needs batch_size >= 2, got {batch_size}")
        if not 0.0 <= hard_negative_rate <= 0.5:
            raise ValueError(f"hard_negative_rate must be in [0, 0.5], got {hard_negative_rate}")
        self.dataset, self.tokenizer, self.batch_size = dataset, tokenizer, batch_size
        self.n_hard = int(round(hard_negative_rate * batch_size))
        self._kept: list[int] = []  # indices of non-blank examples found so far, in order
        self._next = 0

    def _index(self, j: int) -> int:
        while len(self._kept) <= j:
            _, caption = self.dataset.scene(self._next)
            if caption.strip():
                self._kept.append(self._next)
            self._next += 1
        return self._kept[j]

    def examples(self, k: int) -> list[Any]:
        n_base = self.batch_size - self.n_hard
        base = [self.dataset[self._index(j)] for j in range(k * n_base, (k + 1) * n_base)]
        rng = np.random.default_rng(np.random.SeedSequence([self.dataset.seed, int(k), 104729]))
        cfg = self.dataset.config
        partners = []
        for ex in base[: self.n_hard]:
            spec, caption = counterfactual_scene(ex.spec, rng)  # base captions are never blank
            partners.append(ShapeExample(image=render_scene(spec, cfg.image_size, cfg.supersample),
                                         caption=caption, spec=spec))
        return base + partners

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        exs = self.examples(int(k))
        tokens = self.tokenizer([e.caption for e in exs])
        return {
            "images": np.stack([e.image for e in exs]),
            "input_ids": tokens["input_ids"].astype(np.int32),
            "attention_mask": tokens["attention_mask"].astype(np.int32),
            "caption_key": np.asarray([caption_key(e.caption) for e in exs], np.int32),
        }


def vqgan_roundtrip(vqgan_dir: str | Path) -> Callable[[jax.Array], jax.Array]:
    """``images (B, R, R, 3) uint8 -> the VQGAN's reconstructions in [0, 1]``, jittable, without gradient."""
    from training.encode import load_vqgan

    vq_model, vq_config, vq_params = load_vqgan(vqgan_dir)

    def roundtrip(images: jax.Array) -> jax.Array:
        if images.shape[1:3] != (vq_config.resolution, vq_config.resolution):
            raise ValueError(f"VQGAN round-trip: images are {images.shape[1]}x{images.shape[2]}, the VQGAN at "
                             f"{vqgan_dir} takes {vq_config.resolution}x{vq_config.resolution}")
        x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
        recon, _ = vq_model.apply({"params": vq_params}, x)
        return jax.lax.stop_gradient(jnp.clip(recon, 0.0, 1.0))

    return roundtrip


def make_loss(model: CLIPModel, config: CLIPConfig,
              image_transform: Callable[[jax.Array], jax.Array] | None = None):
    size = config.vision_config.image_size

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
        images = batch["images"] if image_transform is None else image_transform(batch["images"])
        pixels = preprocess(images, size)
        logits_per_image, logits_per_text, _, _ = model.apply(
            {"params": params}, batch["input_ids"], pixels, batch["attention_mask"]
        )
        same = (batch["caption_key"][:, None] == batch["caption_key"][None, :]).astype(jnp.float32)
        targets = same / jnp.sum(same, axis=1, keepdims=True)  # symmetric: same.T == same
        loss_i = optax.softmax_cross_entropy(logits_per_image, targets)
        loss_t = optax.softmax_cross_entropy(logits_per_text, targets)
        loss = 0.5 * (jnp.mean(loss_i) + jnp.mean(loss_t))
        # retrieval accuracy: the top text of each image has the image's caption
        top = jnp.argmax(logits_per_image, axis=1)
        acc = jnp.mean(same[jnp.arange(same.shape[0]), top])
        return loss, {"i2t_accuracy": acc, "logit_scale": params["logit_scale"]}

    return loss_fn


def clamp_logit_scale(params: Any, extra: Any, aux: dict[str, jax.Array], step: jax.Array, rng: jax.Array):
    """CLIP clips the learned temperature so exp(logit_scale) <= 100."""
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, jnp.log(100.0))}, extra


@functools.lru_cache(maxsize=8)
def _step_fns(config: CLIPConfig):
    """One (loss, init) pair per config, so repeated runs reuse compiled programs."""
    model = CLIPModel(config)
    init = jax.jit(lambda rng: model.init(rng, *dummy_inputs(config))["params"])
    return make_loss(model, config), init


@dataclass
class CLIPTrainOutput:
    out_dir: Path
    config: CLIPConfig
    params: Any
    result: TrainResult
    eval_metrics: dict[str, float] = field(default_factory=dict)


def evaluate(model: CLIPModel, config: CLIPConfig, params: Any, batches: CaptionedImageBatches,
             n_batches: int = 2, image_transform: Callable[[jax.Array], jax.Array] | None = None
             ) -> dict[str, float]:
    """Image→text retrieval accuracy (same-caption counts as correct) on held-out batches."""
    fn = jax.jit(make_loss(model, config, image_transform))
    losses, accs = [], []
    for k in range(n_batches):
        loss, aux = fn(params, {n: jnp.asarray(v) for n, v in batches[k].items()}, jax.random.PRNGKey(0))
        losses.append(float(loss))
        accs.append(float(aux["i2t_accuracy"]))
    return {"loss": float(np.mean(losses)), "i2t_accuracy": float(np.mean(accs))}


def train_clip(
    out_dir: str | Path,
    config: CLIPConfig,
    tokenizer_dir: str | Path,
    *,
    steps: int,
    batch_size: int = 64,
    optim: OptimConfig | None = None,
    seed: int = 0,
    data_seed: int = 0,
    shapes: ShapesConfig | None = None,
    work_dir: str | Path | None = None,
    save_every: int = 200,
    log_every: int = 10,
    eval_batches: int = 2,
    mesh: Any = None,
    progress: bool | None = None,
    stop_after: int | None = None,
    hard_negative_rate: float = 0.0,
    init_from: str | Path | None = None,
    vqgan_dir: str | Path | None = None,
    prefix_noise: float = 0.0,
) -> CLIPTrainOutput:
    """Train (or resume) CLIP on shapes image–caption pairs and write the checkpoint directory ``out_dir``.

    ``init_from``: start from the weights of this exported CLIP (of ``config``'s shapes) instead of a random
    init. ``vqgan_dir``:
    train and evaluate on that VQGAN's round-trips of the images (module docstring). ``prefix_noise``: the share
    of training captions that get 1-3 made-up words in front (:class:`training.prefix_noise.PrefixNoise`), so
    the ranker scores "an illustration of a red circle" as it scores "a red circle"; evaluation is unchanged.
    Evaluation uses ``eval_batches`` batches of a dataset with seed ``data_seed + 1``.
    """
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + "-train")
    tokenizer = CLIPTokenizer.from_dir(tokenizer_dir, max_length=config.text_config.max_position_embeddings)
    if tokenizer.vocab_size > config.text_config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the text vocab_size is "
                         f"{config.text_config.vocab_size}")
    shapes = shapes or ShapesConfig()
    batches: Any = CaptionedImageBatches(ShapesDataset(data_seed, shapes), tokenizer, batch_size, hard_negative_rate)
    if prefix_noise > 0:
        batches = PrefixNoise(batches, prefix_noise, tokenizer, seed=seed)
    optim = optim or OptimConfig(name="adamw", learning_rate=5e-4, warmup_steps=min(100, max(steps // 10, 1)),
                                 decay="cosine", decay_steps=max(steps, 1), end_lr_ratio=0.1, b2=0.98,
                                 weight_decay=0.1, max_grad_norm=1.0)
    model = CLIPModel(config)
    loss_fn, init = _step_fns(config)
    transform = None
    if vqgan_dir is not None:
        from engine.config import VQGANConfig

        resolution = VQGANConfig.from_json(vqgan_dir).resolution
        if resolution != shapes.image_size:
            raise ValueError(f"--vqgan-roundtrip {vqgan_dir}: that VQGAN takes {resolution}x{resolution} images, "
                             f"the training images are {shapes.image_size}x{shapes.image_size}")
        transform = vqgan_roundtrip(vqgan_dir)
    if transform is not None:
        loss_fn = make_loss(model, config, transform)
    if init_from is None:
        params = init(init_key(seed))
    else:  # the engine's loader: the same layout and shape checks as at inference
        params = load_params(init_from, jax.eval_shape(init, init_key(seed)), dtype="float32")
    result = train(
        params,
        loss_fn,
        batches,
        steps=steps,
        optim=optim,
        seed=seed,
        ckpt_dir=work / "checkpoints",
        save_every=save_every,
        log_path=work / "metrics.jsonl",
        log_every=log_every,
        mesh=mesh,
        progress=progress,
        extra_update=clamp_logit_scale,
        stop_after=stop_after,
        meta={"model": "clip", "batch_size": batch_size, "data_seed": data_seed,
              "hard_negative_rate": hard_negative_rate, "prefix_noise": prefix_noise,
              "vqgan_roundtrip": str(vqgan_dir) if vqgan_dir is not None else None,
              "init_from": str(init_from) if init_from is not None else None},
    )
    final = jax.device_get(result.params)
    metrics: dict[str, float] = {}
    if eval_batches:
        held_out = CaptionedImageBatches(ShapesDataset(data_seed + 1, shapes), tokenizer, batch_size)
        metrics = evaluate(model, config, final, held_out, eval_batches, transform)
        # the same with half of each batch one-attribute counterfactuals: the fine-grained part of ranking
        hard = CaptionedImageBatches(ShapesDataset(data_seed + 1, shapes), tokenizer, batch_size, 0.5)
        metrics.update({f"{k}_hard": v
                        for k, v in evaluate(model, config, final, hard, eval_batches, transform).items()})
    if not result.interrupted:
        export_trained(out_dir, final, config.to_dict(), result, metrics)
        src = Path(tokenizer_dir)
        for name in CLIP_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / name)
    return CLIPTrainOutput(out_dir=out_dir, config=config, params=final, result=result, eval_metrics=metrics)
