"""Preference fine-tuning of a DalleBart on the feedback dataset (:mod:`training.feedback`): KTO on the unpaired
👍/👎 examples, DPO on the pairs where one prompt has both, optionally mixed with supervised tokens of liked images.

Every objective works on the **summed log-probability** of a stored image-token sequence given its prompt,
``log π(y|x) = Σ_t log π(y_t | x, y_<t)``, against the frozen parent model (the reference, whose log-probs are
computed once, before the first step, and kept with the run's state so a resumed run never recomputes them).
With the implicit reward ``r = log π(y|x) − log π_ref(y|x)``:

- **KTO** (Ethayarajh et al., 2024): a desirable example costs ``λ_D·(1 − σ(β(r − z)))``, an undesirable one
  ``λ_U·(1 − σ(β(z − r)))``, each times its weight. ``z`` (the reference point) is the batch's mean reward,
  clipped at 0 and held fixed (no gradient) — the paper's batch estimate of KL(π‖π_ref), taken over the batch's
  own examples rather than mismatched prompt/image pairs, which would need a second forward pass per step;
- **DPO** (Rafailov et al., 2023): ``−log σ(β(r_chosen − r_rejected))`` per pair, times its weight;
- **SFT**: token cross-entropy of the desirable sequences (keeps what people liked likely in absolute terms).
- **token KL** (optional, ``token_kl_weight``): KL(π_ref ‖ π) between the two whole next-token distributions at
  every position of the batch's sequences (the parent's forward pass runs in the step), so a change the sequence
  rewards ask for lands where the parent was undecided rather than on every token of a disliked image.

``finetune(trainable=...)`` trains only a subset (:data:`TRAINABLE`, e.g. the text encoder); the rest stays the
parent's bit for bit.

Logged every step: the losses, the implicit reward margin (mean ``r`` of desirable − of undesirable), and
``kl_ref``, the mean of ``log π_ref − log π`` over the batch's sequences: the stored tokens were sampled from the
parent, so this is a Monte-Carlo estimate of KL(π_ref ‖ π) in nats per image.

The result is a complete checkpoint directory (the parent's VQGAN, CLIP and safety files copied, the new
DalleBart exported) that the engine loads like any other; an interrupted run (Ctrl-C, SIGTERM from a cancel)
writes no checkpoint, and the same command resumes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine.config import DalleBartConfig
from engine.models.dallebart import DalleBart
from engine.models.layout import load_dallebart_params
from engine.text import DalleBartTokenizer
from training.checkpoint import export_trained
from training.code_colours import class_matrix, code_colour_classes, colour_spared_kl, deciding_positions, describe
from training.data import COLOURS
from training.loop import ArrayBatches, train
from training.optim import OptimConfig, trainable_mask

#: which parameters a fine-tune may change (regular expressions over ``model/encoder/...`` paths, see
#: :attr:`training.optim.OptimConfig.trainable`); the rest keep the parent's values exactly. The decoder knows how
#: to draw every colour, shape and position; "encoder" moves only what a caption means to it.
TRAINABLE = {
    "all": (),
    "encoder": (r"^model/encoder/",),
    "encoder+cross": (r"^model/encoder/", r"^model/decoder/layers/[^/]+/FlaxBartAttention_1/"),
    "cross": (r"^model/decoder/layers/[^/]+/FlaxBartAttention_1/",),
    "encoder-embed": (r"^model/encoder/embed_tokens/",),
}

#: the sequences a token-level KL may cover (see :attr:`PreferenceConfig.token_kl_scope`)
TOKEN_KL_SCOPES = ("all", "uncontested", "colour-spared")
#: the positions whose log-probabilities the preference terms (KTO, DPO) score (see
#: :attr:`PreferenceConfig.reward_scope`)
REWARD_SCOPES = ("all", "colour-deciding")
#: KTO's reference points (see :attr:`PreferenceConfig.kto_reference`)
KTO_REFERENCES = ("batch", "zero")
#: positions after an object's first code that still count as deciding its colour
DECIDING_WINDOW = 0

#: files of a checkpoint directory the fine-tune takes over from its parent unchanged
PARENT_PARTS = ("vqgan", "clip")
PARENT_FILES = ("safety.json",)


@dataclass(frozen=True)
class PreferenceConfig:
    """The objective's settings (recorded with the run and the checkpoint)."""

    beta: float = 0.1
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 1.0  # λ_U
    dpo_weight: float = 1.0  # the DPO term's share of the loss when pairs exist
    sft_weight: float = 0.0  # the supervised term's share (0: off)
    #: weight of the token-level KL(parent ‖ model) over every position of the batch's sequences, with the
    #: parent's whole next-token distribution (0: off). The sequence rewards say only "this image, not that one";
    #: this makes the cheap way to follow them changing the few positions where the parent was undecided (which
    #: colour) rather than every token of a disliked image (its shape and position too)
    token_kl_weight: float = 0.0
    #: which sequences the token KL anchors: "all", or "uncontested", only those of prompts nobody 👎'd (every
    #: image of the prompt liked). The users' complaint is then free to move what the parent is sure of on the
    #: prompts they complained about, while everything they were happy with stays the parent's; or
    #: "colour-spared", every sequence, but on prompts someone 👎'd the KL leaves the object's colour free
    #: (:mod:`training.code_colours`): shapes, positions and "draw an object here" stay the parent's
    token_kl_scope: str = "all"
    #: the positions the preference terms score: "all" (the summed log-probability of the whole image) or
    #: "colour-deciding", only the object's first code (:func:`training.code_colours.deciding_positions`),
    #: where a colour complaint's credit belongs; a summed reward otherwise spreads each 👎 over every token
    reward_scope: str = "all"
    #: the temperature KTO, DPO and the supervised term read the model at: the checkpoint's sampling temperature
    #: scores the distribution users are shown (a temperature below 1 sharpens whichever colour leads), 1.0 the
    #: model's own
    temperature: float = 1.0
    #: the super-conditioning scale they read it at: ``uncond + scale·(cond − uncond)``, the unconditional branch
    #: being the model on the empty prompt, as the sampler guides (1.0: the conditional model alone). At the
    #: checkpoint's scale a vote scores the distribution the image was drawn from, and the unconditional branch
    #: takes its share of the credit
    guidance: float = 1.0
    #: KTO's reference point z: "batch", the batch's mean reward (clipped at 0; the KL estimate of the KTO paper's
    #: implementations), or "zero". With liked images rising fast (λ_D > 1, SFT) the batch mean climbs with them
    #: and every disliked image's term saturates (its sigmoid at β·(z − r) ≫ 1), so the complaint stops pushing;
    #: at zero a disliked image is pushed until its own reward is well below the parent's
    kto_reference: str = "batch"

    @property
    def needs_code_colours(self) -> bool:
        return (self.token_kl_weight > 0 and self.token_kl_scope == "colour-spared") \
            or self.reward_scope == "colour-deciding"

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0; got {self.beta}")
        if not 0.05 <= self.temperature <= 10:
            raise ValueError(f"temperature must be between 0.05 and 10; got {self.temperature}")
        if self.kto_reference not in KTO_REFERENCES:
            raise ValueError(f"kto_reference must be one of {', '.join(KTO_REFERENCES)}; got {self.kto_reference!r}")
        if not 0 < self.guidance <= 20:
            raise ValueError(f"guidance must be in (0, 20]; got {self.guidance}")
        if self.token_kl_scope not in TOKEN_KL_SCOPES:
            raise ValueError(f"token_kl_scope must be one of {', '.join(TOKEN_KL_SCOPES)}; got {self.token_kl_scope!r}")
        if self.reward_scope not in REWARD_SCOPES:
            raise ValueError(f"reward_scope must be one of {', '.join(REWARD_SCOPES)}; got {self.reward_scope!r}")
        for name in ("desirable_weight", "undesirable_weight", "dpo_weight", "sft_weight", "token_kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")


def _logits(model: DalleBart, params: Any, input_ids: jax.Array, attention_mask: jax.Array, labels: jax.Array,
            start: int) -> jax.Array:
    """Teacher-forced logits (B, S, V+1) of image tokens ``labels`` (B, S) given the prompts."""
    dec_in = jnp.concatenate([jnp.full((labels.shape[0], 1), start, labels.dtype), labels[:, :-1]], axis=1)
    return model.apply({"params": params}, input_ids, attention_mask, dec_in).astype(jnp.float32)


def sequence_logprobs(model: DalleBart, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                      labels: jax.Array, start: int, ref_params: Any = None, classes: jax.Array | None = None,
                      reward_mask: jax.Array | None = None, temperature: float = 1.0, guidance: float = 1.0,
                      uncond: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, ...]:
    """(summed log-prob per row (B,), mean token cross-entropy) of image tokens ``labels`` given the prompts; with
    ``ref_params`` also the token-level KL(ref ‖ model) per row (B,), summed over positions, from the two whole
    next-token distributions (no gradient into the reference); with ``classes`` (the (V, C) one-hot of
    :func:`training.code_colours.class_matrix`) also the colour-spared KL per row. ``reward_mask`` (B, S) limits
    the summed log-prob to some positions (the cross-entropy stays the whole image's). Both read the model at
    ``temperature`` and super-conditioning scale ``guidance``, whose unconditional branch is the model on
    ``uncond`` (the empty prompt's ids and mask, (1, T)); the KL stays at the model's own conditional."""
    logits = _logits(model, params, input_ids, attention_mask, labels, start)
    scored = logits
    if guidance != 1.0:
        if uncond is None:
            raise ValueError("guidance != 1 needs the empty prompt (uncond)")
        b = input_ids.shape[0]
        u_ids, u_mask = (jnp.broadcast_to(x, (b, x.shape[-1])) for x in uncond)
        u_logits = _logits(model, params, u_ids, u_mask, labels, start)
        scored = u_logits + guidance * (logits - u_logits)
    token_lp = -optax.softmax_cross_entropy_with_integer_labels(scored / temperature, labels)
    summed = jnp.sum(token_lp if reward_mask is None else token_lp * reward_mask, axis=-1)
    if ref_params is None:
        return summed, -jnp.mean(token_lp, axis=-1)
    ref_lp = jax.nn.log_softmax(jax.lax.stop_gradient(_logits(model, ref_params, input_ids, attention_mask, labels,
                                                              start)), axis=-1)
    lp = jax.nn.log_softmax(logits, axis=-1)
    if classes is not None:
        free, background = deciding_positions(labels, classes, window=DECIDING_WINDOW)
        return summed, -jnp.mean(token_lp, axis=-1), *colour_spared_kl(ref_lp, lp, classes, background, free)
    kl = jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), axis=(-2, -1))
    return summed, -jnp.mean(token_lp, axis=-1), kl


def kto_terms(logp: jax.Array, ref_logp: jax.Array, desirable: jax.Array, weight: jax.Array,
              cfg: PreferenceConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO loss (weighted mean) and its diagnostics; ``desirable`` is 1.0/0.0 per row."""
    r = logp - ref_logp
    z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(r), 0.0)) if cfg.kto_reference == "batch" else jnp.zeros(())
    des = desirable.astype(jnp.float32)
    value = des * cfg.desirable_weight * (1 - jax.nn.sigmoid(cfg.beta * (r - z))) \
        + (1 - des) * cfg.undesirable_weight * (1 - jax.nn.sigmoid(cfg.beta * (z - r)))
    loss = jnp.sum(weight * value) / jnp.maximum(jnp.sum(weight), 1e-6)
    n_des, n_und = jnp.sum(des), jnp.sum(1 - des)
    r_des = jnp.sum(des * r) / jnp.maximum(n_des, 1.0)
    r_und = jnp.sum((1 - des) * r) / jnp.maximum(n_und, 1.0)
    both = (n_des > 0) & (n_und > 0)
    return loss, {"kto_loss": loss, "reward_desirable": r_des, "reward_undesirable": r_und,
                  "reward_margin": jnp.where(both, r_des - r_und, 0.0), "kto_z": z}


def dpo_terms(chosen: jax.Array, ref_chosen: jax.Array, rejected: jax.Array, ref_rejected: jax.Array,
              weight: jax.Array, cfg: PreferenceConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    value = -jax.nn.log_sigmoid(cfg.beta * margin)
    loss = jnp.sum(weight * value) / jnp.maximum(jnp.sum(weight), 1e-6)
    return loss, {"dpo_loss": loss, "dpo_margin": jnp.mean(margin),
                  "dpo_accuracy": jnp.mean((margin > 0).astype(jnp.float32))}


def make_preference_loss(model: DalleBart, config: DalleBartConfig, cfg: PreferenceConfig, *, with_pairs: bool,
                         ref_params: Any = None, code_classes: np.ndarray | None = None,
                         uncond: tuple[np.ndarray, np.ndarray] | None = None):
    """``loss_fn(params, batch, rng)`` for :func:`training.loop.train` (KTO + optional DPO + optional SFT +
    optional token-level KL to ``ref_params``, which ``cfg.token_kl_weight`` > 0 needs; the "colour-spared" scope
    and the "colour-deciding" reward scope also need ``code_classes``, the (V, C) one-hot of
    :func:`training.code_colours.class_matrix`); ``cfg.guidance`` != 1 needs ``uncond``, the empty prompt's
    (1, T) ids and mask)."""
    start = config.decoder_start_token_id
    if cfg.guidance != 1.0 and uncond is None:
        raise ValueError("guidance != 1 needs the empty prompt's ids and mask (uncond)")
    empty = None if cfg.guidance == 1.0 else tuple(jnp.asarray(x) for x in uncond)
    read = {"temperature": cfg.temperature, "guidance": cfg.guidance, "uncond": empty}
    use_kl = cfg.token_kl_weight > 0
    if use_kl and ref_params is None:
        raise ValueError("token_kl_weight > 0 needs the parent's parameters (ref_params)")
    ref = ref_params if use_kl else None
    spare = use_kl and cfg.token_kl_scope == "colour-spared"
    if cfg.needs_code_colours and code_classes is None:
        raise ValueError(f"token_kl_scope={cfg.token_kl_scope!r} / reward_scope={cfg.reward_scope!r} need the codes' "
                         "colour classes (code_classes)")
    all_classes = jnp.asarray(code_classes) if cfg.needs_code_colours else None
    classes = all_classes if spare else None

    def mask_of(labels: jax.Array) -> jax.Array | None:
        return reward_mask(labels, all_classes, cfg.reward_scope)

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
        out = sequence_logprobs(model, params, batch["input_ids"], batch["attention_mask"], batch["labels"], start,
                                ref, classes, mask_of(batch["labels"]), **read)
        logp, ce = out[0], out[1]
        loss, aux = kto_terms(logp, batch["ref_logp"], batch["desirable"], batch["weight"], cfg)
        everywhere = cfg.token_kl_scope != "uncontested"
        # the whole KL, or on the prompts someone disliked an image of the colour-spared one
        kls = [jnp.where(batch["uncontested"] > 0, out[2], out[3]) if spare else out[2]] if use_kl else []
        # per-row weight of the token KL: 1 everywhere, or 1 only on uncontested prompts (DPO pairs never are)
        anchors = [jnp.ones_like(out[0]) if everywhere else batch["uncontested"]] if use_kl else []
        aux["kl_ref"] = jnp.mean(batch["ref_logp"] - logp)
        if cfg.sft_weight > 0:
            des = batch["desirable"].astype(jnp.float32)
            sft = jnp.sum(des * ce) / jnp.maximum(jnp.sum(des), 1.0)
            loss = loss + cfg.sft_weight * sft
            aux["sft_loss"] = sft
        if with_pairs:
            both_ids = jnp.concatenate([batch["p_input_ids"], batch["p_input_ids"]])
            both_mask = jnp.concatenate([batch["p_attention_mask"], batch["p_attention_mask"]])
            both = jnp.concatenate([batch["p_chosen"], batch["p_rejected"]])
            pout = sequence_logprobs(model, params, both_ids, both_mask, both, start, ref, classes, mask_of(both),
                                     **read)
            lp = pout[0]
            if use_kl:
                kls.append(pout[3] if spare else pout[2])
                anchors.append(jnp.full_like(pout[2], 1.0 if everywhere else 0.0))
            n = batch["p_chosen"].shape[0]
            dpo, daux = dpo_terms(lp[:n], batch["p_ref_chosen"], lp[n:], batch["p_ref_rejected"],
                                  batch["p_weight"], cfg)
            loss = loss + cfg.dpo_weight * dpo
            aux.update(daux)
        if use_kl:
            kl_rows, anchor = jnp.concatenate(kls), jnp.concatenate(anchors)
            token_kl = jnp.sum(anchor * kl_rows) / jnp.maximum(jnp.sum(anchor), 1.0)
            loss = loss + cfg.token_kl_weight * token_kl
            aux["token_kl"] = token_kl
        aux["loss_total"] = loss
        return loss, aux

    return loss_fn


@functools.lru_cache(maxsize=4)
def _cached_loss(config: DalleBartConfig, cfg: PreferenceConfig, with_pairs: bool):
    return make_preference_loss(DalleBart(config), config, cfg, with_pairs=with_pairs)


def reward_mask(labels: jax.Array, classes: jax.Array | None, scope: str) -> jax.Array | None:
    """(B, S) the positions a ``scope`` reward scores, or None for all of them."""
    if scope == "all":
        return None
    return deciding_positions(labels, classes, window=DECIDING_WINDOW)[0]


@functools.lru_cache(maxsize=4)
def _logprob_fn(config: DalleBartConfig, temperature: float = 1.0, guidance: float = 1.0):
    model = DalleBart(config)

    def fn(p, i, m, y, w, ui, um):
        return sequence_logprobs(model, p, i, m, y, config.decoder_start_token_id, reward_mask=w,
                                 temperature=temperature, guidance=guidance, uncond=(ui, um))[0]

    return jax.jit(fn)


def batched_logprobs(config: DalleBartConfig, params: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                     labels: np.ndarray, batch_size: int = 16, mask: np.ndarray | None = None,
                     temperature: float = 1.0, guidance: float = 1.0,
                     uncond: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Summed log-probs of every row (over ``mask``'s positions if given; the model read at ``temperature`` and
    super-conditioning scale ``guidance`` against ``uncond``, the empty prompt), in fixed-size batches (the last
    one padded, so one compiled shape)."""
    if guidance != 1.0 and uncond is None:
        raise ValueError("guidance != 1 needs the empty prompt's ids and mask (uncond)")
    fn = _logprob_fn(config, float(temperature), float(guidance))
    ui, um = (jnp.asarray(x) for x in uncond) if uncond is not None else \
        (jnp.asarray(input_ids[:1]), jnp.asarray(attention_mask[:1]))
    n = len(labels)
    weights = np.ones(labels.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
    out = np.zeros(n, np.float32)
    for i in range(0, n, batch_size):
        idx = np.arange(i, min(i + batch_size, n))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        lp = fn(params, jnp.asarray(input_ids[pad]), jnp.asarray(attention_mask[pad]), jnp.asarray(labels[pad]),
                jnp.asarray(weights[pad]), ui, um)
        out[idx] = np.asarray(lp)[: len(idx)]
    return out


# ----------------------------------------------------------------------------------------------- data


@dataclass
class PreferenceData:
    """Tokenised examples of one split: ``unpaired`` (KTO rows) and ``pairs`` (DPO rows; may be empty)."""

    unpaired: dict[str, np.ndarray]
    pairs: dict[str, np.ndarray]
    content_sha256: str
    prompts: list[str] = field(default_factory=list)  # per unpaired row
    reasons: list[list[str]] = field(default_factory=list)  # per unpaired row: its 👎 and report reasons

    @property
    def n_pairs(self) -> int:
        return len(self.pairs.get("p_chosen", ()))


def load_preference_data(data_dir: Path, tokenizer: DalleBartTokenizer, image_length: int, *,
                         split: str = "train") -> PreferenceData:
    """Read ``unpaired.parquet`` / ``pairs.parquet`` of an export and tokenise the prompts of ``split``."""
    import pyarrow.parquet as pq

    manifest_path = Path(data_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{data_dir}: no manifest.json (export the feedback first)")
    manifest = json.loads(manifest_path.read_text())
    rows = [r for r in pq.read_table(Path(data_dir) / manifest["files"]["unpaired"]).to_pylist()
            if r["split"] == split]
    if not rows:
        raise ValueError(f"{data_dir}: no labelled examples in the {split!r} split")
    bad = [r["example_id"] for r in rows if len(r["tokens"]) != image_length]
    if bad:
        raise ValueError(f"{data_dir}: {len(bad)} examples are not {image_length} tokens long (another model's?)")
    tok = tokenizer([r["prompt"] for r in rows])
    contested = {r["normalized_prompt"] for r in rows if not r["desirable"]}
    unpaired = {"input_ids": tok["input_ids"].astype(np.int32),
                "attention_mask": tok["attention_mask"].astype(np.int32),
                "labels": np.asarray([r["tokens"] for r in rows], np.int32),
                "desirable": np.asarray([r["desirable"] for r in rows], np.float32),
                "weight": np.asarray([r["weight"] for r in rows], np.float32),
                # 1.0 where nobody disliked any image of the prompt (the token KL's "uncontested" scope)
                "uncontested": np.asarray([r["normalized_prompt"] not in contested for r in rows], np.float32)}
    pair_rows = [r for r in pq.read_table(Path(data_dir) / manifest["files"]["pairs"]).to_pylist()
                 if r["split"] == split]
    pairs: dict[str, np.ndarray] = {}
    if pair_rows:
        ptok = tokenizer([r["prompt"] for r in pair_rows])
        pairs = {"p_input_ids": ptok["input_ids"].astype(np.int32),
                 "p_attention_mask": ptok["attention_mask"].astype(np.int32),
                 "p_chosen": np.asarray([r["chosen_tokens"] for r in pair_rows], np.int32),
                 "p_rejected": np.asarray([r["rejected_tokens"] for r in pair_rows], np.int32),
                 "p_weight": np.asarray([r["weight"] for r in pair_rows], np.float32)}
    reasons = [[x for x in (r.get("down_reasons") or []) + (r.get("report_reasons") or []) if x] for r in rows]
    return PreferenceData(unpaired, pairs, manifest.get("content_sha256", ""), [r["prompt"] for r in rows], reasons)


class PreferenceBatches:
    """KTO rows and (when there are pairs) DPO pairs side by side, each its own seeded epoch order."""

    def __init__(self, data: PreferenceData, batch_size: int, *, seed: int = 0):
        n = len(data.unpaired["labels"])
        self.kto = ArrayBatches(data.unpaired, min(batch_size, n), seed=seed)
        self.size = min(batch_size, n)
        self.pairs = ArrayBatches(data.pairs, self.size, seed=seed + 1) if data.n_pairs >= self.size else None

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        batch = dict(self.kto[k])
        if self.pairs is not None:
            batch.update(self.pairs[k])
        return batch


def _with_reference(data: PreferenceData, config: DalleBartConfig, ref_params: Any, work: Path,
                    batch_size: int, *, scope: str = "all", classes: np.ndarray | None = None,
                    temperature: float = 1.0, guidance: float = 1.0,
                    uncond: tuple[np.ndarray, np.ndarray] | None = None) -> PreferenceData:
    """Add the parent's summed log-probs (``ref_logp``; ``p_ref_chosen`` / ``p_ref_rejected``) over the reward
    ``scope``'s positions at ``temperature`` and ``guidance``, computed once and cached in ``work/reference.npz``
    under the data's hash, the scope, the temperature and the guidance."""
    cache = work / "reference.npz"
    tag = scope + ("" if temperature == 1.0 else f"@T{temperature}") + ("" if guidance == 1.0 else f"@G{guidance}")
    key = hashlib.sha256((data.content_sha256 + str(len(data.unpaired["labels"])) + tag).encode()).hexdigest()

    def logprobs(ids: np.ndarray, att: np.ndarray, labels: np.ndarray) -> np.ndarray:
        mask = reward_mask(jnp.asarray(labels), None if classes is None else jnp.asarray(classes), scope)
        return batched_logprobs(config, ref_params, ids, att, labels, batch_size,
                                None if mask is None else np.asarray(mask), temperature, guidance, uncond)

    if cache.is_file():
        saved = np.load(cache)
        if str(saved["key"]) == key:
            data.unpaired["ref_logp"] = saved["ref_logp"]
            if data.n_pairs:
                data.pairs["p_ref_chosen"], data.pairs["p_ref_rejected"] = saved["ref_chosen"], saved["ref_rejected"]
            return data
    u = data.unpaired
    data.unpaired["ref_logp"] = logprobs(u["input_ids"], u["attention_mask"], u["labels"])
    extra: dict[str, np.ndarray] = {}
    if data.n_pairs:
        p = data.pairs
        p["p_ref_chosen"] = logprobs(p["p_input_ids"], p["p_attention_mask"], p["p_chosen"])
        p["p_ref_rejected"] = logprobs(p["p_input_ids"], p["p_attention_mask"], p["p_rejected"])
        extra = {"ref_chosen": p["p_ref_chosen"], "ref_rejected": p["p_ref_rejected"]}
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / "reference.partial.npz"
    np.savez(tmp, key=np.asarray(key), ref_logp=u["ref_logp"], **extra)
    tmp.replace(cache)
    return data


# ----------------------------------------------------------------------------------------------- run


@dataclass
class FinetuneOutput:
    out_dir: Path
    interrupted: bool
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def copy_parent_parts(parent: Path, out: Path) -> None:
    """The parts a DalleBart fine-tune leaves as they are (VQGAN, CLIP, safety concept)."""
    for part in PARENT_PARTS:
        if (parent / part).is_dir():
            shutil.copytree(parent / part, out / part, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*-train", "eval"))
    for name in PARENT_FILES:
        if (parent / name).is_file():
            shutil.copyfile(parent / name, out / name)


def finetune(parent_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *,
             cfg: PreferenceConfig | None = None, steps: int = 100, batch_size: int = 16, lr: float = 5e-5,
             seed: int = 0, work_dir: str | Path | None = None, progress: bool | None = None, log_every: int = 1,
             save_every: int = 25, stop_after: int | None = None, checkpoint_id: str | None = None,
             meta: dict[str, Any] | None = None, trainable: str = "all", counterfactuals: int = 0) -> FinetuneOutput:
    """Fine-tune the DalleBart of checkpoint ``parent_dir`` on the export in ``data_dir`` into ``out_dir``.

    ``out_dir`` appears only when training finished (parts first, ``checkpoint.json`` last), so an interrupted or
    cancelled run never leaves a directory that looks like a checkpoint. Training state and ``metrics.jsonl`` go
    to ``work_dir`` (default ``<out>-train``); running the same call again resumes. ``trainable`` (a key of
    :data:`TRAINABLE`) picks the parameters that may change; the others stay the parent's, and the exported
    checkpoint is always a whole DalleBart. ``counterfactuals`` > 0 adds, for each disliked image whose complaint
    is its colour, that many DPO pairs of it repainted in other colours over it (:mod:`training.counterfactual`).
    """
    cfg = cfg or PreferenceConfig()
    cfg.validate()
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r}: choose one of {', '.join(TRAINABLE)}")
    parent, out = Path(parent_dir), Path(out_dir)
    if (out / "checkpoint.json").is_file():
        raise FileExistsError(f"{out}: a checkpoint is already there")
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + "-train")
    config = DalleBartConfig.from_json(parent / "dallebart")
    tokenizer = DalleBartTokenizer.from_dir(parent / "dallebart", max_length=config.max_text_length,
                                            normalize=config.normalize_text)
    data = load_preference_data(Path(data_dir), tokenizer, config.image_length)
    if counterfactuals < 0:
        raise ValueError(f"counterfactuals must be >= 0; got {counterfactuals}")
    cf_summary = None
    if counterfactuals:
        from training.counterfactual import with_counterfactuals

        data, cf_summary = with_counterfactuals(data, parent / "vqgan", counterfactuals, work, seed=seed)
    ref_params = load_dallebart_params(parent / "dallebart", config, dtype="float32")
    code_classes = colours = None
    if cfg.needs_code_colours:
        classes, names = code_colour_classes(parent / "vqgan", COLOURS)
        code_classes = class_matrix(classes, config.image_vocab_size + 1, len(names))
        colours = describe(classes, names)
    uncond = None
    if cfg.guidance != 1.0:
        empty = tokenizer.unconditional(1)
        uncond = (empty["input_ids"].astype(np.int32), empty["attention_mask"].astype(np.int32))
    data = _with_reference(data, config, ref_params, work, batch_size, scope=cfg.reward_scope, classes=code_classes,
                           temperature=cfg.temperature, guidance=cfg.guidance, uncond=uncond)
    batches = PreferenceBatches(data, batch_size, seed=seed)
    optim = OptimConfig(name="adamw", learning_rate=lr, warmup_steps=min(10, max(steps // 10, 1)), decay="cosine",
                        decay_steps=max(steps, 1), end_lr_ratio=0.1, b2=0.98, weight_decay=0.0, max_grad_norm=1.0,
                        trainable=TRAINABLE[trainable])
    n_trained = sum(int(np.prod(leaf.shape)) for leaf, on in zip(jax.tree.leaves(ref_params),
                    jax.tree.leaves(trainable_mask(ref_params, optim.trainable)), strict=True) if on)
    if n_trained == 0:
        raise ValueError(f"trainable={trainable!r} matches no parameter of {parent}")
    if cfg.token_kl_weight > 0 or code_classes is not None or uncond is not None:
        # the parent's parameters, the codes' colours and the empty prompt live in the loss (constants of the step)
        loss_fn = make_preference_loss(DalleBart(config), config, cfg, with_pairs=batches.pairs is not None,
                                       ref_params=jax.tree.map(jnp.asarray, ref_params) if cfg.token_kl_weight > 0
                                       else None, code_classes=code_classes, uncond=uncond)
    else:
        loss_fn = _cached_loss(config, cfg, batches.pairs is not None)
    result = train(jax.tree.map(jnp.array, ref_params), loss_fn, batches,
                   steps=steps, optim=optim, seed=seed, ckpt_dir=work / "checkpoints", save_every=save_every,
                   log_path=work / "metrics.jsonl", log_every=log_every, progress=progress, stop_after=stop_after,
                   meta={"model": "dallebart-preference", "objective": cfg.__dict__, "batch_size": batches.size,
                         "examples": int(len(data.unpaired["labels"])), "pairs": data.n_pairs,
                         "trainable": trainable, "trained_parameters": n_trained,
                         "counterfactuals": counterfactuals})
    summary = {"objective": dict(cfg.__dict__), "lr": lr, "steps": steps, "batch_size": batches.size,
               "trainable": trainable, "trained_parameters": n_trained,
               "examples": int(len(data.unpaired["labels"])), "pairs": data.n_pairs,
               "data_sha256": data.content_sha256, "parent": str(parent)}
    if colours is not None:
        summary["codes_per_colour"] = colours
    if cf_summary is not None:
        summary["counterfactuals"] = cf_summary
    if result.history:
        last = result.history[-1]
        summary["last"] = {k: v for k, v in last.items() if isinstance(v, int | float)}
    if result.interrupted:
        return FinetuneOutput(out, True, int(result.state.step), result.history, summary)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    export_trained(staging / "dallebart", jax.device_get(result.params), config.to_dict(), result, {})
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (parent / "dallebart" / name).is_file():
            shutil.copyfile(parent / "dallebart" / name, staging / "dallebart" / name)
    copy_parent_parts(parent, staging)
    parent_meta = json.loads((parent / "checkpoint.json").read_text()) if (parent / "checkpoint.json").is_file() \
        else {}
    ck = {"id": checkpoint_id or out.name, "parent": parent_meta.get("id", parent.name),
          "sampling": parent_meta.get("sampling", {}), "finetune": summary, **(meta or {})}
    (staging / "checkpoint.json").write_text(json.dumps(ck, indent=2, default=str) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return FinetuneOutput(out, False, int(result.state.step), result.history, summary)
