"""Shared by the trainer tests: ``demo``, one tiny ``python -m training demo`` run (VQGAN, decoder fine-tune,
token shards, DalleBart, CLIP) made once per test session and only read by the tests that use it."""

from __future__ import annotations

from pathlib import Path

import pytest

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
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "ckpt"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``) every test that reads ``demo`` runs on one worker, so the tiny
    demo run is made once, not once per worker."""
    for item in items:
        if "demo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("tiny_demo_run"))
