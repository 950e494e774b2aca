"""Which colour each VQGAN code paints, and a token KL that leaves the choice of colour free.

The users' complaint in the feedback loop is about one attribute, the colour drawn when the prompt names none. A
token-level KL to the parent holds every decision the parent makes, that one included (the parent picks red with
90 % confidence), and without it the cheapest way to make a disliked image unlikely is to draw nothing at all. The
colour-spared KL splits the parent's next-token distribution by the colour each code paints and drops only the
term for *which* colour among the object colours:

    KL(p ‖ q) = KL_obj(p ‖ q) + p(obj) · KL(p(colour | obj) ‖ q(colour | obj)) + Σ_c p(c) · KL(p(· | c) ‖ q(· | c))

where "obj" is every code of a colour other than the background's. What stays anchored: background against
object at each position (where a shape is drawn, and that one is drawn at all) and, within a colour, which code
(the shape's outline). What is freed: the object's colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: the class of codes that paint the background (and of tokens that are not codes, such as the start token)
BACKGROUND = 0


def code_colour_classes(vqgan_dir: str | Path, palette: dict[str, tuple[int, int, int]], background: str = "white",
                        *, grid: int = 4, batch: int = 256) -> tuple[np.ndarray, tuple[str, ...]]:
    """(class per code (n_embed,) int32, class names): each code decoded alone as a ``grid``×``grid`` patch of
    itself, the mean colour of the patch's centre matched to the nearest ``palette`` colour. Class 0 is
    ``background``; the others are the palette's remaining colours in order."""
    from training.encode import load_vqgan

    if background not in palette:
        raise ValueError(f"background colour {background!r} is not in the palette")
    model, config, params = load_vqgan(vqgan_dir)
    names = (background, *(n for n in palette if n != background))
    rgb = np.asarray([palette[n] for n in names], np.float32) / 255.0

    @jax.jit
    def mean_colours(codes: jax.Array) -> jax.Array:
        z = model.apply({"params": params}, codes, (grid, grid), method=lambda m, c, g: m.quantize.lookup(c, g))
        images = model.apply({"params": params}, z, clip=True, method=model.decode)  # (B, h, w, 3)
        h, w = images.shape[1], images.shape[2]
        centre = images[:, h // 4: h - h // 4, w // 4: w - w // 4]
        return jnp.mean(centre, axis=(1, 2))

    n = config.n_embed
    out = np.zeros((n, 3), np.float32)
    for lo in range(0, n, batch):
        ids = np.arange(lo, lo + batch) % n  # the last batch padded with codes from the start: one compiled shape
        colours = np.asarray(mean_colours(jnp.asarray(np.repeat(ids[:, None], grid * grid, axis=1), jnp.int32)))
        take = min(batch, n - lo)
        out[lo:lo + take] = colours[:take]
    distance = np.sum((out[:, None, :] - rgb[None, :, :]) ** 2, axis=-1)
    return np.argmin(distance, axis=1).astype(np.int32), names


def class_matrix(classes: np.ndarray, vocab: int, n_classes: int) -> np.ndarray:
    """One-hot (vocab, n_classes) float32 of ``classes`` (n_embed,); tokens past the codebook are background."""
    if classes.ndim != 1 or len(classes) > vocab:
        raise ValueError(f"{len(classes)} code classes for a vocabulary of {vocab}")
    full = np.full(vocab, BACKGROUND, np.int32)
    full[:len(classes)] = classes
    return np.eye(n_classes, dtype=np.float32)[full]


def deciding_positions(labels: jax.Array, classes: jax.Array, window: int) -> jax.Array:
    """(B, S) 1.0 where the image's colour is decided: every position up to the first code of an object colour in
    ``labels`` (B, S) and ``window`` positions after it (the object's first raster row). Later positions only
    continue the colour the prefix set, and the parent is right to be sure of that."""
    label_class = jnp.argmax(classes, axis=-1)[labels]  # (B, S)
    is_obj = label_class != BACKGROUND
    first = jnp.where(jnp.any(is_obj, axis=1), jnp.argmax(is_obj, axis=1), labels.shape[1])
    return (jnp.arange(labels.shape[1])[None, :] <= first[:, None] + window).astype(jnp.float32)


def colour_spared_kl(ref_lp: jax.Array, lp: jax.Array, classes: jax.Array,
                     free: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(full KL, colour-spared KL), each summed over positions → (B,), between the parent's log-probs ``ref_lp``
    and the model's ``lp`` (both (B, S, V)); ``classes`` is the (V, C) one-hot of :func:`class_matrix`; ``free``
    (B, S) says where the colour term is dropped (everywhere if None; see :func:`deciding_positions`)."""
    p = jnp.exp(ref_lp)
    full = jnp.sum(p * (ref_lp - lp), axis=-1)
    tiny = jnp.finfo(jnp.float32).tiny
    p_c = jnp.maximum(p @ classes, tiny)[..., 1:]  # (B, S, C-1): the object colours
    q_c = jnp.maximum(jnp.exp(lp) @ classes, tiny)[..., 1:]
    p_obj = jnp.sum(p_c, axis=-1, keepdims=True)
    q_obj = jnp.sum(q_c, axis=-1, keepdims=True)
    which_colour = jnp.sum(p_c * (jnp.log(p_c / p_obj) - jnp.log(q_c / q_obj)), axis=-1)
    spared = full - which_colour if free is None else full - free * which_colour
    return jnp.sum(full, axis=-1), jnp.sum(spared, axis=-1)


def describe(classes: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """How many codes paint each colour (recorded with the fine-tune)."""
    counts = np.bincount(classes, minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts, strict=True)}
