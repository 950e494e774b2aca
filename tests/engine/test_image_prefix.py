"""Image-token prefixes (what a variation keeps of the chosen image): forced exactly, per row, without changing the
other rows of a pass, checked against the model before a request is queued, and carried over HTTP."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from engine.api import BadRequest, GenerationRequest, SamplingParams
from engine.batching import Batcher
from engine.client import HttpEngine
from engine.fake import FakePipeline
from engine.openapi import openapi_spec
from engine.pipeline import load_pipeline
from engine.sampling import Sampler
from engine.server import ServerSettings, parse_generation_request, start_server
from tests.fakes.dallebart import random_params, tiny_config
from training.fixtures import random_checkpoint

CFG = tiny_config()  # image_length 16, 60 valid codes
T = CFG.max_text_length


def _texts(n: int) -> tuple[np.ndarray, ...]:
    ids = np.ones((n, T), np.int32)
    mask = np.zeros((n, T), np.int32)
    ids[:, :4] = [[0, 5 + i, 9, 2] for i in range(n)]
    mask[:, :4] = 1
    uids = np.ones((n, T), np.int32)
    uids[:, :2] = [0, 2]
    umask = np.zeros((n, T), np.int32)
    umask[:, :2] = 1
    return ids, mask, uids, umask


def test_sampler_forces_each_rows_prefix_and_leaves_other_rows_alone():
    sampler = Sampler(None, random_params(CFG, seed=3, std=0.1), CFG, jnp.float32, buckets=(1, 4))
    ids, mask, uids, umask = _texts(3)
    kw = dict(scale=3.0, top_k=10, top_p=1.0, temperature=1.0)
    plain = sampler.sample(ids, mask, uids, umask, seeds=[11, 12, 13], indices=[0, 1, 2], **kw)
    prefix = [5, 59, 0, 17, 33, 2, 8]  # codebook edges included
    mixed = sampler.sample(ids, mask, uids, umask, seeds=[11, 12, 13], indices=[0, 1, 2],
                           prefix=[(), prefix, plain[2][:4]], **kw)
    assert mixed[1, :7].tolist() == prefix  # forced exactly
    assert np.array_equal(mixed[0], plain[0])  # a row without a prefix is sampled as before
    assert np.array_equal(mixed[2], plain[2])  # its own tokens as a prefix: the same image
    assert not np.array_equal(mixed[1], plain[1])
    # the same request alone (bucket 1) or batched (bucket 4) gives the same tokens
    alone = sampler.sample(ids[1:2], mask[1:2], uids[:1], umask[:1], seeds=[12], indices=[1], prefix=[prefix], **kw)
    assert np.array_equal(alone[0], mixed[1])
    with pytest.raises(ValueError, match="outside the codebook"):
        sampler.sample(ids[:1], mask[:1], uids[:1], umask[:1], seeds=[1], indices=[0], prefix=[[60]], **kw)
    with pytest.raises(ValueError, match="the image has 16"):
        sampler.sample(ids[:1], mask[:1], uids[:1], umask[:1], seeds=[1], indices=[0], prefix=[[1] * 17], **kw)


def test_pipeline_prefix_alone_or_batched_same_image(tmp_path):
    pipe = load_pipeline(random_checkpoint(tmp_path / "tiny", with_clip=False), buckets=(2, 4))
    base = pipe.generate([GenerationRequest("a red circle", n=1, seed=4)])[0].images[0].tokens
    keep = [int(t) for t in base[: pipe.image_length // 2]]
    variation = GenerationRequest("a red circle", n=2, seed=77, image_prefix=tuple(keep),
                                  params=SamplingParams(top_k=8))
    alone = pipe.generate([variation])[0]
    other = GenerationRequest("a blue star", n=1, seed=5)
    batched = pipe.generate([other, dataclasses.replace(variation)])
    by_index = {im.index: im for im in batched[1].images}
    for im in alone.images:
        assert im.tokens[: len(keep)].tolist() == keep
        assert np.array_equal(im.tokens, by_index[im.index].tokens) and im.png == by_index[im.index].png
    with pytest.raises(BadRequest, match="shorter than the image"):
        pipe.check_request(GenerationRequest("x", image_prefix=tuple([0] * pipe.image_length)))
    codes = pipe.config.num_image_codes
    with pytest.raises(BadRequest, match=rf"between 0 and {codes - 1}"):
        pipe.check_request(GenerationRequest("x", image_prefix=(codes,)))


@pytest.mark.parametrize("prefix, message", [
    ((1.5,), "image_prefix\\[0\\]"), ((True,), "image_prefix\\[0\\]"), ((-1,), "image_prefix\\[0\\]"),
    ((0, 16384), "image_prefix\\[1\\]"), (tuple([0] * 4097), "shorter than the image"),
])
def test_request_validation_refuses_bad_prefixes(prefix, message):
    with pytest.raises(BadRequest, match=message):
        GenerationRequest("a cat", image_prefix=prefix).validate()


def test_prefix_travels_as_json_and_is_checked_by_the_service():
    req = GenerationRequest("a cat", n=2, seed=3, image_prefix=tuple(np.arange(5, dtype=np.int16)))
    body = req.to_json()
    assert body["image_prefix"] == [0, 1, 2, 3, 4]
    assert parse_generation_request(body) == req
    assert "image_prefix" not in GenerationRequest("a cat").to_json()  # as before for a request without one
    with pytest.raises(BadRequest, match="image_prefix must be a list"):
        parse_generation_request({"prompt": "a cat", "image_prefix": "1,2"})
    schema = openapi_spec()["components"]["schemas"]["GenerationRequest"]["properties"]["image_prefix"]
    assert schema["items"]["maximum"] == 16383


async def test_batcher_refuses_a_prefix_the_model_cannot_take():
    fake = FakePipeline(tokens_total=16, image_size=16)
    batcher = Batcher(fake)
    try:
        with pytest.raises(BadRequest, match="shorter than the image"):
            await batcher.submit(GenerationRequest("a cat", image_prefix=tuple(range(16))))
        rid = await batcher.submit(GenerationRequest("a cat", n=2, image_prefix=(7, 8, 9)))
        result = await batcher.result(rid, timeout=10)
        assert all(im.tokens[:3].tolist() == [7, 8, 9] for im in result.images)
    finally:
        await batcher.close()


async def test_prefix_travels_through_the_http_service():
    server = await start_server(FakePipeline(tokens_total=16, image_size=16), ServerSettings(port=0, token="t0k"))
    engine = HttpEngine(server.url, "t0k", timeout=10, retries=0)
    try:
        rid = await engine.submit(GenerationRequest("a cat", n=2, seed=1, image_prefix=(5, 6, 7)))
        result = await engine.result(rid, timeout=10)
        assert all(im.tokens[:3].tolist() == [5, 6, 7] for im in result.images)
        with pytest.raises(BadRequest, match="shorter than the image"):
            await engine.submit(GenerationRequest("a cat", image_prefix=tuple(range(16))))
    finally:
        await engine.close()
        await server.stop()
