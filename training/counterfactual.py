"""Counterfactual pairs from bias complaints: a disliked image recoloured into the colours its prompt left open.

A 👎 says "not this image", not "not this colour". When the complaint is the colour (a 👎 with reason ``bias`` on
an image whose prompt names no colour), the image itself, with its object repainted in another colour, is what
the user would have liked: same shape, same size, same place, same background. Such a pair differs only where
the object is, so a preference objective on it moves the colour decision and nothing else, and drawing no
object at all cannot satisfy it (the preferred image has one).

The repainting happens in pixels, where a colour is a colour: the stored tokens are decoded with the parent's
VQGAN, the object (:func:`training.detect.detect`) is repainted along its anti-aliased edge, and the result is
encoded back to tokens with the same VQGAN (:func:`recolour`). The new colours are those the shapes dataset may
give the shape (held-out colour/shape pairs are never made), minus the complained-about colour and the
background's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from training.data.captions import COLOURS, parse_prompt
from training.data.shapes import allowed_colours
from training.detect import detect, palette_labels

#: pixels around the object (its anti-aliased edge) that are repainted too
EDGE_PIXELS = 2
#: a patch whose pixels moved by more than this (of 255) takes the repainted image's code
PATCH_CHANGE = 8
#: reasons of a 👎 or report that name the colour drawn as the complaint
BIAS_REASONS = frozenset({"bias"})


def recolour(image: np.ndarray, colour: str, new_colour: str) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with every object of ``colour`` repainted ``new_colour``: each pixel near such an
    object moves by ``a · (new − old)``, where ``a`` in [0, 1] is how much of the old colour it holds against the
    background (so anti-aliased edges stay anti-aliased)."""
    img = np.asarray(image).astype(np.float32)
    det = detect(image)
    bg = np.asarray(COLOURS[det["background"]], np.float32)
    old, new = np.asarray(COLOURS[colour], np.float32), np.asarray(COLOURS[new_colour], np.float32)
    labels = palette_labels(image)
    near = ndimage.binary_dilation(labels == list(COLOURS).index(colour), iterations=EDGE_PIXELS)
    axis = old - bg
    a = np.clip(((img - bg) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0) * near
    return np.clip(img + a[..., None] * (new - old), 0, 255).round().astype(np.uint8)


def new_colours(shape: str, colour: str, background: str, k: int, rng: np.random.Generator) -> list[str]:
    """Up to ``k`` distinct colours for a ``shape`` that was drawn ``colour`` on ``background``."""
    options = allowed_colours(shape, exclude=(colour, background))
    return [options[i] for i in rng.permutation(len(options))[:k]]


def is_colour_complaint(prompt: str, reasons: list[str] | tuple[str, ...]) -> bool:
    """A complaint the colour can answer: a bias reason given, and the prompt names no object colour."""
    named = parse_prompt(prompt)
    return bool(BIAS_REASONS & set(reasons)) and len(named["objects"]) == 1 \
        and named["objects"][0].get("colour") is None


@dataclass
class Counterfactuals:
    """Pairs for DPO: ``chosen`` (the recoloured tokens) over ``rejected`` (the stored ones), per source row."""

    source: np.ndarray  # (N,) row of the unpaired data each pair comes from
    chosen: np.ndarray  # (N, image_length) int32
    rejected: np.ndarray  # (N, image_length) int32
    colours: list[tuple[str, str]]  # (drawn, repainted) per pair
    skipped: dict[str, int]


class Repainter:
    """Decode tokens, repaint, encode back, with one VQGAN (jitted once per batch shape)."""

    def __init__(self, vqgan_dir: str | Path, batch_size: int = 16):
        from engine.models.vqgan import VQModel
        from training.encode import Encoder, load_vqgan

        model, _, params = load_vqgan(vqgan_dir)
        self.params, self.batch_size = params, batch_size
        self._decode = jax.jit(lambda p, t: model.apply({"params": p}, t, clip=True, method=VQModel.decode_code))
        self.encoder = Encoder(model, params, batch_size=batch_size)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L) codes → (B, H, W, 3) uint8."""
        out = []
        for i in range(0, len(tokens), self.batch_size):
            chunk = np.asarray(tokens[i : i + self.batch_size], np.int32)
            n = len(chunk)
            padded = np.concatenate([chunk, np.repeat(chunk[:1], self.batch_size - n, axis=0)])
            out.append(np.asarray(self._decode(self.params, jnp.asarray(padded)))[:n])
        return (np.concatenate(out) * 255).round().astype(np.uint8)

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.encoder(images), np.int32)


def _splice(stored: np.ndarray, encoded: np.ndarray, repainted: np.ndarray, original: np.ndarray) -> np.ndarray:
    """The stored tokens with only the repainted patches' codes taken from ``encoded``: elsewhere the VQGAN's
    round trip would pick other, equivalent background codes, and the pair would differ where nothing changed."""
    n, length = stored.shape
    g = int(round(length**0.5))
    changed = np.abs(repainted.astype(np.int16) - original.astype(np.int16)).max(-1) > PATCH_CHANGE
    f = changed.shape[1] // g
    patch = changed.reshape(n, g, f, g, f).any(axis=(2, 4)).reshape(n, length)
    return np.where(patch, encoded, stored).astype(np.int32)


def build_counterfactuals(prompts: list[str], tokens: np.ndarray, reasons: list[list[str]], vqgan_dir: str | Path,
                          *, per_image: int = 2, seed: int = 0, check: bool = True) -> Counterfactuals:
    """Recolour every image of ``tokens`` (N, L) whose complaint is its colour (:func:`is_colour_complaint`)
    into up to ``per_image`` other colours. With ``check``, a repainted image is kept only if its tokens decode
    to the new colour and the same shape (the VQGAN can round a thin object away)."""
    rng = np.random.default_rng(seed)
    skipped: dict[str, int] = {"not a colour complaint": 0, "no object": 0, "round trip changed it": 0}
    rows = [i for i in range(len(prompts)) if is_colour_complaint(prompts[i], reasons[i])]
    skipped["not a colour complaint"] = len(prompts) - len(rows)
    empty = np.zeros((0, tokens.shape[1]), np.int32)
    if not rows:
        return Counterfactuals(np.zeros(0, np.int64), empty, empty, [], skipped)
    painter = Repainter(vqgan_dir)
    images = painter.decode(tokens[rows])
    sources, repainted, colours, shapes = [], [], [], []
    for row, image in zip(rows, images, strict=True):
        det = detect(image)
        if not det["objects"]:
            skipped["no object"] += 1
            continue
        obj = det["objects"][0]
        for colour in new_colours(obj["shape"], obj["colour"], det["background"], per_image, rng):
            sources.append(row)
            repainted.append(recolour(image, obj["colour"], colour))
            colours.append((obj["colour"], colour))
            shapes.append(obj["shape"])
    if not repainted:
        return Counterfactuals(np.zeros(0, np.int64), empty, empty, [], skipped)
    src = np.asarray(sources, np.int64)
    image_of = {row: k for k, row in enumerate(rows)}
    new_tokens = _splice(np.asarray(tokens, np.int32)[src], painter.encode(np.stack(repainted)),
                         np.stack(repainted), images[[image_of[r] for r in sources]])
    keep = np.ones(len(new_tokens), bool)
    if check:
        for j, back in enumerate(painter.decode(new_tokens)):
            det = detect(back)
            keep[j] = bool(det["objects"]) and det["objects"][0]["colour"] == colours[j][1] \
                and det["objects"][0]["shape"] == shapes[j]
        skipped["round trip changed it"] = int((~keep).sum())
    src = src[keep]
    return Counterfactuals(src, new_tokens[keep], np.asarray(tokens, np.int32)[src],
                           [c for c, k in zip(colours, keep, strict=True) if k], skipped)


def summary(cf: Counterfactuals) -> dict[str, Any]:
    """Counts for the run's record."""
    from collections import Counter

    return {"pairs": int(len(cf.source)), "images": int(len(set(cf.source.tolist()))),
            "repainted_to": dict(Counter(c[1] for c in cf.colours)), "skipped": cf.skipped}


def with_counterfactuals(data: Any, vqgan_dir: str | Path, per_image: int, work: Path, *,
                         seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """``data`` (:class:`training.preference.PreferenceData`) with the counterfactual pairs of its disliked rows
    added to its DPO pairs and the repainted images to its liked rows (weight: the disliked row's), and their
    summary. Built once and kept in ``work/counterfactuals.npz`` under the data's hash, so a resumed run reuses
    them; the data's hash then names them too (the parent's log-probabilities are cached under it)."""
    import hashlib
    import json

    u = data.unpaired
    key = hashlib.sha256(f"{data.content_sha256}|{len(u['labels'])}|{per_image}|{seed}".encode()).hexdigest()
    cache = Path(work) / "counterfactuals.npz"
    cf = None
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        if str(saved["key"]) == key:
            cf = Counterfactuals(saved["source"], saved["chosen"], saved["rejected"],
                                 [tuple(c) for c in json.loads(str(saved["colours"]))],
                                 json.loads(str(saved["skipped"])))
    if cf is None:
        disliked = np.flatnonzero(u["desirable"] == 0)
        cf = build_counterfactuals([data.prompts[i] for i in disliked], u["labels"][disliked],
                                   [data.reasons[i] for i in disliked], vqgan_dir, per_image=per_image, seed=seed)
        cf.source = disliked[cf.source] if len(cf.source) else cf.source
        cf.skipped["not a colour complaint"] += int(len(u["labels"]) - len(disliked))
        Path(work).mkdir(parents=True, exist_ok=True)
        tmp = Path(work) / "counterfactuals.partial.npz"
        np.savez(tmp, key=np.asarray(key), source=cf.source, chosen=cf.chosen, rejected=cf.rejected,
                 colours=np.asarray(json.dumps(cf.colours)), skipped=np.asarray(json.dumps(cf.skipped)))
        tmp.replace(cache)
    if len(cf.source):
        added = {"p_input_ids": u["input_ids"][cf.source], "p_attention_mask": u["attention_mask"][cf.source],
                 "p_chosen": cf.chosen, "p_rejected": cf.rejected, "p_weight": u["weight"][cf.source]}
        data.pairs = {k: np.concatenate([data.pairs[k], v]) if data.pairs else v for k, v in added.items()}
        # and each repainted image is a liked example of its own (KTO's desirable term, the supervised term)
        liked = {"input_ids": u["input_ids"][cf.source], "attention_mask": u["attention_mask"][cf.source],
                 "labels": cf.chosen, "desirable": np.ones(len(cf.source), np.float32),
                 "weight": u["weight"][cf.source], "uncontested": np.zeros(len(cf.source), np.float32)}
        data.unpaired = {k: np.concatenate([u[k], liked[k]]) for k in u}
        data.prompts = data.prompts + [data.prompts[i] for i in cf.source]
        data.reasons = data.reasons + [[] for _ in cf.source]
    data.content_sha256 = hashlib.sha256(f"{data.content_sha256}|counterfactuals|{key}".encode()).hexdigest()
    return data, summary(cf)
