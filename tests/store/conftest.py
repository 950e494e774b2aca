"""Fixtures of the store tests: a generation with stored images."""

from __future__ import annotations

import numpy as np
import pytest

from store.repository import NewImage


@pytest.fixture
def gen_with_images(repo):
    """``await gen_with_images(n=3, user_id=1, prompt=...)`` → (generation, image rows, the NewImages sent):
    random tokens, ranks by index, image 2 flagged and hidden, checkpoint ``demo``."""

    async def make(n=3, user_id=1, prompt="a red square"):
        gen = await repo.create_generation(user_id=user_id, prompt=prompt, checkpoint_id="demo")
        rng = np.random.default_rng(gen.id)
        images = [
            NewImage(index=i, tokens=rng.integers(0, 16384, 256), rank=i, clip_score=0.3 - i / 10,
                     safety_scores={"nsfw": 0.01 * i}, flagged=i == 2, hidden=i == 2, sha256="ab" * 32,
                     file_path=f"outputs/{gen.id}_{i}.png")
            for i in range(n)
        ]
        rows = await repo.add_images(gen.id, images)
        return gen, rows, images

    return make
