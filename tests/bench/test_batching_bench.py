"""The batching benchmark runs end to end on the fake pipeline and prints both modes and the ratios."""

from __future__ import annotations

from bench.engine import main, percentile


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0


def test_bench_main_small_run(capsys):
    argv = ["--clients", "4", "--requests", "2", "--n", "2", "--fake-fixed-ms", "5", "--fake-per-candidate-ms", "0"]
    assert main([*argv, "--transport", "inprocess"]) == 0
    out = capsys.readouterr().out
    assert "batched (window 10 ms" in out and "unbatched (window 0, bucket 1)" in out
    assert "throughput ratio batched/unbatched:" in out
    lines = [line.split() for line in out.splitlines() if line.startswith(("batched", "unbatched"))]
    passes = [int(parts[-2]) for parts in lines]
    assert passes[1] == 16  # unbatched: one pass per candidate (4 clients x 2 requests x 2 images)
    assert passes[0] < passes[1]


def test_bench_refuses_an_unloadable_checkpoint(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "nothing measured" in capsys.readouterr().err
