"""Counterfactual pairs from colour complaints: the object repainted in pixels and re-encoded, only its patches'
codes changed, only for 👎s whose reason is bias on prompts naming no colour, added as DPO pairs and liked
examples, cached for a resumed run."""

from __future__ import annotations

import numpy as np
import pytest

from training.counterfactual import (
    build_counterfactuals,
    is_colour_complaint,
    new_colours,
    recolour,
    with_counterfactuals,
)
from training.data.captions import COLOURS
from training.data.shapes import HELD_OUT_PAIRS, render_scene
from training.detect import detect
from training.encode import Encoder, load_vqgan
from training.preference import PreferenceData

DEMO_VQGAN = "engine/assets/demo/vqgan"


def scene(shape: str, colour: str, background: str = "white", size: str = "large") -> np.ndarray:
    obj = {"shape": shape, "colour": colour, "size": size, "center": (0.5, 0.5),
           "extent": 0.5 if size == "large" else 0.25}
    return render_scene({"background": background, "objects": [obj]})


def test_recolour_repaints_the_object_and_nothing_else():
    image = scene("star", "red", "blue")
    out = recolour(image, "red", "yellow")
    before, after = detect(image), detect(out)
    assert after["background"] == "blue" and after["objects"][0]["colour"] == "yellow"
    assert after["objects"][0]["shape"] == before["objects"][0]["shape"] == "star"
    far = np.all(np.abs(image.astype(int) - np.asarray(COLOURS["blue"])) < 3, axis=-1)  # pure background
    assert np.array_equal(out[far], image[far])
    # an edge pixel half red, half blue becomes half yellow, half blue
    edge = np.argwhere(~far & np.all(np.abs(image.astype(int) - np.asarray(COLOURS["red"])) > 30, axis=-1))[0]
    old, new = image[tuple(edge)].astype(float), out[tuple(edge)].astype(float)
    a = (old - COLOURS["blue"]) @ (np.subtract(COLOURS["red"], COLOURS["blue"])) \
        / np.sum(np.subtract(COLOURS["red"], COLOURS["blue"]) ** 2)
    assert 0.05 < a < 0.95
    assert np.allclose(new, np.asarray(COLOURS["blue"]) + a * np.subtract(COLOURS["yellow"], COLOURS["blue"]),
                       atol=3)


def test_new_colours_leave_out_the_complaint_the_background_and_held_out_pairs():
    rng = np.random.default_rng(0)
    for shape in ("circle", "square", "triangle", "star"):
        got = new_colours(shape, "red", "white", 8, rng)
        assert got and len(set(got)) == len(got)
        assert "red" not in got and "white" not in got
        assert not {(c, shape) for c in got} & set(HELD_OUT_PAIRS)
    assert len(new_colours("circle", "red", "white", 2, rng)) == 2


@pytest.mark.parametrize(("prompt", "reasons", "expected"), [
    ("a circle", ["bias"], True),
    ("a large star at the top", ["quality", "bias"], True),
    ("a circle", ["quality"], False),  # disliked for something else
    ("a circle", [], False),  # no reason given: the colour may not be what was wrong
    ("a red circle", ["bias"], False),  # the colour was asked for
    ("a circle on a green background", ["bias"], True),  # a background colour is not the object's
    ("a circle left of a square", ["bias"], False),  # two objects: which one?
])
def test_only_colour_complaints_on_prompts_naming_no_colour_count(prompt, reasons, expected):
    assert is_colour_complaint(prompt, reasons) is expected


@pytest.fixture(scope="module")
def red_tokens() -> np.ndarray:
    """Six red shapes on various backgrounds, as the demo VQGAN's codes (what the model would have sampled)."""
    images = [scene(s, "red", bg, size) for s, bg, size in (("circle", "white", "large"), ("square", "blue", "large"),
                                                          ("star", "yellow", "large"), ("triangle", "white", "large"),
                                                          ("circle", "black", "small"), ("square", "green", "small"))]
    model, _, params = load_vqgan(DEMO_VQGAN)
    return np.asarray(Encoder(model, params, batch_size=8)(np.stack(images)), np.int32)


def test_counterfactuals_repaint_only_the_objects_codes(red_tokens):
    prompts = ["a circle", "a square", "a star", "a red triangle", "a small circle", "a small square"]
    reasons = [["bias"], ["bias"], ["bias"], ["bias"], ["quality"], ["bias"]]
    cf = build_counterfactuals(prompts, red_tokens, reasons, DEMO_VQGAN, per_image=2, seed=0)
    assert cf.skipped["not a colour complaint"] == 2  # the red triangle was asked for; the circle was "quality"
    assert set(cf.source.tolist()) <= {0, 1, 2, 5} and len(cf.source) >= 6
    assert len(cf.source) + cf.skipped["round trip changed it"] + 2 * cf.skipped["no object"] == 8
    np.testing.assert_array_equal(cf.rejected, red_tokens[cf.source])
    assert all(old == "red" and new != "red" for old, new in cf.colours)
    changed = (cf.chosen != cf.rejected).sum(1)
    assert np.all(changed > 0) and np.all(changed < 0.6 * red_tokens.shape[1])  # the object, not the background
    from training.counterfactual import Repainter

    for image, (_, new) in zip(Repainter(DEMO_VQGAN).decode(cf.chosen), cf.colours, strict=True):
        assert detect(image)["objects"][0]["colour"] == new


def test_counterfactual_pairs_join_the_dpo_pairs_and_are_cached(red_tokens, tmp_path, monkeypatch):
    n = len(red_tokens)
    unpaired = {"input_ids": np.arange(n * 4, dtype=np.int32).reshape(n, 4),
                "attention_mask": np.ones((n, 4), np.int32), "labels": red_tokens,
                "desirable": np.asarray([0, 0, 1, 0, 0, 0], np.float32),
                "weight": np.asarray([1, 2, 1, 3, 1, 1], np.float32), "uncontested": np.zeros(n, np.float32)}
    prompts = ["a circle", "a square", "a star", "a triangle", "a small circle", "a small square"]
    reasons = [["bias"], ["bias"], [], ["quality"], ["bias"], []]

    def data() -> PreferenceData:
        return PreferenceData({k: v.copy() for k, v in unpaired.items()}, {}, "sha", prompts, reasons)

    got, summary = with_counterfactuals(data(), DEMO_VQGAN, 1, tmp_path)
    pairs = got.pairs
    sources = [int(np.flatnonzero((red_tokens == r).all(1))[0]) for r in pairs["p_rejected"]]
    assert set(sources) <= {0, 1, 4} and len(sources) == summary["pairs"] >= 2  # disliked, for bias, one colour each
    np.testing.assert_array_equal(pairs["p_input_ids"], unpaired["input_ids"][sources])
    np.testing.assert_array_equal(pairs["p_weight"], unpaired["weight"][sources])
    # the repainted images are liked examples too, after the stored ones
    u = got.unpaired
    assert len(u["labels"]) == n + len(sources) and u["desirable"][n:].tolist() == [1.0] * len(sources)
    np.testing.assert_array_equal(u["labels"][n:], pairs["p_chosen"])
    np.testing.assert_array_equal(u["input_ids"][n:], unpaired["input_ids"][sources])
    assert got.prompts[n:] == [prompts[i] for i in sources] and len(got.reasons) == n + len(sources)
    assert got.content_sha256 != "sha"  # the parent's log-probs are cached under a hash that names the pairs

    import training.counterfactual as cfm

    def rebuilt(*args, **kwargs):
        raise RuntimeError("rebuilt instead of cached")

    monkeypatch.setattr(cfm, "build_counterfactuals", rebuilt)
    again, _ = with_counterfactuals(data(), DEMO_VQGAN, 1, tmp_path)
    np.testing.assert_array_equal(again.pairs["p_chosen"], pairs["p_chosen"])
    assert again.content_sha256 == got.content_sha256
    with pytest.raises(RuntimeError, match="rebuilt"):  # other settings are not served from that cache
        with_counterfactuals(data(), DEMO_VQGAN, 2, tmp_path)
