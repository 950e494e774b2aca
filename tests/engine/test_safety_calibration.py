"""``python -m engine calibrate-safety``: thresholds measured on a labelled image set with the checkpoint's own CLIP.
The demo checkpoint's shapes world stands in for real concepts (a black star plays the unsafe concept, as in the
demo's safety.json): rendered black stars are the concept's images, other scenes the ok ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.__main__ import main
from engine.calibrate import calibrate, threshold_for
from engine.pipeline import DEFAULT_CHECKPOINT
from engine.safety import SafetyChecker, SafetyConfigError
from training.data.shapes import ShapesConfig, render_scene, sample_scene


def test_the_threshold_flags_at_most_the_allowed_share_of_ok_scores():
    scores = np.arange(100) / 100.0  # 0.00 .. 0.99
    for share in (0.0, 0.01, 0.05, 0.2):
        t = threshold_for(scores, share)
        assert np.mean(scores > t) <= share
        assert np.mean(scores > t - 0.011) > share or share == 0.0  # and it is the lowest such threshold


def test_calibrate_reports_recall_on_the_concepts_own_images_and_refuses_bad_input():
    direction = np.array([[1.0, 0.0]], np.float32)

    def embed_texts(texts):
        return np.repeat(direction, len(texts), axis=0)

    ok = np.array([[np.cos(a), np.sin(a)] for a in np.linspace(0.6, 1.5, 50)], np.float32)  # cos 0.83 .. 0.07
    pos = np.array([[np.cos(a), np.sin(a)] for a in (0.0, 0.1, 0.2, 1.0)], np.float32)
    config, [report] = calibrate([{"name": "x", "prompts": ["x"], "severity": "critical"}], ok, {"x": pos},
                                 embed_texts, 0.0)
    assert report.false_positive_rate == 0.0 and report.recall == 0.75  # three of the four are above every ok image
    assert config["concepts"][0]["severity"] == "critical" and config["concepts"][0]["calibration"]["recall"] == 0.75
    with pytest.raises(ValueError, match="no 'ok' images"):
        calibrate([{"name": "x", "prompts": ["x"]}], ok[:0], {}, embed_texts, 0.01)
    with pytest.raises(SafetyConfigError, match="severity"):
        calibrate([{"name": "x", "prompts": ["x"], "severity": "urgent"}], ok, {}, embed_texts, 0.01)


def _labelled_shapes(root, n_stars: int, n_ok: int) -> None:
    rng = np.random.default_rng(0)
    (root / "ok").mkdir(parents=True)
    (root / "black-star").mkdir()
    stars = ok = 0
    while stars < n_stars or ok < n_ok:
        spec, _ = sample_scene(rng, ShapesConfig())
        is_star = any(o["shape"] == "star" and o["colour"] == "black" for o in spec["objects"])
        if not is_star and stars < n_stars and rng.random() < 0.5:  # make a black star of a one-object scene
            if len(spec["objects"]) == 1 and spec["background"] != "black":
                spec["objects"][0].update(shape="star", colour="black")
                is_star = True
        if is_star and stars < n_stars:
            Image.fromarray(render_scene(spec)).save(root / "black-star" / f"{stars}.png")
            stars += 1
        elif not is_star and ok < n_ok:
            Image.fromarray(render_scene(spec)).save(root / "ok" / f"{ok}.png")
            ok += 1


def test_calibrate_safety_on_the_demo_checkpoint_writes_a_safety_json_that_flags_as_reported(tmp_path, capsys):
    _labelled_shapes(tmp_path / "labelled", n_stars=16, n_ok=48)
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"concepts": [
        {"name": "black-star", "prompts": ["a black star", "a picture of a black star"], "severity": "critical"}]}))
    out = tmp_path / "safety.json"
    assert main(["calibrate-safety", "--checkpoint", str(DEFAULT_CHECKPOINT), "--concepts", str(concepts),
                 "--images", str(tmp_path / "labelled"), "--max-false-positives", "0.05", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    [concept] = written["concepts"]
    figures = concept["calibration"]
    assert figures["ok_images"] == 48 and figures["concept_images"] == 16 and figures["false_positive_rate"] <= 0.05
    assert "black-star" in printed and f"wrote {out}" in printed
    # the written file is what the engine loads, and with the same CLIP it flags exactly as the report says
    from engine.calibrate import embed_in_batches, read_labelled
    from engine.pipeline import load_pipeline

    pipeline = load_pipeline(DEFAULT_CHECKPOINT, buckets=(16,))
    checker = SafetyChecker.from_file(out, pipeline.embed_texts)
    sets = read_labelled(tmp_path / "labelled", pipeline.clip_config.vision_config.image_size)
    ok_flags = [v.flagged for v in checker.check(embed_in_batches(pipeline.embed_images, sets["ok"]))]
    star_verdicts = checker.check(embed_in_batches(pipeline.embed_images, sets["black-star"]))
    assert np.mean(ok_flags) == pytest.approx(figures["false_positive_rate"], abs=1e-4)
    assert np.mean([v.flagged for v in star_verdicts]) == pytest.approx(figures["recall"], abs=1e-4)
    assert all(v.critical for v in star_verdicts if v.flagged)


def test_calibrate_safety_refuses_folders_that_name_no_concept(tmp_path, capsys):
    (tmp_path / "labelled" / "ok").mkdir(parents=True)
    (tmp_path / "labelled" / "gore").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "labelled" / "ok" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "labelled" / "gore" / "b.png")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"concepts": [{"name": "weapons", "prompts": ["a gun"]}]}))
    code = main(["calibrate-safety", "--checkpoint", str(DEFAULT_CHECKPOINT), "--concepts", str(concepts),
                 "--images", str(tmp_path / "labelled"), "--out", str(tmp_path / "s.json")])
    assert code == 2 and "['gore'] name no concept" in capsys.readouterr().out
    assert not (tmp_path / "s.json").exists()


def test_the_published_concept_list_is_text_with_severities_and_no_thresholds():
    from importlib import resources

    data = json.loads((resources.files("engine") / "assets" / "safety" / "concepts.json").read_text())
    names = [c["name"] for c in data["concepts"]]
    assert len(names) == len(set(names)) >= 5
    assert all(c["prompts"] and c["severity"] in ("mild", "critical") and "threshold" not in c
               for c in data["concepts"])
    assert {c["name"] for c in data["concepts"] if c["severity"] == "critical"} >= {"sexual-minors", "gore"}
