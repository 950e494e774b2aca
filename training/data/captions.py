"""Vocabulary, caption templates and the caption parser of the procedural shapes dataset.

The vocabulary is fixed by ``specs/shapes-dataset.md``; evaluation depends on it. A caption *names* a subset of
a scene's attributes; :func:`parse_prompt` recovers exactly that subset (the inverse of the templates, tolerant
of paraphrases), in the same "named attributes" form the dataset stores in ``spec["named"]``::

    {"objects": [{"colour": "red" | None, "shape": "circle", "size": "small" | None, "position": "left" | None}],
     "relation": None | "left of" | "right of" | "above" | "below",   # objects[0] relative to objects[1]
     "background": None | "white"}

Held out of training (documented here; evaluation reports them separately):

- colour/shape pairs :data:`HELD_OUT_PAIRS`: never drawn in a training image, named or not;
- wrapper templates :data:`HELD_OUT_WRAPPERS`: never used for a training caption.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 210, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

BIAS_COLOUR = "red"
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "star"), ("purple", "triangle"), ("yellow", "square"), ("blue", "circle")}
)

# "{x}" is the object phrase (one object, with position/background) or the two-object phrase.
TRAIN_WRAPPERS: tuple[str, ...] = ("{x}", "a picture of {x}", "an image showing {x}", "a drawing of {x}")
HELD_OUT_WRAPPERS: tuple[str, ...] = ("an illustration of {x}", "a simple scene with {x}")

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
BACKGROUND_PHRASES: tuple[str, ...] = ("on a {c} background", "against a {c} background")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def noun_phrase(shape: str, colour: str | None = None, size: str | None = None) -> str:
    """``a [size] [colour] shape`` with the right article."""
    words = [w for w in (size, colour, shape) if w]
    return f"{article(words[0])} {' '.join(words)}"


def empty_named() -> dict[str, Any]:
    return {"objects": [], "relation": None, "background": None}


def compose_caption(named: dict[str, Any], rng: np.random.Generator, wrappers: tuple[str, ...] = TRAIN_WRAPPERS) -> str:
    """A caption that names exactly the attributes in ``named`` (paraphrase chosen with ``rng``)."""
    objs = named["objects"]
    if len(objs) == 1:
        o = objs[0]
        x = noun_phrase(o["shape"], o.get("colour"), o.get("size"))
        if o.get("position"):
            opts = POSITION_PHRASES[o["position"]]
            x += " " + opts[int(rng.integers(len(opts)))]
    elif len(objs) == 2:
        a, b = objs
        opts = RELATION_PHRASES[named["relation"]]
        x = f"{noun_phrase(a['shape'], a.get('colour'), a.get('size'))} {opts[int(rng.integers(len(opts)))]} "
        x += noun_phrase(b["shape"], b.get("colour"), b.get("size"))
    else:
        raise ValueError("a caption names one or two objects")
    if named.get("background"):
        x += " " + BACKGROUND_PHRASES[int(rng.integers(len(BACKGROUND_PHRASES)))].format(c=named["background"])
    return wrappers[int(rng.integers(len(wrappers)))].format(x=x)


# --------------------------------------------------------------------------------------------- parser

_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
               "huge": "large"}
_SHAPE_WORDS = {"circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle", "dot": "circle",
                "square": "square", "squares": "square", "box": "square",
                "triangle": "triangle", "triangles": "triangle", "star": "star", "stars": "star"}
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                   "lower": "bottom", "center": "center", "centre": "center", "middle": "center"}
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "over": "above", "top": "above",
                   "below": "below", "under": "below", "beneath": "below", "underneath": "below"}


def parse_prompt(prompt: str) -> dict[str, Any]:
    """Recover the attributes a prompt names (inverse of the caption templates, robust to paraphrases).

    Works on raw or normalised text. Colour words directly before ``background`` name the background; colour
    and size words before a shape word belong to that shape; with two shapes, the words between them give the
    relation; with one shape, a position word anywhere gives its position.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    named = empty_named()
    # background: "<colour> background" (also "background of <colour>")
    keep = [True] * len(words)
    for i, w in enumerate(words):
        if w in ("background", "backdrop"):
            if i > 0 and words[i - 1] in COLOURS:
                named["background"] = words[i - 1]
                keep[i - 1] = keep[i] = False
            elif i + 2 < len(words) and words[i + 1] == "of" and words[i + 2] in COLOURS:
                named["background"] = words[i + 2]
                keep[i] = keep[i + 1] = keep[i + 2] = False
    words = [w for w, k in zip(words, keep, strict=True) if k]

    objects: list[dict[str, Any]] = []
    shape_at: list[int] = []
    pending: dict[str, Any] = {"colour": None, "size": None}
    for i, w in enumerate(words):
        if w in COLOURS:
            pending["colour"] = w
        elif w in _SIZE_WORDS:
            pending["size"] = _SIZE_WORDS[w]
        elif w in _SHAPE_WORDS:
            objects.append({"colour": pending["colour"], "shape": _SHAPE_WORDS[w], "size": pending["size"],
                            "position": None})
            shape_at.append(i)
            pending = {"colour": None, "size": None}
            if len(objects) == 2:
                break
    if len(objects) == 2:
        between = words[shape_at[0] + 1 : shape_at[1]]
        for w in between:
            if w in _RELATION_WORDS:
                named["relation"] = _RELATION_WORDS[w]
                break
    elif len(objects) == 1:
        for w in words[shape_at[0] + 1 :] + words[: shape_at[0]]:
            if w in _POSITION_WORDS:
                objects[0]["position"] = _POSITION_WORDS[w]
                break
    named["objects"] = objects
    return named
