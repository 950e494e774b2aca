"""Train DalleBart on VQGAN token shards: text tokens in, image tokens out.

As the reference trainer: captions go through the checkpoint's text normaliser and tokenizer (padded to
``max_text_length``); ``labels`` are the image codes, ``decoder_input_ids = [start] + labels[:-1]``; the loss
is softmax cross-entropy over every image position (no mask, no label smoothing). Blank captions teach the
unconditional branch used by super-conditioning: the shapes dataset already blanks a share of captions, and
``blank_caption_prob`` can blank more, deterministically per (seed, batch).

The result is a checkpoint directory in the published layout: ``config.json``, ``flax_model.msgpack`` and the
tokenizer files.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine.config import DalleBartConfig
from engine.models.dallebart import DalleBart, init_params
from engine.models.layout import load_dallebart_params
from engine.text import DalleBartTokenizer
from training.checkpoint import export_trained
from training.data.parquet import iter_token_shards
from training.loop import ArrayBatches, TrainResult, init_key, train
from training.optim import OptimConfig
from training.prefix_noise import PrefixNoise

TOKENIZER_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "enwiki-words-frequency.txt",
)


def small_dallebart_config(text_vocab_size: int, image_codes: int, image_length: int, *, d_model: int = 128,
                           layers: int = 2, heads: int = 4, ffn_dim: int = 256, max_text_length: int = 32,
                           normalize_text: bool = True, decoder_layers: int | None = None) -> DalleBartConfig:
    """A demo-sized DalleBart for a tokenizer of ``text_vocab_size`` ids and a VQGAN of ``image_codes`` codes.

    ``layers`` encoder layers and as many decoder layers unless ``decoder_layers`` says otherwise.

    The decoder start token is row ``image_codes`` of the decoder embedding (as in the published models).
    """
    return DalleBartConfig(
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers if decoder_layers is None else decoder_layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        encoder_vocab_size=text_vocab_size,
        image_vocab_size=image_codes,
        max_text_length=max_text_length,
        image_length=image_length,
        decoder_start_token_id=image_codes,
        bos_token_id=image_codes + 1,
        eos_token_id=image_codes + 1,
        pad_token_id=image_codes + 1,
        normalize_text=normalize_text,
    )


def load_token_data(shards: Any, tokenizer: DalleBartTokenizer, image_length: int) -> dict[str, np.ndarray]:
    """All rows of the shards, captions tokenised once: ``input_ids``, ``attention_mask`` (N, T), ``labels``."""
    captions, codes = [], []
    for row in iter_token_shards(shards, encoding_length=image_length):
        captions.append(row["caption"])
        codes.append(row["encoding"])
    if not captions:
        raise ValueError(f"{shards}: no rows in the token shards")
    tokens = tokenizer(captions)
    return {
        "input_ids": tokens["input_ids"].astype(np.int32),
        "attention_mask": tokens["attention_mask"].astype(np.int32),
        "labels": np.stack(codes).astype(np.int32),
    }


class BlankCaptions:
    """Wrap a batch source: each row's caption becomes the empty prompt with probability ``prob``.

    The choice for batch ``k`` is drawn from ``(seed, k)``, so it is the same in a resumed run.
    """

    def __init__(self, source: Any, prob: float, blank: dict[str, np.ndarray], *, seed: int = 0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"blank_caption_prob must be in [0, 1], got {prob}")
        self.source, self.prob, self.seed = source, prob, seed
        self.blank = {k: np.asarray(v)[0] for k, v in blank.items()}

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        batch = dict(self.source[k])
        if self.prob <= 0:
            return batch
        rows = np.random.default_rng([self.seed, int(k), 0xB1A4]).random(len(batch["labels"])) < self.prob
        for name in ("input_ids", "attention_mask"):
            arr = batch[name].copy()
            arr[rows] = self.blank[name]
            batch[name] = arr
        return batch


def make_loss(model: DalleBart, config: DalleBartConfig):
    """Cross-entropy over all image positions, plus token accuracy."""
    start = config.decoder_start_token_id

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
        labels = batch["labels"]
        dec_in = jnp.concatenate([jnp.full((labels.shape[0], 1), start, labels.dtype), labels[:, :-1]], axis=1)
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], dec_in)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        return jnp.mean(ce), {"accuracy": acc}

    return loss_fn


@functools.lru_cache(maxsize=8)
def _loss_for(config: DalleBartConfig):
    """One loss function object per config, so repeated runs reuse the compiled train step."""
    return make_loss(DalleBart(config), config)


# config fields that follow from the image vocabulary (the VQGAN's codebook size)
IMAGE_VOCAB_FIELDS = frozenset({"image_vocab_size", "decoder_start_token_id", "bos_token_id", "eos_token_id",
                                "pad_token_id"})
# the params whose shape follows from it: image-token embedding (codes + start token) and the output head
IMAGE_VOCAB_PARAMS = (("lm_head",), ("model", "decoder", "embed_tokens"))


def _differing_fields(saved: DalleBartConfig, config: DalleBartConfig) -> list[str]:
    """The config fields (sorted) in which ``config`` differs from ``saved``, the parameter layout aside."""
    old = saved.to_dict()
    return sorted(k for k, v in config.to_dict().items() if old.get(k) != v and k != "use_scan")


def transfer_params(saved_dir: Path, config: DalleBartConfig, seed: int = 0) -> Any:
    """Params for ``config`` from a DalleBart trained on another VQGAN's tokens: the text encoder and every
    transformer layer are copied (what the model learned about captions and layouts carries over); only the
    image-token embedding and the output head, whose rows are the old codes, start from a fresh init.

    The two configs may differ only in :data:`IMAGE_VOCAB_FIELDS`.
    """
    saved = DalleBartConfig.from_json(saved_dir)
    diff = _differing_fields(saved, config)
    if set(diff) - IMAGE_VOCAB_FIELDS:
        raise ValueError(f"{saved_dir}: only the image vocabulary may differ for a transfer; also differs: "
                         f"{', '.join(sorted(set(diff) - IMAGE_VOCAB_FIELDS))}")
    old = load_dallebart_params(saved_dir, dataclasses.replace(saved, use_scan=config.use_scan), dtype="float32")
    fresh = _jit_init(config)(init_key(seed))

    def merge(new: Any, prev: Any, path: tuple[str, ...]) -> Any:
        if any(path[: len(p)] == p for p in IMAGE_VOCAB_PARAMS):
            return new
        if isinstance(new, dict):
            return {k: merge(v, prev[k], (*path, k)) for k, v in new.items()}
        if prev.shape != new.shape:  # cannot happen when only the image vocabulary differs
            raise ValueError(f"{'/'.join(path)}: shape {prev.shape} in {saved_dir}, {new.shape} in the new config")
        return jnp.asarray(prev, new.dtype)

    return merge(fresh, old, ())


# config fields a grown model may change (each to at least the saved value)
LAYER_COUNT_FIELDS = ("encoder_layers", "decoder_layers")
# per layer, the parameters that scale its residual branches: zeroed in an inserted layer, it adds nothing
_RESIDUAL_GATES = {
    "encoder": (("LayerNorm_1", "scale"), ("LayerNorm_1", "bias"), ("GLU_0", "Dense_2", "kernel")),
    "decoder": (("LayerNorm_1", "scale"), ("LayerNorm_1", "bias"), ("LayerNorm_3", "scale"), ("LayerNorm_3", "bias"),
                ("GLU_0", "Dense_2", "kernel")),
}


def grow_params(saved_dir: Path, config: DalleBartConfig) -> Any:
    """Params for a deeper ``config`` that compute exactly what the saved DalleBart computes.

    Capacity can then be added to a trained model instead of training a larger one from scratch. The M saved
    layers of a stack keep their order, spread over the N new slots (old layer i goes to slot ``i*N//M``). Each
    other slot gets a copy of the old layer below it with the residual gates zeroed: the NormFormer
    post-attention LNs (scale and bias) and the GLU's output projection. ``y + 0`` makes the inserted layer
    the identity at first. The gates still get gradients, so training opens them.

    The configs may differ only in :data:`LAYER_COUNT_FIELDS`, each new count ≥ the saved one.
    """
    saved = DalleBartConfig.from_json(saved_dir)
    new_d, old_d = config.to_dict(), saved.to_dict()
    diff = _differing_fields(saved, config)
    if set(diff) - set(LAYER_COUNT_FIELDS):
        raise ValueError(f"{saved_dir}: only the layer counts may differ when growing; also differs: "
                         f"{', '.join(sorted(set(diff) - set(LAYER_COUNT_FIELDS)))}")
    shrunk = [k for k in LAYER_COUNT_FIELDS if new_d[k] < old_d[k]]
    if shrunk:
        raise ValueError(f"{saved_dir}: growing cannot remove layers ({', '.join(shrunk)}: "
                         f"{', '.join(f'{old_d[k]} -> {new_d[k]}' for k in shrunk)})")
    old = load_dallebart_params(saved_dir, dataclasses.replace(saved, use_scan=True), dtype="float32")
    old = jax.tree.map(np.asarray, old)
    grown = {**old, "model": dict(old["model"])}
    for side in ("encoder", "decoder"):
        m, n = getattr(saved, f"{side}_layers"), getattr(config, f"{side}_layers")
        stack_name = "FlaxBartEncoderLayers" if side == "encoder" else "FlaxBartDecoderLayers"
        kept = np.zeros(n, dtype=bool)  # the slots the old layers move to
        kept[np.arange(m) * n // m] = True
        source = np.cumsum(kept) - 1  # the old layer each slot holds or copies (slot 0 is always kept)
        new_stack = jax.tree.map(lambda x, s=source: x[s], old["model"][side]["layers"][stack_name])
        for *path, leaf in _RESIDUAL_GATES[side]:
            node = new_stack
            for key in path:
                node = node[key]
            node[leaf] = np.where(kept.reshape((n,) + (1,) * (node[leaf].ndim - 1)), node[leaf], 0.0)
        grown["model"][side] = {**old["model"][side], "layers": {stack_name: new_stack}}
    return load_dallebart_params(grown, config, dtype="float32")


@functools.lru_cache(maxsize=8)
def _jit_init(config: DalleBartConfig):
    return jax.jit(lambda rng: init_params(config, rng))


@dataclass
class DalleBartTrainOutput:
    out_dir: Path
    config: DalleBartConfig
    params: Any
    result: TrainResult
    eval_metrics: dict[str, float] = field(default_factory=dict)


def copy_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files a checkpoint ships with; returns the names copied."""
    src, dst = Path(tokenizer_dir), Path(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and not {"vocab.json", "merges.txt"} <= set(copied):
        raise FileNotFoundError(f"{src}: no tokenizer.json and no vocab.json + merges.txt to ship")
    return copied


def evaluate_loss(model: DalleBart, config: DalleBartConfig, params: Any, data: dict[str, np.ndarray],
                  batch_size: int = 32) -> dict[str, float]:
    """Mean cross-entropy and token accuracy over ``data`` (e.g. a held-out shard)."""
    fn = jax.jit(make_loss(model, config))
    n = len(data["labels"])
    total_ce = total_acc = 0.0
    for i in range(0, n, batch_size):
        batch = {k: jnp.asarray(v[i : i + batch_size]) for k, v in data.items()}
        ce, aux = fn(params, batch, jax.random.PRNGKey(0))
        m = len(batch["labels"])
        total_ce += float(ce) * m
        total_acc += float(aux["accuracy"]) * m
    return {"loss": total_ce / n, "accuracy": total_acc / n}


def train_dallebart(
    out_dir: str | Path,
    config: DalleBartConfig,
    shards: Any,
    tokenizer_dir: str | Path,
    *,
    steps: int,
    batch_size: int = 32,
    optim: OptimConfig | None = None,
    seed: int = 0,
    blank_caption_prob: float = 0.0,
    prefix_noise: float = 0.0,
    eval_shards: Any = None,
    work_dir: str | Path | None = None,
    save_every: int = 200,
    log_every: int = 10,
    mesh: Any = None,
    progress: bool | None = None,
    stop_after: int | None = None,
    init_from: str | Path | None = None,
    new_image_vocab: bool = False,
    grow: bool = False,
) -> DalleBartTrainOutput:
    """Train (or resume) DalleBart on token shards and write the checkpoint directory ``out_dir``.

    ``tokenizer_dir`` holds the trained tokenizer (``training.tokenizer.train_bpe``); its vocabulary must fit
    ``config.encoder_vocab_size``. With a mesh whose ``"model"`` axis is larger than 1, params are split by
    ``engine.sharding``'s partition rules; the batch always splits over ``"data"``. ``init_from``: start from
    an exported DalleBart checkpoint directory with the same config (continue a run on a fresh machine, where
    the orbax training state is gone; the optimiser state starts afresh). With ``new_image_vocab`` the saved
    model may have another image vocabulary (it was trained on another VQGAN's tokens): see
    :func:`transfer_params`. With ``grow`` it may have fewer layers: see :func:`grow_params`.
    ``prefix_noise``: the share of captioned rows that get random tokens in front (:class:`PrefixNoise`).
    """
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + "-train")
    tokenizer = DalleBartTokenizer.from_dir(tokenizer_dir, max_length=config.max_text_length,
                                            normalize=config.normalize_text)
    if tokenizer.vocab_size > config.encoder_vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but encoder_vocab_size is "
                         f"{config.encoder_vocab_size}")
    data = load_token_data(shards, tokenizer, config.image_length)
    if int(data["labels"].max()) >= config.num_image_codes:
        raise ValueError(f"token shards hold code {int(data['labels'].max())} >= the config's "
                         f"{config.num_image_codes} image codes")
    optim = optim or OptimConfig(name="adamw", learning_rate=1e-3, warmup_steps=min(100, max(steps // 10, 1)),
                                 decay="cosine", decay_steps=max(steps, 1), end_lr_ratio=0.1, b2=0.98,
                                 max_grad_norm=1.0)
    model = DalleBart(config)
    if init_from is not None and new_image_vocab and grow:
        raise ValueError("grow one thing at a time: new_image_vocab or grow, not both")
    if init_from is not None and new_image_vocab:
        params = transfer_params(Path(init_from), config, seed)
    elif init_from is not None and grow:
        params = grow_params(Path(init_from), config)
    elif init_from is not None:
        saved = DalleBartConfig.from_json(Path(init_from))
        if saved.to_dict() != config.to_dict():
            diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
            hint = " (a DalleBart for another VQGAN: new_image_vocab)" if set(diff) & IMAGE_VOCAB_FIELDS else ""
            hint = hint or (" (more layers: grow)" if set(diff) <= set(LAYER_COUNT_FIELDS) else "")
            raise ValueError(f"{init_from}: its config differs from the one being trained ({', '.join(diff)})"
                             + hint)
        params = load_dallebart_params(Path(init_from), config, dtype="float32")
    else:
        params = _jit_init(config)(init_key(seed))
    batches: Any = ArrayBatches(data, batch_size, seed=seed)
    if blank_caption_prob > 0:
        batches = BlankCaptions(batches, blank_caption_prob, tokenizer.unconditional(1), seed=seed)
    if prefix_noise > 0:
        batches = PrefixNoise(batches, prefix_noise, tokenizer, seed=seed)
    param_specs = None
    if mesh is not None and mesh.shape.get("model", 1) > 1:
        from engine.sharding import param_specs as dallebart_specs

        param_specs = dallebart_specs(params, mesh)

    result = train(
        params,
        _loss_for(config),
        batches,
        steps=steps,
        optim=optim,
        seed=seed,
        ckpt_dir=work / "checkpoints",
        save_every=save_every,
        log_path=work / "metrics.jsonl",
        log_every=log_every,
        mesh=mesh,
        param_specs=param_specs,
        progress=progress,
        stop_after=stop_after,
        meta={"model": "dallebart", "batch_size": batch_size, "rows": int(len(data["labels"])),
              "prefix_noise": prefix_noise},
    )
    final = jax.device_get(result.params)
    metrics: dict[str, float] = {}
    if eval_shards is not None:
        metrics = evaluate_loss(model, config, final, load_token_data(eval_shards, tokenizer, config.image_length))
    if not result.interrupted:
        export_trained(out_dir, final, config.to_dict(), result, metrics)
        copy_tokenizer(tokenizer_dir, out_dir)
    return DalleBartTrainOutput(out_dir=out_dir, config=config, params=final, result=result, eval_metrics=metrics)
