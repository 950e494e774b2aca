"""The analytic detector: the yardstick that scores generated shapes images against their prompts.

Images of the procedural dataset are flat colours on a flat background, so no learned model is needed:

1. a 3×3 median filter removes pixel noise; every pixel takes its nearest palette colour;
2. the background is the most common palette colour on the border;
3. objects are the connected components of non-background pixels (tiny specks dropped);
4. per object: colour = most common palette colour of its interior; shape from the fill ratio of its
   bounding box (square 1.0, circle π/4 ≈ 0.79, apex-up triangle 0.5, five-point star ≈ 0.33) with the
   solidity (area / convex-hull area, a star's ≈ 0.6) as a second opinion; size from the bounding-box extent
   (small ≈ ¼ of the width, large ≈ ½); position from the bounding-box centre; for two objects the relation
   from the centres' dominant axis.

:func:`fidelity` = fraction of images whose detected attributes match every attribute the prompt names
(:func:`training.data.captions.parse_prompt`), plus per-attribute accuracies and the *default share* (fraction
of colour-free single-object prompts whose object came out red).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from training.data.captions import BIAS_COLOUR, COLOUR_NAMES, COLOURS, parse_prompt

__all__ = ["detect", "fidelity", "matches", "palette_labels", "parse_prompt", "relation_between"]

_PALETTE = np.asarray([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (8, 3)
MIN_AREA_FRACTION = 0.003  # components smaller than this share of the canvas are noise
LARGE_THRESHOLD = 0.36  # bounding-box extent / width separating small (~0.25) from large (~0.5)
CENTER_RADIUS = 0.11  # |offset| / width below which an object counts as centred


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index of the nearest palette colour of each pixel (after a 3×3 median filter)."""
    img = ndimage.median_filter(image.astype(np.float32), size=(3, 3, 1))
    # |x - p|² = |x|² - 2 x·p + |p|²; |x|² is the same for every p
    d = (_PALETTE**2).sum(-1) - 2.0 * img @ _PALETTE.T
    return d.argmin(-1)


def _convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (monotone chain + shoelace)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return float(len(pts))
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq):
        out: list[np.ndarray] = []
        for p in seq:
            while len(out) >= 2:
                (ox, oy), (ax, ay) = out[-2], out[-1]
                if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) > 0:
                    break
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    h = np.asarray(hull, dtype=np.float64)
    x, y = h[:, 0], h[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def classify_shape(fill: float, solidity: float) -> str:
    """Shape from solidity (only the star is concave: ≈ 0.6 vs ≥ 0.9) and then the bounding-box fill ratio."""
    if solidity < 0.8 or fill < 0.4:
        return "star"
    if fill >= 0.86:
        return "square"
    if fill >= 0.68:
        return "circle"
    return "triangle"


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def relation_between(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Relation of detected object ``a`` to ``b`` from their bounding-box centres (dominant axis)."""
    dx, dy = a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def detect(image: np.ndarray, max_objects: int = 4) -> dict[str, Any]:
    """Detect background and objects of an RGB uint8 (H, W, 3) image.

    Returns ``{"background": colour, "objects": [{"colour", "shape", "size", "position", "center", "bbox",
    "fill", "solidity", "area"}]}``, objects sorted by area (largest first), coordinates as fractions of the
    width/height.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"detect expects an (H, W, 3) RGB image, got shape {image.shape}")
    h, w = image.shape[:2]
    labels = palette_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(COLOUR_NAMES)).argmax())
    fg = labels != bg
    comp, n = ndimage.label(fg)
    objects = []
    if n:
        areas = ndimage.sum_labels(fg, comp, index=np.arange(1, n + 1))
        slices = ndimage.find_objects(comp)
        for k in np.argsort(-areas):
            if areas[k] < MIN_AREA_FRACTION * h * w or len(objects) >= max_objects:
                break
            sl = slices[k]
            region = ndimage.binary_fill_holes(comp[sl] == k + 1)
            bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            fill = float(region.sum()) / float(bh * bw)
            # hull of pixel squares: use pixel corners so a filled square has solidity 1
            edge = region & ~ndimage.binary_erosion(region)
            ey, ex = np.nonzero(edge)
            corners = np.concatenate([np.stack([ex + dx, ey + dy], 1) for dx in (0, 1) for dy in (0, 1)])
            solidity = float(region.sum()) / max(_convex_hull_area(corners), 1.0)
            inner = ndimage.binary_erosion(region)
            votes = labels[sl][inner if inner.any() else region]
            votes = votes[votes != bg]
            colour = int(np.bincount(votes, minlength=len(COLOUR_NAMES)).argmax()) if votes.size else bg
            cx = (sl[1].start + sl[1].stop) / 2 / w
            cy = (sl[0].start + sl[0].stop) / 2 / h
            extent = max(bw / w, bh / h)
            objects.append({
                "colour": COLOUR_NAMES[colour],
                "shape": classify_shape(fill, solidity),
                "size": "large" if extent >= LARGE_THRESHOLD else "small",
                "position": _position(cx, cy),
                "center": (cx, cy),
                "bbox": (sl[1].start / w, sl[0].start / h, sl[1].stop / w, sl[0].stop / h),
                "fill": fill,
                "solidity": solidity,
                "area": float(areas[k]) / (h * w),
            })
    return {"background": COLOUR_NAMES[bg], "objects": objects}


_OBJECT_ATTRS = ("colour", "shape", "size", "position")


def matches(detected: dict[str, Any], named: dict[str, Any]) -> dict[str, bool]:
    """Which named attributes the detection satisfies: ``count`` always, plus each attribute the prompt names.

    Named objects are matched to detected objects by the assignment that satisfies the most attributes; an
    object attribute is true only if it holds for every named object; ``relation`` is checked between the
    assigned objects.
    """
    nobj = named.get("objects", [])
    dobj = detected.get("objects", [])
    out: dict[str, bool] = {"count": len(dobj) == len(nobj)}
    attrs = [a for a in _OBJECT_ATTRS if any(o.get(a) is not None for o in nobj)]
    best: tuple[int, dict[str, bool]] | None = None
    if nobj and len(dobj) >= len(nobj):
        for perm in itertools.permutations(range(len(dobj)), len(nobj)):
            res = {a: all(o.get(a) is None or dobj[j][a] == o[a] for o, j in zip(nobj, perm, strict=True))
                   for a in attrs}
            if named.get("relation") and len(nobj) == 2:
                res["relation"] = relation_between(dobj[perm[0]], dobj[perm[1]]) == named["relation"]
            score = sum(res.values())
            if best is None or score > best[0]:
                best = (score, res)
    if best is None:  # too few objects detected: every named object attribute fails
        res = {a: False for a in attrs}
        if named.get("relation"):
            res["relation"] = False
        best = (0, res)
    out.update(best[1])
    if named.get("background") is not None:
        out["background"] = detected.get("background") == named["background"]
    return out


def fidelity(images: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    """Score images against the prompts that produced them.

    Returns ``{"n", "fidelity", "per_attribute": {attr: accuracy}, "default_share", "n_colour_free",
    "items": [{"prompt", "named", "detected", "matches", "ok"}]}``. ``fidelity`` = share of images matching
    every named attribute (and the object count); ``default_share`` = share of colour-free single-object
    prompts whose (largest) detected object is red (None when there are none; unbiased is 1/8).
    """
    if len(images) != len(prompts):
        raise ValueError(f"fidelity: {len(images)} images for {len(prompts)} prompts")
    items = []
    totals: dict[str, list[int]] = {}
    red = colour_free = 0
    for image, prompt in zip(images, prompts, strict=True):
        named = parse_prompt(prompt)
        det = detect(np.asarray(image))
        m = matches(det, named)
        for k, v in m.items():
            totals.setdefault(k, [0, 0])
            totals[k][0] += int(v)
            totals[k][1] += 1
        if len(named["objects"]) == 1 and named["objects"][0]["colour"] is None:
            colour_free += 1
            red += int(bool(det["objects"]) and det["objects"][0]["colour"] == BIAS_COLOUR)
        items.append({"prompt": prompt, "named": named, "detected": det, "matches": m, "ok": all(m.values())})
    n = len(items)
    return {
        "n": n,
        "fidelity": (sum(it["ok"] for it in items) / n) if n else None,
        "per_attribute": {k: c / t for k, (c, t) in sorted(totals.items())},
        "default_share": (red / colour_free) if colour_free else None,
        "n_colour_free": colour_free,
        "items": items,
    }
