"""Blocklist matching: the nearest block in force within the distance, the same answer on the event loop and in a
worker thread (many blocks), and the same distance as imagehash's."""

from __future__ import annotations

import random
from types import SimpleNamespace

import imagehash
import pytest

from bot.blocklist import INLINE_COMPARISONS, BlocklistService, distance


def hexhash(value: int) -> str:
    return f"{value:016x}"


def test_distance_is_imagehash_hamming_distance():
    rng = random.Random(1)
    for _ in range(200):
        a, b = hexhash(rng.getrandbits(64)), hexhash(rng.getrandbits(64))
        assert distance(a, b) == imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b)


class Blocks:
    def __init__(self, blocks):
        self.blocks = blocks

    async def active_blocks(self, guild_id):
        return self.blocks


@pytest.mark.parametrize("n_blocks", [3, INLINE_COMPARISONS])  # inline, and in a worker thread
async def test_matches_finds_the_nearest_block_within_the_distance(n_blocks):
    rng = random.Random(n_blocks)
    target = 0x0F0F_F0F0_3C3C_C3C3  # 32 bits set: not a plain image's hash
    near, nearer = target ^ 0b1011_0000, target ^ 0b1  # 3 bits and 1 bit away
    far = [rng.getrandbits(64) | (1 << 63) for _ in range(n_blocks - 2)]
    blocks = [SimpleNamespace(id=i, phash=hexhash(v), guild_id=None) for i, v in enumerate([*far, near, nearer])]
    service = BlocklistService(Blocks(blocks), moderation=None, max_distance=8)
    got = await service.matches(5, [hexhash(target), hexhash(target ^ (0xFFFF << 20)), None])
    assert got[0] is not None and got[0].block_id == n_blocks - 1 and got[0].distance == 1
    assert got[1] is None or got[1].distance <= 8  # 16 bits from the target: only a random block could be near
    assert got[2] is None
