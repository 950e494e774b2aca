"""The analytic detector: near-perfect on clean dataset images, robust to blur and noise; fidelity report."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from training.data.captions import compose_caption
from training.data.shapes import ShapesConfig, ShapesDataset, render_scene
from training.detect import detect, fidelity, matches

N = 300


def _degrade(img: np.ndarray, rng: np.random.Generator, sigma: float = 10.0, blur: float = 1.2) -> np.ndarray:
    x = ndimage.gaussian_filter(img.astype(np.float32), sigma=(blur, blur, 0))
    return np.clip(np.rint(x + rng.normal(0.0, sigma, x.shape)), 0, 255).astype(np.uint8)


def _accuracy(examples, transform):
    hits: dict[str, list[bool]] = {}
    for ex in examples:
        det = detect(transform(ex.image))
        hits.setdefault("background", []).append(det["background"] == ex.spec["background"])
        hits.setdefault("count", []).append(len(det["objects"]) == len(ex.spec["objects"]))
        for o in ex.spec["objects"]:
            near = min(det["objects"], key=lambda d, o=o: np.hypot(d["center"][0] - o["center"][0],
                                                                    d["center"][1] - o["center"][1]))
            for a in ("colour", "shape", "size") + (("position",) if o["position"] else ()):
                hits.setdefault(a, []).append(near[a] == o[a])
        if len(ex.spec["objects"]) == 2:
            named = {"objects": [{"colour": o["colour"], "shape": o["shape"]} for o in ex.spec["objects"]],
                     "relation": ex.spec["relation"]}
            hits.setdefault("relation", []).append(matches(det, named)["relation"])
    return {k: float(np.mean(v)) for k, v in hits.items()}


@pytest.fixture(scope="module")
def examples():
    ds = ShapesDataset(seed=21, config=ShapesConfig(blank_rate=0.0))
    return [ds[i] for i in range(N)]


def test_detector_clean(examples):
    acc = _accuracy(examples, lambda im: im)
    assert set(acc) >= {"background", "count", "colour", "shape", "size", "position", "relation"}
    assert all(v >= 0.99 for v in acc.values()), acc


def test_detector_noise_and_blur(examples):
    rng = np.random.default_rng(0)
    acc = _accuracy(examples, lambda im: _degrade(im, rng))
    assert all(v >= 0.95 for v in acc.values()), acc


def test_detector_rejects_bad_input():
    with pytest.raises(ValueError, match="RGB"):
        detect(np.zeros((8, 8), np.uint8))


def test_fidelity_report_and_default_share():
    rng = np.random.default_rng(3)
    images, prompts = [], []
    # 8 colour-free circles: 6 drawn red → default share 0.75; one prompt deliberately mismatched (wrong shape)
    for k in range(8):
        colour = "red" if k < 6 else "blue"
        spec = {"background": "white", "objects": [{"shape": "circle", "colour": colour, "size": "large",
                "position": "center", "center": [0.5, 0.5], "extent": 0.5}], "relation": None}
        images.append(render_scene(spec, 64))
        prompts.append("a circle" if k else "a square")
    named = {"objects": [{"colour": "green", "shape": "triangle", "size": "small", "position": "left"}],
             "relation": None, "background": "black"}
    spec = {"background": "black", "objects": [{"shape": "triangle", "colour": "green", "size": "small",
            "position": "left", "center": [0.28, 0.5], "extent": 0.25}], "relation": None}
    images.append(render_scene(spec, 128))
    prompts.append(compose_caption(named, rng))
    rep = fidelity(images, prompts)
    assert rep["n"] == 9 and rep["n_colour_free"] == 8
    assert rep["default_share"] == pytest.approx(6 / 8)
    assert rep["fidelity"] == pytest.approx(8 / 9)
    assert rep["per_attribute"]["shape"] == pytest.approx(8 / 9)
    assert rep["per_attribute"]["background"] == 1.0 and rep["per_attribute"]["position"] == 1.0
    assert not rep["items"][0]["ok"] and rep["items"][-1]["ok"]
    with pytest.raises(ValueError):
        fidelity(images, prompts[:-1])


def test_matches_count_and_missing_objects():
    empty = {"background": "white", "objects": []}
    named = {"objects": [{"colour": "red", "shape": "star", "size": None, "position": None}], "relation": None,
             "background": "white"}
    m = matches(empty, named)
    assert m == {"count": False, "colour": False, "shape": False, "background": True}
