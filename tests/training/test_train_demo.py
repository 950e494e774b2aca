"""``python -m training demo`` on tiny configs: each model trains and logs a decreasing loss, the
checkpoint records its sampling and its tokens, and the command line fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from engine.config import VQGANConfig
from training.__main__ import main
from training.checkpoint import Checkpointer
from training.encode import encode_shapes, load_vqgan
from training.metrics_log import read_metrics


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(path)]


@pytest.mark.parametrize("part", ["vqgan-base", "dallebart", "clip"])
def test_demo_trains_each_model_and_its_loss_decreases(demo, part):
    """Each model (vqgan-base: the full VQGAN, before its decoder fine-tune) logged, decreased, checkpointed."""
    losses = _losses(demo / f"{part}-train" / "metrics.jsonl")
    assert len(losses) >= 4 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    summary = json.loads((demo / part / "training.json").read_text())
    assert summary["steps"] > 0 and summary["steps_per_s"] > 0
    # orbax training checkpoints sit beside (not inside) the engine checkpoint
    assert Checkpointer(demo / f"{part}-train" / "checkpoints").all_steps()[-1] == summary["steps"]
    assert not (demo / part / "checkpoints").exists()


def test_demo_records_its_sampling_and_tokens_come_from_the_base_vqgan(demo):
    meta = json.loads((demo / "checkpoint.json").read_text())
    assert meta["sampling"] == {"condition_scale": 3.0, "top_k": 8}
    assert meta["steps"]["vqgan_decoder"] == 16
    assert json.loads((demo / "vqgan" / "training.json").read_text())["steps"] == 16
    assert Checkpointer(demo / "vqgan-train" / "checkpoints").all_steps()[-1] == 16
    assert json.loads((demo / "safety.json").read_text())["concepts"][0]["name"] == "demo-black-star"
    _, _, base = load_vqgan(demo / "vqgan-base")
    _, _, final = load_vqgan(demo / "vqgan")
    for a, b in zip(jax.tree.leaves(base["quantize"]), jax.tree.leaves(final["quantize"]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # the wider decoder (and the palette term) belong to the decoder stage: the base keeps the encoder's widths
    assert VQGANConfig.from_json(demo / "vqgan-base").decoder_ch_mult is None
    assert VQGANConfig.from_json(demo / "vqgan").decoder_ch_mult == (2, 2, 2)
    assert read_metrics(demo / "vqgan-train" / "metrics.jsonl")[-1]["palette_ce"] > 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["encode", "--vqgan", str(tmp_path / "missing"), "--out", str(tmp_path / "t"),
                 "--num-images", "2", "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err


def test_encode_refuses_to_overwrite_shards(demo, tmp_path):
    with pytest.raises(FileExistsError):
        encode_shapes(demo / "vqgan", demo / "tokens", num_images=1, progress=False)
