"""bench grid: a whole grid timed end to end on the tiny configs, both sampler kernel layouts on the same weights."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
from PIL import Image

from bench import grid as bench_grid


def test_tiny_grid_times_each_layout_and_bucket(tmp_path):
    out = io.StringIO()
    json_path = tmp_path / "grid.json"
    with redirect_stdout(out):
        rc = bench_grid.main(["--config", "tiny", "--n", "3", "--dtype", "float32", "--repeats", "2",
                              "--layouts", "published,transposed", "--buckets", "auto,3",
                              "--out", str(tmp_path / "png"), "--json", str(json_path)])
    assert rc == 0
    text = out.getvalue()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    assert lines[0] == bench_grid.HEADER
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]
    assert [(c[1], c[3]) for c in cells] == [
        ("published", "3 (4)"), ("published", "3 (3)"), ("transposed", "3 (4)"), ("transposed", "3 (3)"),
    ]
    info = json.loads(json_path.read_text())
    assert info["ceilings"]["flops_per_s"] > 0 and info["ceilings"]["bytes_per_s"] > 0
    for r in info["results"]:
        assert len(r["runs"]) == 2
        for run in r["runs"]:  # the parts the pipeline times fit inside the grid's total
            parts = run["sample_s"] + run["decode_s"] + run["rank_s"] + run["encode_s"]
            assert 0 < run["sample_s"] and 0 < run["encode_s"] and parts <= run["total_s"]
            assert run["batch_candidates"] == 3
        assert r["first_s"] > r["median_wall_s"]  # the first call compiles
        assert 0 < r["loop_roofline_pct"] < 100
    grid = Image.open(tmp_path / "png" / "grid-published-published-4.png")
    assert min(grid.size) > 2 * 16  # the three 16-pixel images laid out in a grid, with padding


@pytest.mark.parametrize("argv, message", [
    (["--layouts", "sideways"], "--layouts"),
    (["--buckets", "4", "--n", "9"], "--buckets"),
    (["--n", "0"], "--n"),
    (["--png-threads", "0"], "--png-threads"),
    (["--checkpoint", "engine/assets/demo", "--layouts", "transposed"], "--layouts"),
])
def test_bad_arguments_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_grid.parse_args(argv)
    assert message in capsys.readouterr().err
