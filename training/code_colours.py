"""Which colour each VQGAN code paints, and a token KL that leaves the choice of the object's colour free.

The users' complaint in the feedback loop is about one attribute, the colour drawn when the prompt names none. A
token-level KL to the parent holds every decision the parent makes, that one included (the parent picks red with
90 % confidence), and without it the cheapest way to make a disliked image unlikely is to draw nothing at all. The
colour-spared KL splits the parent's next-token distribution by the colour each code paints and drops only the
term for *which* colour the object takes:

    KL(p ‖ q) = KL_obj(p ‖ q) + p(obj) · KL(p(colour | obj) ‖ q(colour | obj)) + Σ_c p(c) · KL(p(· | c) ‖ q(· | c))

where "obj" is every code of a colour other than the image's background (the colour of its first token, the
top-left corner). What stays anchored: background against object at each position (where a shape is drawn, and
that one is drawn at all) and, within a colour, which code (the shape's outline). What is freed: the object's
colour, and only where it is decided (:func:`deciding_positions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def code_colour_classes(vqgan_dir: str | Path, palette: dict[str, tuple[int, int, int]], *,
                        images: np.ndarray | None = None, n_images: int = 1024,
                        min_share: float = 0.1) -> tuple[np.ndarray, tuple[str, ...]]:
    """(colour per code (n_embed,) int32, the colours' names), read from where each code is used: ``images``
    (B, R, R, 3) uint8 (default: ``n_images`` scenes of the shapes dataset) are encoded, every pixel is matched to
    the nearest ``palette`` colour, each token's patch takes the most common colour in it other than the image's
    background (its top-left pixel's) if that covers ``min_share`` of the patch, else the background's, and each
    code the colour most of its patches have. So a code of an object's edge is that object's colour, and the
    first code of another colour in an image is where its object starts. Codes the images never use get the
    palette's first colour."""
    from training.data.shapes import ShapesDataset
    from training.encode import Encoder, load_vqgan

    names = tuple(palette)
    rgb = np.asarray([palette[n] for n in names], np.float32)
    model, config, params = load_vqgan(vqgan_dir)
    if images is None:
        data = ShapesDataset(seed=20261207)
        images = np.stack([data[i].image for i in range(n_images)])
    codes = np.asarray(Encoder(model, params)(images))  # (B, g*g)
    g = int(round(codes.shape[1] ** 0.5))
    f = images.shape[1] // g
    pixel = np.argmin(((images.astype(np.float32)[..., None, :] - rgb) ** 2).sum(-1), axis=-1)  # (B, R, R)
    patches = pixel.reshape(len(images), g, f, g, f).transpose(0, 1, 3, 2, 4).reshape(len(images), g * g, f * f)
    counts = np.stack([np.sum(patches == k, axis=-1) for k in range(len(names))], axis=-1)  # (B, g*g, C)
    background = pixel[:, 0, 0]  # (B,)
    others = counts.copy()
    others[np.arange(len(images)), :, background] = 0
    patch_class = np.where(others.max(-1) >= min_share * f * f, others.argmax(-1), background[:, None])
    votes = np.zeros((config.n_embed, len(names)), np.int64)
    np.add.at(votes, (codes.reshape(-1), patch_class.reshape(-1)), 1)
    return votes.argmax(-1).astype(np.int32), names


def class_matrix(classes: np.ndarray, vocab: int, n_classes: int) -> np.ndarray:
    """One-hot (vocab, n_classes) float32 of ``classes`` (n_embed,); tokens past the codebook (the start token)
    belong to no colour (a zero row)."""
    if classes.ndim != 1 or len(classes) > vocab:
        raise ValueError(f"{len(classes)} code classes for a vocabulary of {vocab}")
    out = np.zeros((vocab, n_classes), np.float32)
    out[np.arange(len(classes)), classes] = 1.0
    return out


def deciding_positions(labels: jax.Array, classes: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """(free (B, S), background (B,)): each image's background colour (that of its first token) and 1.0 where its
    object's colour is decided: the first code of another colour in ``labels`` (B, S) and the ``window`` positions
    after it. Earlier positions are background, later ones continue the colour the prefix set (and the parent is
    right to be sure of that); spreading a colour complaint over them is what makes it cheap to ignore."""
    label_class = jnp.argmax(classes, axis=-1)[labels]  # (B, S)
    background = label_class[:, 0]
    is_obj = label_class != background[:, None]
    first = jnp.where(jnp.any(is_obj, axis=1), jnp.argmax(is_obj, axis=1), labels.shape[1])
    t = jnp.arange(labels.shape[1])[None, :]
    free = ((t >= first[:, None]) & (t <= first[:, None] + window)).astype(jnp.float32)
    return free, background


def colour_spared_kl(ref_lp: jax.Array, lp: jax.Array, classes: jax.Array, background: jax.Array,
                     free: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(full KL, colour-spared KL), each summed over positions → (B,), between the parent's log-probs ``ref_lp``
    and the model's ``lp`` (both (B, S, V)); ``classes`` is the (V, C) one-hot of :func:`class_matrix`,
    ``background`` (B,) each image's background colour, ``free`` (B, S) where the colour term is dropped
    (everywhere if None; see :func:`deciding_positions`)."""
    p = jnp.exp(ref_lp)
    full = jnp.sum(p * (ref_lp - lp), axis=-1)
    tiny = jnp.finfo(jnp.float32).tiny
    obj = 1.0 - jax.nn.one_hot(background, classes.shape[1])[:, None, :]  # (B, 1, C): the object colours
    p_c = jnp.maximum(p @ classes, tiny)  # (B, S, C)
    q_c = jnp.maximum(jnp.exp(lp) @ classes, tiny)
    p_obj = jnp.sum(obj * p_c, axis=-1, keepdims=True)
    q_obj = jnp.sum(obj * q_c, axis=-1, keepdims=True)
    which_colour = jnp.sum(obj * p_c * (jnp.log(p_c / p_obj) - jnp.log(q_c / q_obj)), axis=-1)
    spared = full - which_colour if free is None else full - free * which_colour
    return jnp.sum(full, axis=-1), jnp.sum(spared, axis=-1)


def describe(classes: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """How many codes paint each colour (recorded with the fine-tune)."""
    counts = np.bincount(classes, minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts, strict=True)}
