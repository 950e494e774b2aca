"""The shipped demo model (``engine/assets/demo``): a fresh clone with no network makes images that match their
prompts. A quality test of the real artefact, kept fast: 4 prompts of each evaluation kind (20 prompts, never in
the training captions), 9 candidates each, CLIP-ranked, one compile per batch bucket."""

from __future__ import annotations

import json

import pytest

from engine.pipeline import DEFAULT_CHECKPOINT, load_pipeline
from training.evaluate import evaluate_pipeline

MAX_BYTES = 40 * 2**20


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline(None, buckets=(9, 36))  # the engine's default checkpoint is the demo


@pytest.fixture(scope="module")
def report(pipeline):
    return evaluate_pipeline(pipeline, n_per_kind=4, candidates=9, seed=1, vqgan_dir=DEFAULT_CHECKPOINT / "vqgan",
                             psnr_images=16)


def test_the_demo_is_the_default_checkpoint_and_small(pipeline):
    meta = json.loads((DEFAULT_CHECKPOINT / "checkpoint.json").read_text())
    assert pipeline.checkpoint_id == meta["id"] and meta["id"].startswith("shapes-demo")
    total = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MiB"
    assert not list(DEFAULT_CHECKPOINT.rglob("*.orbax*")) and not (DEFAULT_CHECKPOINT / "tokens").exists()
    assert pipeline.clip_config is not None and pipeline.safety is not None


def test_top_ranked_images_match_their_prompts(report):
    top = report["top"]["per_attribute"]
    assert top["colour"] >= 0.95, top
    assert top["shape"] >= 0.90, top
    assert top["position"] >= 0.85, top
    assert report["top"]["per_kind"]["held_out_pair"]["fidelity"] >= 0.80, report["top"]["per_kind"]


def test_clip_ranking_helps_and_the_bias_is_visible(report):
    assert report["top"]["fidelity"] > report["random"]["fidelity"]
    # the injected default (red for colour-free prompts, p = 0.7 in training) shows: far above 1/8
    assert report["default_share"]["value"] >= 0.4


def test_vqgan_reconstructs_procedural_images(report):
    assert report["vqgan"]["psnr"] >= 30.0
