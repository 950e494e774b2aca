"""The model pipeline: one pass over several requests, ranked, safety-scored, batch-independent."""

import dataclasses
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from engine import pipeline as pipeline_module
from engine.api import BadRequest, GenerationRequest, SamplingParams
from engine.checkpoint import CheckpointMissing
from engine.config import ConfigError
from engine.pipeline import half_precision_on_cpu, load_pipeline, png_bytes, to_uint8
from engine.weights import CheckpointError
from training.fixtures import random_checkpoint

SAFETY = {"concepts": [{"name": "always", "prompts": ["a red circle"], "threshold": -1.0},
                       {"name": "never", "prompts": ["a blue star"], "threshold": 1.01}]}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    directory = random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", safety=SAFETY)
    return load_pipeline(directory, buckets=(1, 2, 4, 8), chunk_size=8)


def test_one_pass_serves_several_requests_ranked_by_clip(pipeline):
    reqs = [GenerationRequest("a red circle", n=3, seed=11), GenerationRequest("a blue star", n=2, seed=12)]
    results = pipeline.generate(reqs)
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    for req, res in zip(reqs, results, strict=True):
        assert sorted(im.index for im in res.images) == list(range(req.n))
        assert [im.rank for im in res.images] == list(range(req.n))
        scores = [im.clip_score for im in res.images]
        assert scores == sorted(scores, reverse=True)
        assert res.checkpoint_id == "random-0" and res.seed == req.seed
        for im in res.images:
            assert im.tokens.dtype == np.int16 and im.tokens.shape == (pipeline.image_length,)
            assert im.tokens.max() < pipeline.config.num_image_codes
            img = Image.open(io.BytesIO(im.png))
            assert img.size == (pipeline.vqgan_config.resolution,) * 2 and img.mode == "RGB"
            assert set(im.safety) == {"always", "never"} and im.flagged  # "always" is over its threshold
    assert results[0].timings["batch_candidates"] == 5


def test_each_png_is_its_own_candidates_image(pipeline, tmp_path, monkeypatch):
    """PNGs are encoded on a thread pool: each must still hold the VQGAN decode of its own tokens, and a cancelled
    request's rows are not encoded at all."""
    encoded = []
    monkeypatch.setattr(pipeline_module, "png_bytes", lambda image: encoded.append(1) or png_bytes(image))
    reqs = [GenerationRequest("a red circle", n=3, seed=21), GenerationRequest("a dog", n=2, seed=22),
            GenerationRequest("a blue star", n=3, seed=23)]
    results = pipeline.generate(reqs, should_cancel=lambda rid: rid == reqs[1].request_id)
    assert [r.request_id for r in results] == [reqs[0].request_id, reqs[2].request_id]
    assert len(encoded) == 3 + 3  # not the cancelled request's two
    images = [im for res in results for im in res.images]
    want = to_uint8(pipeline.decode_tokens(np.stack([im.tokens for im in images])))
    for im, pixels in zip(images, want, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(im.png)).convert("RGB")), pixels)
    assert results[0].timings["encode_s"] > 0
    with pytest.raises(ValueError, match="png_threads must be >= 1"):
        load_pipeline(random_checkpoint(tmp_path / "tiny", with_clip=False), buckets=(1,), png_threads=0)


def test_same_seed_same_images_alone_or_batched(pipeline):
    target = GenerationRequest("a blue star", n=2, seed=99, params=SamplingParams(top_k=8))
    alone = pipeline.generate([target])[0]
    other = GenerationRequest("a yellow triangle", n=3, seed=7, params=SamplingParams(temperature=0.7))
    batched = pipeline.generate([other, dataclasses.replace(target)])[1]
    by_index = {im.index: im for im in batched.images}
    for im in alone.images:
        assert np.array_equal(im.tokens, by_index[im.index].tokens)
        assert im.png == by_index[im.index].png


def test_first_index_continues_the_seed_lineage(pipeline):
    whole = {im.index: im.tokens for im in pipeline.generate([GenerationRequest("a cat", n=3, seed=5)])[0].images}
    part = pipeline.generate([GenerationRequest("a cat", n=1, seed=5, first_index=2)])[0]
    assert part.images[0].index == 2 and np.array_equal(part.images[0].tokens, whole[2])


def test_progress_and_previews(pipeline):
    events = []
    req = GenerationRequest("a red circle", n=1, seed=1, preview_every=8)
    pipeline.generate([req], on_progress=lambda *a: events.append(a))
    total = pipeline.image_length
    assert [e[1] for e in events] == list(range(8, total + 1, 8))
    assert all(e[0] == req.request_id and e[2] == total for e in events)
    previews = [e[3] for e in events if e[3] is not None]
    assert previews and Image.open(io.BytesIO(previews[0])).size[0] == pipeline.vqgan_config.resolution


def test_cancellation(pipeline):
    a, b = GenerationRequest("a red circle", n=1, seed=1), GenerationRequest("a dog", n=1, seed=2)
    chunks = []
    assert pipeline.generate([a, b], on_progress=lambda *e: chunks.append(e), should_cancel=lambda rid: True) == []
    assert chunks == []  # aborted at the first chunk boundary, before any progress
    kept = pipeline.generate([a, b], should_cancel=lambda rid: rid == a.request_id)
    assert [r.request_id for r in kept] == [b.request_id]


def test_too_many_candidates_is_refused(pipeline):
    with pytest.raises(ValueError, match="largest batch bucket"):
        pipeline.generate([GenerationRequest("x", n=9)])


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointMissing, match="nowhere: no such directory"):
        load_pipeline(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointMissing, match="no dallebart/config.json"):
        load_pipeline(tmp_path / "empty")
    directory = random_checkpoint(tmp_path / "bad", with_clip=False)
    cfg = json.loads((directory / "vqgan" / "config.json").read_text())
    cfg["z_channels"] = 16  # the stored post_quant_conv no longer fits
    (directory / "vqgan" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"parameter 'decoder/conv_in/kernel' has shape \(3, 3, 8, 16\)"):
        load_pipeline(directory)


def test_half_precision_on_a_cpu_warns_that_float32_is_faster(tmp_path, caplog):
    directory = random_checkpoint(tmp_path / "tiny", with_clip=False)
    with caplog.at_level(logging.WARNING, logger="engine.pipeline"):
        load_pipeline(directory, dtype="bfloat16")
    warned = [r.getMessage() for r in caplog.records if "on a CPU" in r.getMessage()]
    assert len(warned) == 1 and "bfloat16" in warned[0] and "float32 is the faster choice" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.pipeline"):
        load_pipeline(directory)
    assert not [r for r in caplog.records if "on a CPU" in r.getMessage()]
    assert half_precision_on_cpu("float16", "cpu") is not None
    assert half_precision_on_cpu("bfloat16", "gpu") is None and half_precision_on_cpu("float32", "cpu") is None


def test_checkpoint_sampling_defaults_fill_unset_fields(tmp_path):
    """checkpoint.json's "sampling" block is what a request's unset fields become; explicit fields win."""
    directory = random_checkpoint(tmp_path / "tiny")
    meta = json.loads((directory / "checkpoint.json").read_text())
    meta["sampling"] = {"condition_scale": 2.0, "top_k": 1}
    (directory / "checkpoint.json").write_text(json.dumps(meta))
    pipe = load_pipeline(directory, buckets=(1, 2), use_clip=False)
    assert pipe.sampling_defaults == SamplingParams(condition_scale=2.0, top_k=1, top_p=1.0, temperature=1.0)

    unset = pipe.generate([GenerationRequest("a red circle", n=2, seed=1)])[0]
    explicit = pipe.generate([GenerationRequest("a red circle", n=2, seed=1,
                                                params=SamplingParams(condition_scale=2.0, top_k=1))])[0]
    for a, b in zip(unset.images, explicit.images, strict=True):
        assert np.array_equal(a.tokens, b.tokens)
    # top_k 1 from the checkpoint: greedy, so both candidates are the same whatever their random stream
    assert np.array_equal(unset.images[0].tokens, unset.images[1].tokens)
    # an explicit top_k overrides the checkpoint's: the streams now differ
    free = pipe.generate([GenerationRequest("a red circle", n=2, seed=1, params=SamplingParams(top_k=0))])[0]
    assert not np.array_equal(free.images[0].tokens, free.images[1].tokens)

    meta["sampling"] = {"top_k": -3}
    (directory / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="checkpoint.json: sampling"):
        load_pipeline(directory, use_clip=False)
    meta["sampling"] = {"top_kk": 3}
    (directory / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="top_kk"):
        load_pipeline(directory, use_clip=False)


def test_sampling_params_resolve_and_json():
    assert SamplingParams().resolve() == SamplingParams(10.0, 50, 1.0, 1.0)
    assert SamplingParams(top_k=3).resolve(SamplingParams(condition_scale=4.0)) == SamplingParams(4.0, 3, 1.0, 1.0)
    assert SamplingParams.from_json({"top_k": 8}) == SamplingParams(top_k=8)
    with pytest.raises(BadRequest, match="must be a number"):
        SamplingParams.from_json({"top_k": "8"})
    with pytest.raises(BadRequest, match="params.top_k must be an integer"):
        SamplingParams.from_json({"top_k": 8.5})
    with pytest.raises(BadRequest, match="must be a number"):
        SamplingParams.from_json({"temperature": float("nan")})
    assert SamplingParams.from_json({"top_k": None, "temperature": 0.5}) == SamplingParams(temperature=0.5)
    with pytest.raises(BadRequest, match="top_p"):
        SamplingParams.from_json({"top_p": 0})


async def test_in_process_engine_reloads_another_checkpoint_between_passes(tmp_path):
    """The batcher's model thread loads the new checkpoint (same options) and swaps it in; results name the
    checkpoint and the attention backend, and the new checkpoint's images are those a fresh pipeline gives."""
    from engine.attention import NAMES
    from engine.client import InProcessEngine

    first = random_checkpoint(tmp_path / "first", with_clip=False, seed=0)
    second = random_checkpoint(tmp_path / "second", with_clip=False, seed=1, checkpoint_id="second-1")
    engine = InProcessEngine(load_pipeline(first, buckets=(2,), png_threads=1), window_ms=0)
    try:
        info = await engine.info()
        assert info.checkpoint_id == "random-0" and info.attention in NAMES and info.dtype == "float32"
        before = await engine.result(await engine.submit(GenerationRequest("a red circle", n=2, seed=5)), 120)
        assert before.checkpoint_id == "random-0" and before.attention == info.attention
        assert await engine.reload(str(second)) == dataclasses.replace(info, checkpoint_id="second-1")
        after = await engine.result(await engine.submit(GenerationRequest("a red circle", n=2, seed=5)), 120)
        assert after.checkpoint_id == "second-1" and after.attention == info.attention
        [fresh] = load_pipeline(second, buckets=(2,), png_threads=1).generate([GenerationRequest("a red circle", n=2,
                                                                                                  seed=5)])
        assert {im.index: im.tokens.tolist() for im in after.images} == {
            im.index: im.tokens.tolist() for im in fresh.images}
        assert any(a.tokens.tolist() != b.tokens.tolist() for a, b in zip(before.images, after.images, strict=True))
        with pytest.raises(BadRequest, match="no dallebart/config.json"):
            await engine.reload(str(tmp_path))
        assert (await engine.info()).checkpoint_id == "second-1"
    finally:
        await engine.close()
