"""bench sampler: the quick run's table on a tiny config, and min-dalle vs our sampler on the same weights."""

from __future__ import annotations

import dataclasses
import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest

from bench import sampler as bench_sampler

pytest.importorskip("min_dalle.models.dalle_bart_decoder")


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    assert lines[0] == bench_sampler.HEADER
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def test_quick_run_on_tiny_config_prints_the_table(tmp_path):
    out = io.StringIO()
    json_path = tmp_path / "sampler.json"
    with redirect_stdout(out):
        rc = bench_sampler.main(
            ["--quick", "--configs", "tiny", "--batches", "1,2", "--steps", "8", "--torch-threads", "1",
             "--json", str(json_path)]
        )
    assert rc == 0
    rows = _table_rows(out.getvalue())
    cols = bench_sampler.HEADER.strip("|").split("|")
    col = {name.strip(): i for i, name in enumerate(cols)}
    assert [(r[col["B"]], r[col["sampler"]]) for r in rows] == [
        ("1", "ours"), ("1", "min-dalle"), ("1", "roofline"), ("2", "ours"), ("2", "min-dalle"), ("2", "roofline"),
    ]
    for r in rows:
        assert r[col["config"]] == "tiny" and r[col["dtype"]] == "float32"
        for name in ("ms/step", "tokens/s", "images/s", "loop s"):
            assert float(r[col[name]]) > 0, (name, r)
        if r[col["sampler"]] == "ours":
            assert float(r[col["compile s"]]) > 0
            assert float(r[col["ours/min-dalle"]].rstrip("×")) > 0
            assert 0 < float(r[col["% roofline"]].rstrip("%"))
        if r[col["sampler"]] == "min-dalle":
            assert r[col["compile s"]] == "—" and float(r[col["encoder ms"]]) >= 0

    data = json.loads(json_path.read_text())
    assert data["info"]["ceilings"]["flops_per_s"] > 0 and data["info"]["ceilings"]["bytes_per_s"] > 0
    by_key = {(r["batch"], r["sampler"]): r for r in data["rows"]}
    for b in (1, 2):
        ours, theirs, roof = by_key[(b, "ours")], by_key[(b, "min-dalle")], by_key[(b, "roofline")]
        assert ours["steps_timed"] == 8
        # the figures are consistent with each other: tokens/s = B / step, images/s = tokens/s / 256
        assert ours["tokens_per_s"] == pytest.approx(b / ours["step_s"])
        assert ours["images_per_s"] == pytest.approx(ours["tokens_per_s"] / 256)
        assert ours["vs_mindalle"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
        assert ours["roofline_pct"] == pytest.approx(100 * roof["step_s"] / ours["step_s"])


def test_steps_must_leave_room_for_a_warm_in_chunk():
    """A timed chunk fits in half a KV-cache block: 32 of 256 steps with 4 blocks, 128 with one (tiny's default),
    and in half of one of the native kernel's timing segments (a quarter of the image) where it may run."""
    cases = [(32, "4", "xla", True), (33, "4", "xla", False), (128, None, "xla", True), (129, "1", "xla", False),
             (32, None, "auto", True), (33, None, "auto", False), (33, "1", "native", False)]
    for steps, blocks, attention, ok in cases:
        argv = ["--configs", "tiny", "--steps", str(steps), "--attention", attention]
        argv += ["--cache-blocks", blocks] if blocks else []
        args = bench_sampler.parse_args(argv)
        if ok:
            assert bench_sampler.steps_for(bench_sampler.TINY, "tiny", args) == steps
        else:
            with pytest.raises(SystemExit, match="half a KV-cache block"):
                bench_sampler.steps_for(bench_sampler.TINY, "tiny", args)
    with pytest.raises(SystemExit):
        bench_sampler.parse_args(["--dtypes", "float16"])


def test_min_dalle_and_our_sampler_pick_the_same_argmax_tokens():
    """top_k=1 on the same weights: every one of the 256 tokens agrees (cond/uncond mixing, cache, vocab cut)."""
    import jax.numpy as jnp

    from bench.reference.mindalle import MinDalleSampler
    from engine.sampling import Sampler

    # the published vocabulary layout (16384 codes + start token) so both sides sample among the same 16384 ids
    cfg = dataclasses.replace(bench_sampler.TINY, image_vocab_size=16384, decoder_start_token_id=16384,
                              bos_token_id=16385, eos_token_id=16385, pad_token_id=16385)
    params = bench_sampler.random_params(cfg, seed=3, std=0.15)
    cond, uncond = bench_sampler.prompt(cfg)
    batch = 2

    theirs = MinDalleSampler(cfg, params, "float32", threads=1).sample(cond, uncond, batch, top_k=1, scale=10.0)
    ours = Sampler(None, params, cfg, jnp.float32, buckets=(batch,)).sample(
        np.tile(cond, (batch, 1)), np.tile((cond != 1).astype(np.int32), (batch, 1)),
        np.tile(uncond, (batch, 1)), np.tile((uncond != 1).astype(np.int32), (batch, 1)),
        seeds=[5, 6], indices=[0, 1], scale=10.0, top_k=1, top_p=1.0, temperature=1.0,
    )
    assert ours.shape == theirs.shape == (batch, 256)
    assert len(np.unique(ours)) > 20  # a real sequence, not one repeated id
    np.testing.assert_array_equal(ours, theirs)
