"""Column types of the models: image tokens packed as int16, timestamps only timezone-aware."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from store.models import Image, decode_tokens, encode_tokens


def test_token_packing_exact_and_compact():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16384, size=256).astype(np.int64)
    tokens[:2] = [0, 32767]
    blob = encode_tokens(tokens)
    assert len(blob) == 2 * 256
    back = decode_tokens(blob)
    assert back.dtype == np.int16 and np.array_equal(back, tokens)
    im = Image(generation_id=1, index=0)
    im.tokens = tokens.reshape(16, 16)  # grids are flattened row-major
    assert np.array_equal(im.tokens, tokens)
    im.tokens = None
    assert im.tokens is None and im.token_bytes is None


@pytest.mark.parametrize("bad", [[-1], [32768], np.array([0.5])])
def test_token_packing_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="image tokens"):
        encode_tokens(bad)


@pytest.mark.parametrize("seed", range(5))
def test_token_packing_random_round_trip(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(x) for x in rng.integers(1, 20, size=int(rng.integers(1, 3))))
    tokens = rng.integers(0, 32768, size=shape)
    back = decode_tokens(encode_tokens(tokens))
    assert back.dtype == np.int16 and np.array_equal(back, tokens.reshape(-1))


async def test_naive_datetimes_are_rejected(repo):
    with pytest.raises(Exception, match="naive datetime"):
        await repo.update_user_state(1, cooldown_until=datetime(2030, 1, 1))
