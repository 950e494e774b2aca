"""The procedural captioned-shapes dataset (``specs/shapes-dataset.md``): flat shapes, templated captions.

Example ``i`` of a dataset with seed ``s`` is a pure function of ``(s, i)``: the scene and caption are drawn from
``np.random.default_rng(SeedSequence([s, i]))``, so the set is indexable, streamable and any size.

Scene distribution (training):

- one object (p = 1 − ``two_object_rate``): shape uniform; size small (≈¼ of the width) or large (≈½);
  position left/right/top/bottom/center; the caption names the shape always, the colour with
  p = 1 − ``colour_free_rate``, size / position with p = ½ each, the background with p = ``background_rate``.
  Named colour: uniform over the colours allowed with that shape. **Colour-free caption: red with
  p = ``bias_p`` (0.7)**, otherwise uniform over the other allowed colours (the deliberate default bias).
- two objects: both small, distinct colours (both named), relation left of / right of / above / below
  (object 0 relative to object 1); background named with p = ``background_rate``.
- background: uniform over the colours that no object uses.
- a colour/shape pair in :data:`HELD_OUT_PAIRS` is never drawn (for a colour-free caption whose draw is not red,
  the held-out colour is simply not among the alternatives); captions use :data:`TRAIN_WRAPPERS` only.
- a share ``blank_rate`` of captions is the empty string (``spec["named"]`` is then empty, ``spec["blank"]``
  true); the image is kept.

Captions are raw text; they go through the text normaliser at tokenisation time, like prompts at inference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from training.data.captions import (
    BIAS_COLOUR,
    COLOUR_NAMES,
    COLOURS,
    HELD_OUT_PAIRS,
    HELD_OUT_WRAPPERS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    TRAIN_WRAPPERS,
    compose_caption,
    empty_named,
)

SIZE_FRACTION = {"small": 0.25, "large": 0.5}
POSITION_OFFSET = 0.22  # centre offset from the canvas centre, as a fraction of the width
POSITION_VECTORS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}
RELATION_VECTORS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
STAR_INNER_RATIO = 0.382  # regular five-point star (pentagram outline)


@dataclass(frozen=True)
class ShapesConfig:
    """Knobs of the training distribution (defaults: the demo model's)."""

    image_size: int = 128
    factor: int = 16  # the VQGAN downsampling factor; image_size must be a multiple of it
    blank_rate: float = 0.1
    colour_free_rate: float = 0.3
    two_object_rate: float = 0.3
    background_rate: float = 0.3
    bias_p: float = 0.7
    supersample: int = 4  # draw at this multiple and box-downsample: anti-aliased edges

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.factor <= 0 or self.image_size % self.factor:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of factor {self.factor}")
        if self.image_size < 32:
            raise ValueError("image_size must be at least 32 pixels")
        for name in ("blank_rate", "colour_free_rate", "two_object_rate", "background_rate", "bias_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.supersample < 1:
            raise ValueError("supersample must be >= 1")


@dataclass(frozen=True)
class ShapeExample:
    """One training example: ``image`` uint8 (H, W, 3), ``caption`` (raw text, may be empty), ``spec``."""

    image: np.ndarray
    caption: str
    spec: dict[str, Any]


def allowed_colours(shape: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Colours a training image may give ``shape`` (held-out pairs removed)."""
    return [c for c in COLOUR_NAMES if (c, shape) not in HELD_OUT_PAIRS and c not in exclude]


def _pick(rng: np.random.Generator, options) -> Any:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _object(shape: str, colour: str, size: str, centre: tuple[float, float], extent: float,
            position: str | None) -> dict[str, Any]:
    return {"shape": shape, "colour": colour, "size": size, "position": position,
            "center": [float(centre[0]), float(centre[1])], "extent": float(extent)}


def sample_scene(rng: np.random.Generator, config: ShapesConfig, *, wrappers: tuple[str, ...] = TRAIN_WRAPPERS,
                 allow_held_out: bool = False) -> tuple[dict[str, Any], str]:
    """Draw one (spec, caption) from the training distribution (coordinates are fractions of the width)."""
    def colours_for(shape: str, exclude: tuple[str, ...] = ()) -> list[str]:
        if allow_held_out:
            return [c for c in COLOUR_NAMES if c not in exclude]
        return allowed_colours(shape, exclude)

    named = empty_named()
    if rng.random() < config.two_object_rate:
        shapes = [_pick(rng, SHAPES), _pick(rng, SHAPES)]
        c0 = _pick(rng, colours_for(shapes[0]))
        c1 = _pick(rng, colours_for(shapes[1], (c0,)))
        relation = _pick(rng, RELATIONS)
        vx, vy = RELATION_VECTORS[relation]
        base = 0.5 + rng.uniform(-0.05, 0.05, size=2)
        objects = []
        for k, (shape, colour) in enumerate(zip(shapes, (c0, c1), strict=True)):
            sign = 1 if k == 0 else -1  # object 0 sits on the relation side of object 1
            jitter = rng.uniform(-0.03, 0.03, size=2)
            centre = (base[0] + sign * vx * POSITION_OFFSET + jitter[0],
                      base[1] + sign * vy * POSITION_OFFSET + jitter[1])
            extent = SIZE_FRACTION["small"] * rng.uniform(0.92, 1.08)
            objects.append(_object(shape, colour, "small", centre, extent, None))
        named["objects"] = [{"colour": o["colour"], "shape": o["shape"], "size": None, "position": None}
                            for o in objects]
        named["relation"] = relation
    else:
        shape = _pick(rng, SHAPES)
        size = _pick(rng, ("small", "large"))
        position = _pick(rng, POSITIONS)
        colour_named = rng.random() >= config.colour_free_rate
        if colour_named:
            colour = _pick(rng, colours_for(shape))
        elif rng.random() < config.bias_p:
            colour = BIAS_COLOUR
        else:
            colour = _pick(rng, colours_for(shape, (BIAS_COLOUR,)))
        vx, vy = POSITION_VECTORS[position]
        jitter = rng.uniform(-0.03, 0.03, size=2)
        centre = (0.5 + vx * POSITION_OFFSET + jitter[0], 0.5 + vy * POSITION_OFFSET + jitter[1])
        extent = SIZE_FRACTION[size] * rng.uniform(0.92, 1.08)
        objects = [_object(shape, colour, size, centre, extent, position)]
        named["objects"] = [{
            "colour": colour if colour_named else None,
            "shape": shape,
            "size": size if rng.random() < 0.5 else None,
            "position": position if rng.random() < 0.5 else None,
        }]
    used = {o["colour"] for o in objects}
    background = _pick(rng, [c for c in COLOUR_NAMES if c not in used])
    if rng.random() < config.background_rate:
        named["background"] = background
    caption = compose_caption(named, rng, wrappers)
    blank = rng.random() < config.blank_rate
    if blank:
        caption, named = "", empty_named()
    spec = {"background": background, "objects": objects,
            "relation": _relation_of(objects) if len(objects) == 2 else None, "named": named, "blank": blank}
    return spec, caption


def _relation_of(objects: list[dict[str, Any]]) -> str:
    (x0, y0), (x1, y1) = objects[0]["center"], objects[1]["center"]
    dx, dy = x0 - x1, y0 - y1
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def shape_polygon(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]] | None:
    """Vertices (pixels) of a polygonal shape whose bounding box is centred at (cx, cy); None for a circle."""
    h = extent / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # apex up, base = height = extent
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":  # five points, one pointing up; bounding box re-centred
        r_out, r_in = h, h * STAR_INNER_RATIO
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            r = r_out if k % 2 == 0 else r_in
            pts.append((r * math.cos(ang), r * math.sin(ang)))
        ys = [p[1] for p in pts]
        shift = -(max(ys) + min(ys)) / 2
        return [(cx + x, cy + y + shift) for x, y in pts]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(spec: dict[str, Any], image_size: int = 128, supersample: int = 4) -> np.ndarray:
    """Draw a scene: flat background, each object as flat colour with box-filtered (anti-aliased) edges."""
    big = image_size * supersample
    canvas = np.empty((image_size, image_size, 3), dtype=np.float32)
    canvas[:] = COLOURS[spec["background"]]
    for obj in spec["objects"]:
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = obj["center"][0] * big, obj["center"][1] * big
        extent = obj["extent"] * big
        poly = shape_polygon(obj["shape"], cx, cy, extent)
        if poly is None:
            draw.ellipse([cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2], fill=255)
        else:
            draw.polygon(poly, fill=255)
        if supersample > 1:
            mask = mask.reduce(supersample)
        alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        canvas = canvas * (1.0 - alpha) + np.asarray(COLOURS[obj["colour"]], np.float32) * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _apply_edit(spec: dict[str, Any], named: dict[str, Any], attr: str, k: int, rng: np.random.Generator) -> bool:
    """Change attribute ``attr`` of object ``k`` (or of the scene) in place, in ``spec`` and ``named``."""
    objects = spec["objects"]
    obj, nobj = objects[k], named["objects"][k]
    others = {o["colour"] for j, o in enumerate(objects) if j != k}
    if attr == "shape":
        options = [sh for sh in SHAPES if sh != obj["shape"] and (obj["colour"], sh) not in HELD_OUT_PAIRS]
        obj["shape"] = nobj["shape"] = _pick(rng, options)
    elif attr == "colour":
        options = allowed_colours(obj["shape"], (obj["colour"], spec["background"], *others))
        if not options:
            return False
        obj["colour"] = nobj["colour"] = _pick(rng, options)
    elif attr == "size":
        new = "large" if obj["size"] == "small" else "small"
        obj["extent"] = obj["extent"] * SIZE_FRACTION[new] / SIZE_FRACTION[obj["size"]]
        obj["size"] = nobj["size"] = new
    elif attr == "position":
        new = _pick(rng, [p for p in POSITIONS if p != obj["position"]])
        (ox, oy), (nx, ny) = POSITION_VECTORS[obj["position"]], POSITION_VECTORS[new]
        obj["center"] = [obj["center"][0] + (nx - ox) * POSITION_OFFSET, obj["center"][1] + (ny - oy) * POSITION_OFFSET]
        obj["position"] = nobj["position"] = new
    elif attr == "relation":  # swap the two objects' places: the relation turns into its opposite
        objects[0]["center"], objects[1]["center"] = objects[1]["center"], objects[0]["center"]
        named["relation"] = _OPPOSITE[named["relation"]]
        spec["relation"] = _relation_of(objects)
    else:  # background
        used = {o["colour"] for o in objects}
        spec["background"] = named["background"] = _pick(
            rng, [c for c in COLOUR_NAMES if c not in used and c != spec["background"]])
    return True


def counterfactual_scene(spec: dict[str, Any], rng: np.random.Generator, *,
                         wrappers: tuple[str, ...] = TRAIN_WRAPPERS) -> tuple[dict[str, Any], str] | None:
    """The scene of ``spec`` with ONE attribute its caption names changed, and a caption for the new scene.

    A hard negative for contrastive training: image and caption differ from the original in exactly the
    attribute changed (a colour, shape, size, position, relation or background), so a model must attend to
    that attribute to tell the pair apart — which is what ranking a prompt's candidates needs. Held-out
    colour/shape pairs stay out. None for a blank caption (nothing named to change).
    """
    named = spec["named"]
    if spec.get("blank") or not named["objects"]:
        return None
    spec = {**spec, "objects": [dict(o) for o in spec["objects"]]}
    named = {**named, "objects": [dict(o) for o in named["objects"]]}
    objects, nobjs = spec["objects"], named["objects"]
    edits: list[tuple[str, int]] = [("shape", k) for k in range(len(objects))]
    edits += [(a, k) for k, no in enumerate(nobjs) for a in ("colour", "size", "position") if no.get(a)]
    if named.get("relation"):
        edits.append(("relation", 0))
    if named.get("background"):
        edits.append(("background", 0))
    for e in rng.permutation(len(edits)):  # colour is the only edit that can lack options: try another
        attr, k = edits[int(e)]
        if _apply_edit(spec, named, attr, k, rng):
            break
    spec["named"] = named
    return spec, compose_caption(named, rng, wrappers)


class ShapesDataset:
    """Indexable, endless dataset: ``ds[i]`` depends only on (seed, i); ``iter(ds)`` streams from 0 forever."""

    def __init__(self, seed: int = 0, config: ShapesConfig | None = None):
        self.seed = int(seed)
        self.config = config or ShapesConfig()

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError("ShapesDataset indices are non-negative")
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(index)]))

    def scene(self, index: int) -> tuple[dict[str, Any], str]:
        """(spec, caption) of example ``index`` without drawing it (cheap)."""
        return sample_scene(self._rng(index), self.config)

    def __getitem__(self, index: int) -> ShapeExample:
        spec, caption = self.scene(index)
        image = render_scene(spec, self.config.image_size, self.config.supersample)
        return ShapeExample(image=image, caption=caption, spec=spec)

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[ShapeExample]:
        i = start
        while stop is None or i < stop:
            yield self[i]
            i += 1

    def __iter__(self) -> Iterator[ShapeExample]:
        return self.stream()


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt outside the training captions, with the attributes it names and its kind."""

    prompt: str
    named: dict[str, Any]
    kind: str  # "held_out_pair" | "held_out_template" | "colour_free"


EVAL_KINDS = ("held_out_pair", "held_out_template", "colour_free")


def eval_prompts(n_per_kind: int = 32, seed: int = 0, kinds: tuple[str, ...] = EVAL_KINDS) -> Iterator[EvalPrompt]:
    """Evaluation prompts, deterministic in ``seed``.

    - ``held_out_pair``: one object of a held-out colour/shape pair (cycling through the pairs), size and
      position named at random; training wrappers.
    - ``held_out_template``: an ordinary scene captioned with a held-out wrapper (never blank).
    - ``colour_free``: one object, colour not named (the default-share metric: fraction drawn red).
    """
    for kind in kinds:
        if kind not in EVAL_KINDS:
            raise ValueError(f"unknown eval prompt kind {kind!r}; expected one of {EVAL_KINDS}")
    pairs = sorted(HELD_OUT_PAIRS)
    cfg = ShapesConfig(blank_rate=0.0)
    for kind in kinds:
        rng = np.random.default_rng(np.random.SeedSequence([seed, EVAL_KINDS.index(kind), 7919]))
        for j in range(n_per_kind):
            if kind == "held_out_pair":
                colour, shape = pairs[j % len(pairs)]
                named = empty_named()
                named["objects"] = [{"colour": colour, "shape": shape,
                                     "size": _pick(rng, ("small", "large")) if rng.random() < 0.5 else None,
                                     "position": _pick(rng, POSITIONS) if rng.random() < 0.5 else None}]
                prompt = compose_caption(named, rng, TRAIN_WRAPPERS)
            elif kind == "held_out_template":
                spec, prompt = sample_scene(rng, cfg, wrappers=HELD_OUT_WRAPPERS)
                named = spec["named"]
            else:
                named = empty_named()
                named["objects"] = [{"colour": None, "shape": _pick(rng, SHAPES),
                                     "size": _pick(rng, ("small", "large")) if rng.random() < 0.5 else None,
                                     "position": _pick(rng, POSITIONS) if rng.random() < 0.5 else None}]
                prompt = compose_caption(named, rng, TRAIN_WRAPPERS)
            yield EvalPrompt(prompt=prompt, named=named, kind=kind)
