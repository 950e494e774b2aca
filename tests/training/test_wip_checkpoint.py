"""The committed work-in-progress demo checkpoint (training/wip) stays loadable and usable as the code evolves."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from engine.api import GenerationRequest, SamplingParams
from engine.pipeline import load_pipeline

WIPS = Path(__file__).resolve().parents[2] / "training" / "wip"


@pytest.mark.parametrize(("name", "checkpoint_id", "codes", "scale"), [
    ("shapes-demo-wip", "shapes-demo-wip-20261123b", 1024, 3.0),
    ("shapes-demo-next", "shapes-demo-next-20261203", 2048, 2.0),  # session 5's tokenizer; CLIP linked from the first
])
def test_wip_checkpoint_loads_and_generates_with_its_recommended_sampling(name, checkpoint_id, codes, scale):
    pipe = load_pipeline(WIPS / name, buckets=(2,))
    assert pipe.checkpoint_id == checkpoint_id
    assert pipe.config.image_vocab_size == codes
    assert pipe.sampling_defaults == SamplingParams(condition_scale=scale, top_k=16, top_p=1.0, temperature=1.0)
    assert pipe.image_length == 256 and pipe.safety is not None
    result = pipe.generate([GenerationRequest("a red circle on the left", n=2, seed=1)])[0]
    assert [im.rank for im in result.images] == [0, 1]
    for im in result.images:
        assert Image.open(io.BytesIO(im.png)).size == (128, 128)
        assert set(im.safety) == {"demo-black-star"}
