"""A generation's images: exact int16 tokens, from engine results, stored and marked done atomically."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from store.models import decode_tokens
from store.repository import NewImage, NotFound, StatusError


async def test_images_round_trip_int16_tokens(repo, gen_with_images):
    gen, rows, images = await gen_with_images()
    got = await repo.get_generation(gen.id)
    assert [im.index for im in got.images] == [0, 1, 2]
    for stored, sent in zip(got.images, images, strict=True):
        assert stored.tokens.dtype == np.int16
        assert np.array_equal(stored.tokens, np.asarray(sent.tokens))
        assert stored.safety_scores == dict(sent.safety_scores)
    assert got.images[2].flagged and got.images[2].hidden and not got.images[0].hidden
    with pytest.raises(NotFound):
        await repo.add_images(10**9, [NewImage(index=0, tokens=[1])])
    with pytest.raises(IntegrityError):  # (generation, index) is unique
        await repo.add_images(gen.id, [NewImage(index=0, tokens=[1])])
    assert (await repo.get_image(rows[2].id)).hidden and not (await repo.get_image(rows[0].id)).hidden
    assert await repo.get_image(10**9) is None


async def test_new_image_from_engine_result():
    class Generated:  # the fields of engine.api.GeneratedImage
        index, rank, png, clip_score, flagged = 3, 0, b"", 0.25, True
        tokens = np.array([1, 2, 3], dtype=np.int16)
        safety = {"nsfw": 0.9}

    ni = NewImage.from_generated(Generated(), file_path="x.png", sha256="00")
    assert (ni.index, ni.rank, ni.flagged, ni.hidden, ni.file_path) == (3, 0, True, True, "x.png")


async def test_finish_generation_stores_images_and_marks_done_atomically(repo):
    gen = await repo.create_generation(user_id=1, prompt="p", n_images=2)
    images = [NewImage(index=i, tokens=np.full(8, i, dtype=np.int16), rank=1 - i, clip_score=0.1 * i)
              for i in range(2)]
    with pytest.raises(StatusError):  # still queued: not allowed to jump to done, and nothing is stored
        await repo.finish_generation(gen.id, images)
    assert (await repo.get_generation(gen.id)).images == []
    await repo.set_status(gen.id, "running")
    done, rows = await repo.finish_generation(gen.id, images, checkpoint_id="ck1", attention="xla")
    assert done.status == "done" and done.finished_at >= done.started_at and done.checkpoint_id == "ck1"
    assert done.attention == "xla"
    assert [r.index for r in rows] == [0, 1] and all(r.id for r in rows)
    got = await repo.get_generation(gen.id)
    assert got.status == "done" and sorted((im.index, im.rank) for im in got.images) == [(0, 1), (1, 0)]
    assert decode_tokens(got.images[0].token_bytes).tolist() == [got.images[0].index] * 8
    with pytest.raises(NotFound):
        await repo.finish_generation(10**9, images)
