"""Shared by the trainer tests: ``demo``, one tiny ``python -m training demo`` run (VQGAN, decoder fine-tune,
token shards, DalleBart, CLIP) made once per test run and only read by the tests that use it. Under pytest-xdist
the workers share it: the first to need it trains it under a file lock in the run's common temporary directory, and
the others wait for it, so it is made once, not once per worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock

from training.__main__ import main

TINY = [
    "--vqgan-steps", "24", "--num-images", "48", "--dallebart-steps", "24", "--clip-steps", "16",
    "--image-size", "32", "--factor", "4", "--ch", "8", "--n-embed", "32", "--embed-dim", "8", "--norm-groups", "2",
    "--d-model", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--max-text-length", "24",
    "--vocab-size", "300", "--clip-vocab-size", "600", "--clip-image-size", "32", "--patch", "8", "--width", "32",
    "--clip-layers", "1", "--clip-heads", "2", "--batch-size", "8", "--log-every", "4", "--save-every", "12",
    "--lr", "3e-3", "--warmup", "2", "--no-progress", "--vqgan-decoder-steps", "16", "--scale", "3", "--top-k", "8",
    "--decoder-ch-mult", "2,2,2", "--palette-weight", "0.1",
]


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # xdist workers' temp dirs share this parent
    out = shared / "tiny-demo" / "ckpt"
    with FileLock(str(shared / "tiny-demo.lock")):
        if not (shared / "tiny-demo" / "made").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            assert main(["demo", "--out", str(out), *TINY]) == 0
            (shared / "tiny-demo" / "made").touch()
    return out
