"""``python -m bench variations`` on a tiny random checkpoint: it runs, keeps the prefix and writes its picture."""

from __future__ import annotations

import io

from PIL import Image

from bench import variations
from training.fixtures import random_checkpoint


def test_bench_variations_runs_and_writes_the_picture(tmp_path):
    ckpt = random_checkpoint(tmp_path / "tiny")
    out = io.StringIO()
    args = variations.parse_args(["--checkpoint", str(ckpt), "--prompts", "1", "--n", "2",
                                  "--picture", str(tmp_path / "v.png"), "--json", str(tmp_path / "v.json")])
    summary = variations.run(args, out=out)
    assert set(summary) == {"prefix", "seed_only", "other_grid"}
    # the kept rows are the chosen image's own tokens: all agree there, so "all" is above "sampled part"
    assert summary["prefix"]["tokens_all"] >= summary["prefix"]["tokens_sampled"]
    assert "| keep the top 1/4 of the rows |" in out.getvalue()
    assert Image.open(tmp_path / "v.png").size[0] > 0
