"""``finish_generation`` with review cases: the images, their cases and the done status are written together, or
none of them (a retry after a dropped connection finds nothing half written)."""

from __future__ import annotations

import numpy as np
import pytest

from store.models import ModerationCase
from store.repository import NewImage, StatusError, TakenOver
from tests.fakes.botkit import rows_of


def images(n: int = 3) -> list[NewImage]:
    return [NewImage(index=i, tokens=np.full(8, i, dtype=np.int16), rank=i, flagged=i == 1, hidden=i > 0)
            for i in range(n)]


async def test_cases_open_with_the_images_in_one_transaction(repo):
    gen = await repo.create_generation(user_id=7, guild_id=40, prompt="p", n_images=3)
    await repo.claim(gen.id, "me")
    cases = {1: ("auto", "safety checker: nsfw=0.90"), 2: ("blocklist", "like a removed image")}
    done, rows = await repo.finish_generation(gen.id, images(), owner="me", cases=cases)
    assert done.status == "done"
    opened = sorted(await rows_of(repo, ModerationCase), key=lambda c: c.id)
    by_image = {c.image_id: c for c in opened}
    assert set(by_image) == {rows[1].id, rows[2].id}
    assert (by_image[rows[1].id].source, by_image[rows[1].id].reason) == ("auto", "safety checker: nsfw=0.90")
    assert by_image[rows[2].id].source == "blocklist"
    assert all(c.status == "open" and c.guild_id == 40 and c.user_id == 7 and c.generation_id == gen.id
               for c in opened)


async def test_a_refused_finish_leaves_no_images_and_no_cases(repo):
    gen = await repo.create_generation(user_id=7, guild_id=40, prompt="p", n_images=3)
    with pytest.raises(StatusError):  # still queued: may not jump to done
        await repo.finish_generation(gen.id, images(), cases={1: ("auto", "x")})
    await repo.claim(gen.id, "other")
    with pytest.raises(TakenOver):  # another process holds it
        await repo.finish_generation(gen.id, images(), owner="me", cases={1: ("auto", "x")})
    with pytest.raises(ValueError, match="source"):
        await repo.finish_generation(gen.id, images(), owner="other", cases={1: ("rumour", "x")})
    assert (await repo.get_generation(gen.id)).images == []
    assert await rows_of(repo, ModerationCase) == []
    done, _ = await repo.finish_generation(gen.id, images(), owner="other", cases={1: ("auto", "x")})
    assert done.status == "done" and len(await rows_of(repo, ModerationCase)) == 1
