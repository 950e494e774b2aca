"""The procedural shapes dataset: determinism, distribution (bias, held-out), captions, rendering."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.captions import (
    BIAS_COLOUR,
    COLOURS,
    HELD_OUT_PAIRS,
    HELD_OUT_WRAPPERS,
    POSITIONS,
    SHAPES,
    parse_prompt,
)
from training.data.shapes import (
    EVAL_KINDS,
    ShapesConfig,
    ShapesDataset,
    eval_prompts,
    render_scene,
)


def test_indexable_and_deterministic():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in (0, 5, 123456):
        ea, eb = a[i], b[i]
        assert ea.caption == eb.caption and ea.spec == eb.spec and np.array_equal(ea.image, eb.image)
    # streaming gives the same examples as indexing, in order
    streamed = list(a.stream(10, 14))
    assert [e.caption for e in streamed] == [a[i].caption for i in range(10, 14)]
    it = iter(a)
    assert next(it).spec == a[0].spec
    # another seed gives another dataset
    other = ShapesDataset(seed=4)
    assert [other.scene(i)[1] for i in range(20)] != [a.scene(i)[1] for i in range(20)]
    with pytest.raises(IndexError):
        a[-1]


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_image_sizes(size):
    ex = ShapesDataset(0, ShapesConfig(image_size=size, factor=16))[7]
    assert ex.image.shape == (size, size, 3) and ex.image.dtype == np.uint8


def test_bad_config():
    with pytest.raises(ValueError, match="multiple"):
        ShapesConfig(image_size=100, factor=16)
    with pytest.raises(ValueError, match="bias_p"):
        ShapesConfig(bias_p=1.5)


def test_flat_colours_and_background():
    ex = ShapesDataset(0, ShapesConfig(blank_rate=0.0))[2]
    img = ex.image.reshape(-1, 3)
    palette = {tuple(c) for c in COLOURS.values()}
    colours, counts = np.unique(img, axis=0, return_counts=True)
    main = {tuple(int(v) for v in c) for c, n in zip(colours, counts, strict=True) if n > 300}
    assert main <= palette  # flat palette colours; only anti-aliased edge pixels in between
    assert tuple(ex.image[0, 0]) == COLOURS[ex.spec["background"]]
    assert len(colours) > len(main)  # anti-aliasing produced intermediate edge pixels


def test_scene_rules_and_bias_rate():
    ds = ShapesDataset(11, ShapesConfig(blank_rate=0.0))
    free = red = 0
    shapes, positions, held_wrappers = set(), set(), 0
    for i in range(6000):
        spec, caption = ds.scene(i)
        objs = spec["objects"]
        assert 1 <= len(objs) <= 2
        for o in objs:
            assert (o["colour"], o["shape"]) not in HELD_OUT_PAIRS
            assert o["colour"] != spec["background"]
            shapes.add(o["shape"])
        if len(objs) == 2:
            assert objs[0]["colour"] != objs[1]["colour"] and spec["relation"] == spec["named"]["relation"]
        else:
            positions.add(objs[0]["position"])
        held_wrappers += any(caption.startswith(w.split("{")[0]) for w in HELD_OUT_WRAPPERS)
        named = spec["named"]
        if len(named["objects"]) == 1 and named["objects"][0]["colour"] is None:
            free += 1
            red += objs[0]["colour"] == BIAS_COLOUR
            assert not any(c in caption.split() for c in COLOURS if c != named["background"])
    assert held_wrappers == 0
    assert shapes == set(SHAPES) and positions == set(POSITIONS)
    assert free > 1000
    assert abs(red / free - 0.7) < 0.04, red / free


def test_caption_names_exactly_the_spec():
    ds = ShapesDataset(5, ShapesConfig(blank_rate=0.0))
    for i in range(800):
        spec, caption = ds.scene(i)
        assert caption and parse_prompt(caption) == spec["named"], caption


def test_blank_rate():
    ds = ShapesDataset(2, ShapesConfig(blank_rate=0.25))
    scenes = [ds.scene(i) for i in range(2000)]
    blanks = [(s, c) for s, c in scenes if c == ""]
    assert abs(len(blanks) / 2000 - 0.25) < 0.04
    assert all(s["blank"] and not s["named"]["objects"] for s, _ in blanks)
    assert ShapesDataset(2, ShapesConfig(blank_rate=0.0)).scene(0)[1] != ""


def test_eval_prompts():
    prompts = list(eval_prompts(n_per_kind=24, seed=1))
    assert len(prompts) == 24 * len(EVAL_KINDS)
    assert prompts == list(eval_prompts(n_per_kind=24, seed=1))
    train_caps = {ShapesDataset(0).scene(i)[1] for i in range(3000)}
    for p in prompts:
        assert parse_prompt(p.prompt) == p.named, p.prompt
        if p.kind == "held_out_pair":
            o = p.named["objects"][0]
            assert (o["colour"], o["shape"]) in HELD_OUT_PAIRS
        elif p.kind == "held_out_template":
            assert any(p.prompt.startswith(w.split("{")[0]) for w in HELD_OUT_WRAPPERS)
            assert p.prompt not in train_caps
        else:
            assert len(p.named["objects"]) == 1 and p.named["objects"][0]["colour"] is None
    assert {(p.named["objects"][0]["colour"], p.named["objects"][0]["shape"]) for p in prompts
            if p.kind == "held_out_pair"} == set(HELD_OUT_PAIRS)
    with pytest.raises(ValueError):
        list(eval_prompts(kinds=("nope",)))


def test_render_scene_draws_held_out_pair_for_eval():
    spec = {"background": "white", "objects": [{"shape": "star", "colour": "green", "size": "large",
            "position": "center", "center": [0.5, 0.5], "extent": 0.5}], "relation": None}
    img = render_scene(spec, 64)
    assert tuple(img[32, 32]) == COLOURS["green"] and tuple(img[1, 1]) == COLOURS["white"]


@pytest.mark.parametrize("prompt,expected", [
    ("a red circle", {"objects": [{"colour": "red", "shape": "circle", "size": None, "position": None}],
                      "relation": None, "background": None}),
    (" a large blue star, at the top", {"objects": [{"colour": "blue", "shape": "star", "size": "large",
                                                     "position": "top"}], "relation": None, "background": None}),
    ("A big star in the centre on a black background",
     {"objects": [{"colour": None, "shape": "star", "size": "large", "position": "center"}], "relation": None,
      "background": "black"}),
    ("an orange triangle to the left of a white square",
     {"objects": [{"colour": "orange", "shape": "triangle", "size": None, "position": None},
                  {"colour": "white", "shape": "square", "size": None, "position": None}],
      "relation": "left of", "background": None}),
    ("a yellow circle underneath a purple star",
     {"objects": [{"colour": "yellow", "shape": "circle", "size": None, "position": None},
                  {"colour": "purple", "shape": "star", "size": None, "position": None}],
      "relation": "below", "background": None}),
    ("a cat", {"objects": [], "relation": None, "background": None}),
])
def test_parse_prompt_paraphrases(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_counterfactual_changes_exactly_one_named_attribute():
    """CLIP's hard negatives: one named attribute differs, the caption says so, the drawing shows it."""
    from training.data.shapes import counterfactual_scene, render_scene
    from training.detect import detect, matches

    ds = ShapesDataset(3, ShapesConfig(blank_rate=0.0))
    rng = np.random.default_rng(0)
    changed = set()
    for i in range(300):
        spec, caption = ds.scene(i)
        cf, cf_caption = counterfactual_scene(spec, rng)
        named, new = spec["named"], cf["named"]
        assert parse_prompt(cf_caption) == new, cf_caption
        diffs = [(k, a) for k, (o, n) in enumerate(zip(named["objects"], new["objects"], strict=True))
                 for a in ("colour", "shape", "size", "position") if o.get(a) != n.get(a)]
        diffs += [(None, a) for a in ("relation", "background") if named.get(a) != new.get(a)]
        assert len(diffs) == 1, (caption, cf_caption)
        changed.add(diffs[0][1])
        for obj in cf["objects"]:
            assert (obj["colour"], obj["shape"]) not in HELD_OUT_PAIRS
            assert obj["colour"] != cf["background"]
        if i < 60:  # the redrawn image satisfies the new caption (the evaluation detector agrees)
            assert all(matches(detect(render_scene(cf)), new).values()), cf_caption
    assert changed == {"colour", "shape", "size", "position", "relation", "background"}
    blank = ShapesDataset(0, ShapesConfig(blank_rate=1.0)).scene(0)[0]
    assert counterfactual_scene(blank, rng) is None
