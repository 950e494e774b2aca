"""The shipped demo checkpoint (engine/assets/demo): the engine's default, small enough, and as good as measured.

It is a preview below the training issue's quality bars (README, ``checkpoint.json``). The floors below guard the
level it was measured at (2026-12-06, the 6-decoder-layer DalleBart trained with prefix noise, sampled at
temperature 0.7; fixed prompt set, evaluation seeds 0, 1, 2: top-ranked colour 100 / 100 / 94%, shape
67 / 62.5 / 71%, position 100 / 83 / 100%, everything 58 / 46 / 62.5%; the 3-layer model before it: colour
94 / 100 / 100%, shape 54 / 58 / 62.5%, position 86 / 67 / 85%, everything 50 / 54 / 58%), with room for the
numeric differences between CPUs. The issue's
bars are a strict xfail: when a model that meets them is installed, that test fails until its marker is removed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from engine.api import GenerationRequest
from engine.checkpoint import DEFAULT_CHECKPOINT
from engine.pipeline import load_pipeline
from training.evaluate import evaluate_pipeline

DEMO = Path(__file__).resolve().parents[2] / "engine" / "assets" / "demo"
KINDS = ("one_object", "colour_free", "held_out_pair")


@pytest.fixture(scope="module")
def demo_pipeline():
    return load_pipeline(buckets=(9, 18))


@pytest.fixture(scope="module")
def demo_report(demo_pipeline):
    """24 prompts (8 each of :data:`KINDS`) x 9 CLIP-ranked candidates, evaluation seed 0."""
    return evaluate_pipeline(demo_pipeline, n_per_kind=8, candidates=9, seed=0, psnr_images=0, kinds=KINDS)


def test_demo_checkpoint_is_shipped_as_the_engine_default_within_the_size_budget():
    assert DEFAULT_CHECKPOINT.resolve() == DEMO.resolve()
    files = [f for f in DEMO.rglob("*") if f.is_file()]
    assert not [f for f in DEMO.rglob("*") if f.is_symlink()], "the shipped checkpoint must not link outside itself"
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    meta = json.loads((DEMO / "checkpoint.json").read_text())
    assert meta["sampling"] == {"condition_scale": 2.0, "top_k": 16, "temperature": 0.7}
    assert "PREVIEW" in meta["status"]  # until a model meets the bars, the artefact says what it is


def test_demo_checkpoint_generates_ranked_images_with_safety_scores(demo_pipeline):
    assert demo_pipeline.checkpoint_id == json.loads((DEMO / "checkpoint.json").read_text())["id"]
    result = demo_pipeline.generate([GenerationRequest("a large blue square at the top", n=3, seed=7)])[0]
    assert sorted(im.rank for im in result.images) == [0, 1, 2]
    for im in result.images:
        assert Image.open(io.BytesIO(im.png)).size == (128, 128)
        assert set(im.safety) == {"demo-black-star"}
        assert len(im.tokens) == 256


def test_demo_checkpoint_keeps_its_measured_quality(demo_report):
    top = demo_report["top"]
    assert demo_report["n_prompts"] == 24 and demo_report["n_images"] == 216
    # floors about two standard deviations (24 prompts) under the measured means, so another CPU's rounding
    # (which changes the sampled tokens like another seed does) passes while a broken model does not
    assert top["per_attribute"]["colour"] >= 0.85
    assert top["per_attribute"]["position"] >= 0.6  # only 12-20 of the 24 prompts name a position: a wide spread
    assert top["per_attribute"]["shape"] >= 0.25
    assert top["fidelity"] >= 0.2
    # the injected default bias (70% red for colour-free prompts) shows: the feedback loop has something to remove
    assert 0.5 <= demo_report["default_share"]["value"] <= 1.0


@pytest.mark.xfail(strict=True, reason="the shipped preview is below the demo bars (training issue); see README")
def test_demo_checkpoint_meets_the_demo_bars(demo_report):
    top = demo_report["top"]
    assert top["per_attribute"]["colour"] >= 0.95
    assert top["per_attribute"]["shape"] >= 0.90
    assert top["per_attribute"]["position"] >= 0.85
    assert top["per_kind"]["held_out_pair"]["fidelity"] >= 0.80
