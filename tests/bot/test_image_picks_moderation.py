"""The per-image panel's service side on SQLite and PostgreSQL: what a pick may show (private, removed, withheld,
spoilered) and the prefix a variation of an image is sampled with."""

from __future__ import annotations

import io

from PIL import Image as PILImage

from bot.moderation import ModerationService, Moderator
from bot.picks import ImagePicks
from bot.variations import kept_prefix, variation_prefix
from store.repository import NewImage

GUILD = 2000


def _png(colour) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


async def _result(repo, tmp_path, *, private=False):
    gen = await repo.create_generation(user_id=77, prompt="a red square", guild_id=GUILD, channel_id=3000, seed=5,
                                       private=private)
    images = []
    for i in range(3):
        path = tmp_path / f"{gen.id}-{i}.png"
        path.write_bytes(_png((40 * i, 0, 0)))
        images.append(NewImage(index=i, tokens=list(range(16 * i, 16 * i + 16)), rank=i, clip_score=0.3,
                               safety_scores={}, flagged=i == 2, hidden=i == 2, file_path=str(path),
                               sha256="ab" * 32))
    return gen, await repo.add_images(gen.id, images)


def test_kept_prefix_is_the_top_rows_moderation():
    assert kept_prefix(list(range(256))) == tuple(range(64))  # 16x16: the top 4 rows
    assert kept_prefix(list(range(256)), keep=0.5) == tuple(range(128))
    assert kept_prefix(list(range(16)), keep=0.75) == tuple(range(12))
    assert kept_prefix(list(range(4)), keep=0.0) == (0, 1)  # at least one row
    assert kept_prefix(list(range(9)), keep=1.0) == tuple(range(6))  # never every row
    assert kept_prefix(list(range(10)), keep=0.5) == tuple(range(5))  # not a square: the same share of tokens
    assert kept_prefix(None) == () and kept_prefix([3]) == ()


async def test_pick_shows_what_the_result_shows_moderation(repo, tmp_path):
    mode = {"value": "spoiler"}

    async def flagged_mode(_guild):
        return mode["value"]

    picks = ImagePicks(repo, flagged_mode)
    gen, rows = await _result(repo, tmp_path)
    first = await picks.pick(rows[0].id, user_id=5)
    assert first.ok and first.png == _png((0, 0, 0)) and not first.spoiler and first.generation_id == gen.id
    flagged = await picks.pick(rows[2].id, user_id=5)
    assert flagged.ok and flagged.spoiler  # spoiler mode: behind a spoiler, as in the result
    mode["value"] = "withhold"
    withheld = await picks.pick(rows[2].id, user_id=5)
    assert not withheld.ok and "withheld" in withheld.message and withheld.png == b""

    svc = ModerationService(repo, guild_settings=repo.get_guild_settings, flagged_mode=flagged_mode)
    case_id, _ = await svc.open_case("report", image_id=rows[1].id, reason="quality", reporter=21)
    await svc.remove(case_id, Moderator(user_id=9, guild_id=GUILD, can_manage_messages=True), reason="off topic")
    removed = await picks.pick(rows[1].id, user_id=77)
    assert not removed.ok and removed.message == "That image was removed by a moderator."

    private, private_rows = await _result(repo, tmp_path, private=True)
    assert not (await picks.pick(private_rows[0].id, user_id=5)).ok
    assert (await picks.pick(private_rows[0].id, user_id=77)).ok  # its owner
    assert (await picks.pick(10**6, user_id=77)).message == "That image no longer exists."
    (tmp_path / f"{gen.id}-0.png").unlink()
    assert (await picks.pick(rows[0].id, user_id=5)).message == "That image's file is no longer stored."


async def test_variation_prefix_comes_from_the_parent_images_tokens_moderation(repo, tmp_path):
    gen, rows = await _result(repo, tmp_path)
    variation = await repo.create_generation(user_id=8, prompt="a red square", guild_id=GUILD, seed=9,
                                             kind="variation", parent_generation_id=gen.id,
                                             parent_image_id=rows[1].id)
    assert await variation_prefix(repo, variation) == tuple(range(16, 20))  # image 1's top row of 4
    reroll = await repo.create_generation(user_id=8, prompt="a red square", guild_id=GUILD, seed=9, kind="reroll",
                                          parent_generation_id=gen.id)
    assert await variation_prefix(repo, reroll) == ()
