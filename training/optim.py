"""Optimisers and learning-rate schedules from one small dataclass.

The reference trainer (dalle-mini ``tools/train/train.py``) offers AdamW and Adafactor behind a linear
warm-up followed by a constant, linear or exponential phase; we keep AdamW / Adafactor / SGD, linear warm-up,
and a constant, cosine or linear decay, plus optional global-norm clipping.

Gradient accumulation is *not* an optax wrapper here: :func:`training.loop.train` splits each batch into
``grad_accum_steps`` micro-batches inside one jitted step (``lax.scan``) and averages their gradients, so one
optimiser update always consumes exactly one batch of the data source and the data position equals the
update step (which keeps resume exact).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import jax
import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")
DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class OptimConfig:
    """What to optimise with; every field has a sensible default for small models.

    ``decay_steps`` is the length of the decay phase after warm-up (``None``: no decay even if ``decay`` is
    not ``constant``); the rate ends at ``learning_rate * end_lr_ratio``.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    decay: str = "constant"
    decay_steps: int | None = None
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only
    max_grad_norm: float | None = None
    grad_accum_steps: int = 1
    #: regular expressions over a parameter's path (``model/encoder/layers/...``, keys joined by ``/``): only
    #: leaves matching one of them are updated, every other leaf is frozen (its update is zero and it keeps no
    #: optimiser state); empty: every leaf is trained
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimConfig.name={self.name!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.decay not in DECAYS:
            raise ValueError(f"OptimConfig.decay={self.decay!r}: choose one of {', '.join(DECAYS)}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ValueError(f"OptimConfig.decay_steps must be > 0 or None, got {self.decay_steps}")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"OptimConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"OptimConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if isinstance(self.trainable, str):
            raise ValueError("OptimConfig.trainable is a tuple of patterns, not one string")
        for pattern in self.trainable:
            re.compile(pattern)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OptimConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"OptimConfig: unknown keys {unknown}")
        if "trainable" in raw:
            raw = {**raw, "trainable": tuple(raw["trainable"])}
        return cls(**raw)


def param_path(path: Any) -> str:
    """``model/encoder/embed_tokens/embedding``: a leaf's key path as :attr:`OptimConfig.trainable` matches it."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def trainable_mask(params: Any, patterns: tuple[str, ...]) -> Any:
    """A tree like ``params`` of bools: which leaves ``patterns`` trains (all of them when ``patterns`` is empty)."""
    if not patterns:
        return jax.tree.map(lambda _: True, params)
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(lambda path, _: any(c.search(param_path(path)) for c in compiled),
                                            params)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then constant / cosine / linear."""
    peak = cfg.learning_rate
    if cfg.decay == "constant" or cfg.decay_steps is None:
        after = optax.constant_schedule(peak)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, cfg.decay_steps, alpha=cfg.end_lr_ratio)
    else:
        after = optax.linear_schedule(peak, peak * cfg.end_lr_ratio, cfg.decay_steps)
    if cfg.warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation for ``cfg`` (clipping first, then the optimiser with its schedule)."""
    lr = make_schedule(cfg)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adafactor":
        # Adafactor has its own update clipping (RMS threshold 1.0, as in the reference trainer).
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None)
    else:
        opt = optax.sgd(lr, momentum=cfg.momentum or None)
        if cfg.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    if not cfg.trainable:
        return opt
    # frozen leaves: a zero update and no state; the clipping norm and weight decay see only the trained leaves
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",  # noqa: E731
                                         trainable_mask(params, cfg.trainable))
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
