"""The committed work-in-progress demo checkpoint (training/wip) stays loadable and usable as the code evolves."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from engine.api import GenerationRequest, SamplingParams
from engine.pipeline import load_pipeline

WIP = Path(__file__).resolve().parents[1] / "training" / "wip" / "shapes-demo-wip"


def test_wip_checkpoint_loads_and_generates_with_its_recommended_sampling():
    pipe = load_pipeline(WIP, buckets=(2,))
    assert pipe.checkpoint_id == "shapes-demo-wip-20261123b"
    assert pipe.sampling_defaults == SamplingParams(condition_scale=3.0, top_k=16, top_p=1.0, temperature=1.0)
    assert pipe.image_length == 256 and pipe.safety is not None
    result = pipe.generate([GenerationRequest("a red circle on the left", n=2, seed=1)])[0]
    assert [im.rank for im in result.images] == [0, 1]
    for im in result.images:
        assert Image.open(io.BytesIO(im.png)).size == (128, 128)
        assert set(im.safety) == {"demo-black-star"}
