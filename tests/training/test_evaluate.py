"""training.evaluate: metrics checked exactly against a fake pipeline that draws dataset images, structure and
consistency on a tiny random checkpoint, and the evaluate / install CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from engine.api import GeneratedImage, GenerationResult
from engine.pipeline import png_bytes
from training.__main__ import install_checkpoint, main
from training.data.captions import COLOUR_NAMES, HELD_OUT_PAIRS
from training.data.shapes import POSITION_OFFSET, POSITION_VECTORS, RELATION_VECTORS, SIZE_FRACTION, render_scene
from training.detect import detect, fidelity, matches
from training.evaluate import (
    ALL_KINDS,
    build_prompts,
    evaluate_checkpoint,
    evaluate_pipeline,
    generate_candidates,
    held_out_pair_scenes,
    score_candidates,
    summary_lines,
)


def _scene_for(named: dict, *, wrong_colour: bool) -> dict:
    """A scene that satisfies ``named`` (colour-free objects red), or with every object's colour shifted."""
    objs = named["objects"]
    used: list[str] = []
    objects = []
    for k, o in enumerate(objs):
        colour = o["colour"] or ("blue" if wrong_colour else "red")
        if wrong_colour and o["colour"]:
            colour = COLOUR_NAMES[(COLOUR_NAMES.index(colour) + 3) % len(COLOUR_NAMES)]
        if colour in used or colour == named.get("background"):
            colour = next(c for c in COLOUR_NAMES if c not in used and c != named.get("background"))
        used.append(colour)
        if len(objs) == 1:
            vx, vy = POSITION_VECTORS[o["position"] or "center"]
            size = o["size"] or "small"
        else:
            vx, vy = RELATION_VECTORS[named["relation"]]
            vx, vy = (vx, vy) if k == 0 else (-vx, -vy)
            size = "small"
        centre = [0.5 + vx * POSITION_OFFSET, 0.5 + vy * POSITION_OFFSET]
        objects.append({"shape": o["shape"], "colour": colour, "size": size, "center": centre,
                        "extent": SIZE_FRACTION[size]})
    bg = named.get("background") or next(c for c in ("white", "black", "green") if c not in used)
    return {"background": bg, "objects": objects}


class DatasetPipeline:
    """Fake pipeline: candidate n-1 of each request is a correct dataset drawing and gets the best CLIP score;
    the others have the wrong colour (colour-free prompts: blue instead of red)."""

    batch_buckets = (1, 2, 4, 8, 16)
    clip_config = object()
    checkpoint_id = "fake-dataset"

    def __init__(self):
        self.calls: list[int] = []

    def generate(self, requests):
        from training.detect import parse_prompt

        self.calls.append(sum(r.n for r in requests))
        out = []
        for r in requests:
            named = parse_prompt(r.prompt)
            imgs = []
            for i in range(r.n):
                good = i == r.n - 1
                img = render_scene(_scene_for(named, wrong_colour=not good), 128)
                imgs.append((1.0 if good else -float(i), i, img))
            imgs.sort(key=lambda t: -t[0])
            images = [GeneratedImage(index=i, rank=rank, png=png_bytes(img), tokens=np.zeros(4, np.int16),
                                     clip_score=score, safety={}, flagged=False)
                      for rank, (score, i, img) in enumerate(imgs)]
            out.append(GenerationResult(request_id=r.request_id, prompt=r.prompt, seed=r.seed, images=images,
                                        checkpoint_id=self.checkpoint_id))
        return out


def test_build_prompts_kinds_and_training_exclusion():
    prompts = build_prompts(3, seed=1)
    assert [p.kind for p in prompts] == [k for k in ALL_KINDS for _ in range(3)]
    assert build_prompts(3, seed=1) == prompts  # deterministic
    one = [p.prompt for p in prompts if p.kind == "one_object"]
    again = build_prompts(3, seed=1, kinds=("one_object",), train_captions=[one[0].upper() + "  "])
    assert one[0] not in [p.prompt for p in again] and len(again) == 3
    assert all(len(p.named["objects"]) == 2 for p in prompts if p.kind == "two_object")
    assert all(p.named["objects"][0]["colour"] for p in prompts if p.kind == "one_object")
    with pytest.raises(ValueError, match="unknown prompt kind"):
        build_prompts(2, kinds=("nope",))


def test_held_out_pair_scenes_draw_only_the_held_out_pairs():
    """The VQGAN's ceiling for the held-out-pairs bar is measured on images of exactly those pairs."""
    scenes = held_out_pair_scenes(12, seed=3)
    assert len(scenes) == 12 and held_out_pair_scenes(12, seed=3) == scenes
    pairs = [(sc["named"]["objects"][0]["colour"], sc["named"]["objects"][0]["shape"]) for sc in scenes]
    assert set(pairs) <= HELD_OUT_PAIRS and len(set(pairs)) > 1
    assert all(len(sc["named"]["objects"]) == 1 for sc in scenes)
    for sc in scenes:  # the images show what the scenes name (so a reconstruction is scored against the truth)
        assert all(matches(detect(render_scene(sc, 128)), sc["named"]).values())


def test_metrics_exact_on_fake_dataset_pipeline(tmp_path):
    n, cand = 4, 3
    pipe = DatasetPipeline()
    rep = evaluate_pipeline(pipe, n_per_kind=n, candidates=cand, seed=0, out_dir=tmp_path)
    assert pipe.calls == [15] * 4  # 20 prompts, 5 a call (15 rows fit the largest bucket, 16)
    assert rep["n_prompts"] == 5 * n and rep["n_images"] == 5 * n * cand
    # the top-ranked image is always the correct drawing: every attribute of every kind at 100%
    assert rep["top"]["fidelity"] == 1.0
    assert set(rep["top"]["per_attribute"].values()) == {1.0}
    assert {"colour", "shape", "count", "relation"} <= set(rep["top"]["per_attribute"])
    assert all(v["fidelity"] == 1.0 for v in rep["top"]["per_kind"].values())
    # every candidate but one has a wrong named colour; colour-free prompts do not name a colour (all correct)
    expected_mean = (4 * n * (1 / cand) + n * 1.0) / (5 * n)
    assert rep["mean_candidate"]["fidelity"] == pytest.approx(expected_mean)
    assert rep["mean_candidate"]["per_kind"]["colour_free"]["fidelity"] == 1.0
    # random candidate: ok exactly when the pick is the good one (index cand-1) or the prompt is colour-free
    for p in rep["prompts"]:
        assert p["random"]["ok"] == (p["kind"] == "colour_free" or p["random"]["index"] == cand - 1)
        assert p["top"]["index"] == cand - 1 and p["candidates_ok"] == (cand if p["kind"] == "colour_free" else 1)
    rand_ok = np.mean([p["random"]["ok"] for p in rep["prompts"]])
    assert rep["random"]["fidelity"] == pytest.approx(rand_ok)
    assert rep["clip_gain"]["fidelity"] == pytest.approx(1.0 - rand_ok)
    # default share: over colour-free prompts' candidates only (the good one red, the others blue)
    ds = rep["default_share"]
    assert ds["n_prompts"] == n and ds["n_images"] == n * cand
    assert ds["value"] == pytest.approx(1 / cand) and ds["top_ranked"] == 1.0
    bars = {b["name"]: b for b in rep["bars"]}
    assert bars["colour"]["pass"] and bars["held-out pairs"]["pass"] and bars["VQGAN PSNR (dB)"]["pass"] is None
    assert rep["passed"]
    assert any("PASS" in line and "colour" in line for line in summary_lines(rep))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["top"]["fidelity"] == 1.0 and len(on_disk["prompts"]) == 5 * n
    for name in ("report.png", "samples.png"):
        im = Image.open(tmp_path / name)
        assert im.size[0] > 200 and im.size[1] > 100


def test_candidates_larger_than_bucket_is_an_error():
    with pytest.raises(ValueError, match="largest batch"):
        generate_candidates(DatasetPipeline(), build_prompts(1, kinds=("colour_free",)), candidates=17)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    from training.fixtures import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "ck")


def test_random_checkpoint_consistent_with_detector(random_ckpt):
    from engine.pipeline import load_pipeline

    pipe = load_pipeline(random_ckpt)
    prompts = build_prompts(2, seed=3)
    gen = generate_candidates(pipe, prompts, candidates=3, seed=3)
    scores = score_candidates(prompts, gen, seed=3)
    # top-ranked = rank 0 = highest CLIP score
    for images in gen:
        assert [im.rank for im in images] == [0, 1, 2]
        assert images[0].clip_score == max(im.clip_score for im in images)
    rank0 = [np.asarray(Image.open(io.BytesIO(images[0].png)).convert("RGB")) for images in gen]
    ref = fidelity(rank0, [p.prompt for p in prompts])
    assert scores["top"]["fidelity"] == pytest.approx(ref["fidelity"])
    assert scores["top"]["per_attribute"] == pytest.approx(ref["per_attribute"])
    for key in ("top", "random", "mean_candidate"):
        s = scores[key]
        assert 0.0 <= s["fidelity"] <= 1.0 and all(0.0 <= v <= 1.0 for v in s["per_attribute"].values())
        assert sum(v["n"] for v in s["per_kind"].values()) == s["n"]
    assert scores["default_share"]["n_images"] == 2 * 3
    assert 0.0 <= scores["default_share"]["value"] <= 1.0


def test_evaluate_checkpoint_and_cli(random_ckpt, tmp_path, capsys):
    rep = evaluate_checkpoint(random_ckpt, n_per_kind=1, candidates=2, out_dir=tmp_path / "ev", psnr_images=4)
    assert rep["checkpoint_id"] == "random-0" and rep["settings"]["clip_ranking"]
    assert rep["vqgan"]["n_images"] == 4 and np.isfinite(rep["vqgan"]["psnr"])
    assert rep["vqgan"]["psnr_min"] <= rep["vqgan"]["psnr"]
    assert rep["vqgan"]["recon_fidelity"] < 0.5 and "shape" in rep["vqgan"]["recon_per_attribute"]  # noise
    held = rep["vqgan"]["held_out_pairs"]
    assert held["n_images"] == 4 and held["recon_fidelity"] < 0.5 and np.isfinite(held["psnr"])
    assert {b["name"] for b in rep["bars"]} >= {"colour", "shape", "position", "held-out pairs", "VQGAN PSNR (dB)"}
    assert rep["passed"] is False  # random weights meet no bar
    for name in ("report.json", "report.png", "samples.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 0

    assert main(["evaluate", "--checkpoint", str(random_ckpt), "--n-per-kind", "1", "--candidates", "2",
                 "--psnr-images", "2", "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr()
    brief = json.loads(out.out)
    assert brief["checkpoint_id"] == "random-0" and "FAIL" in out.err
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["n_prompts"] == 5
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing")]) == 2


def test_install_copies_only_inference_files(random_ckpt, tmp_path):
    import shutil

    from engine.pipeline import load_pipeline

    root = tmp_path / "root"
    shutil.copytree(random_ckpt, root)
    for junk in ("dallebart-train/checkpoints/100/state", "tokens/shard-00000.parquet", "dallebart-tokenizer/x",
                 "dallebart/training.json"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk")
    (root / "eval").mkdir()
    (root / "eval" / "report.json").write_text("{}")
    target = tmp_path / "assets" / "demo"
    assert main(["install", "--checkpoint", str(root), "--to", str(target), "--id", "shapes-demo-x"]) == 0
    files = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert "dallebart/flax_model.msgpack" in files and "vqgan/config.json" in files and "clip/vocab.json" in files
    assert "eval/report.json" in files and "checkpoint.json" in files
    assert not any(f.startswith(("tokens", "dallebart-train", "dallebart-tokenizer")) for f in files)
    assert "dallebart/training.json" not in files
    assert load_pipeline(target).checkpoint_id == "shapes-demo-x"
    with pytest.raises(FileNotFoundError, match="flax_model"):
        install_checkpoint(tmp_path / "nothing", target)


def test_finish_demo_writes_id_evaluates_and_installs(random_ckpt, tmp_path, capsys):
    """What ``demo`` does after training: checkpoint.json with an id, eval report (training captions from
    ``tokens/`` excluded), install of the inference files only."""
    import shutil

    from training.__main__ import finish_demo
    from training.data.parquet import TokenShardWriter

    root, target = tmp_path / "root", tmp_path / "assets"
    shutil.copytree(random_ckpt, root)
    with TokenShardWriter(root / "tokens", rows_per_shard=10) as w:
        w.write(["a red circle", "a blue star"], np.zeros((2, 16), np.int32))
    out = finish_demo(root, {"num_images": 2}, checkpoint_id="toy-demo", eval_n_per_kind=1, eval_candidates=2,
                      install=target)
    meta = json.loads((root / "checkpoint.json").read_text())
    assert meta["id"] == out["checkpoint_id"] == "toy-demo" and meta["num_images"] == 2
    assert meta["eval"]["fidelity_top"] == out["eval"]["fidelity_top"]
    rep = json.loads((root / "eval" / "report.json").read_text())
    assert rep["checkpoint_id"] == "toy-demo" and rep["settings"]["train_captions_excluded"]
    assert json.loads((target / "checkpoint.json").read_text())["id"] == "toy-demo"
    assert (target / "eval" / "report.png").is_file() and not (target / "tokens").exists()
    assert "FAIL  colour" in capsys.readouterr().err  # the human summary (random weights meet no bar)
    # run again without an id: the recorded one is kept
    assert finish_demo(root, {}, eval_n_per_kind=0)["checkpoint_id"] == "toy-demo"
