"""A generation's images: stored with the exact image tokens the model sampled (packed as int16), so feedback
on an image can train the model on the sequence it produced."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from store.models import Generation, Image, Status, encode_tokens
from store.repo.base import NotFound, RepositoryBase
from store.repo.generations import check_owner, lock_for_move, stamp_move


@dataclass(frozen=True)
class NewImage:
    """One image to store. ``tokens``: the exact int image codes sampled (stored as int16)."""

    index: int
    tokens: np.ndarray | Sequence[int] | None
    rank: int | None = None
    file_path: str | None = None
    sha256: str | None = None
    clip_score: float | None = None
    safety_scores: Mapping[str, float] | None = None
    flagged: bool = False
    hidden: bool = False

    @classmethod
    def from_generated(cls, image: Any, *, file_path: str | None = None, sha256: str | None = None,
                       hidden: bool | None = None) -> NewImage:
        """From an ``engine.api.GeneratedImage`` (duck-typed: index, rank, tokens, clip_score, safety, flagged)."""
        flagged = bool(image.flagged)
        return cls(
            index=int(image.index),
            tokens=image.tokens,
            rank=int(image.rank),
            file_path=file_path,
            sha256=sha256,
            clip_score=float(image.clip_score),
            safety_scores={k: float(v) for k, v in dict(image.safety).items()},
            flagged=flagged,
            hidden=flagged if hidden is None else hidden,
        )


def _image_rows(generation_id: int, images: Iterable[NewImage], now: datetime) -> list[Image]:
    """The rows of ``images`` for ``generation_id``, stamped ``now``."""
    return [
        Image(
            generation_id=generation_id,
            index=im.index,
            rank=im.rank,
            token_bytes=encode_tokens(im.tokens),
            file_path=im.file_path,
            sha256=im.sha256,
            clip_score=im.clip_score,
            safety_scores=dict(im.safety_scores or {}),
            flagged=im.flagged,
            hidden=im.hidden,
            created_at=now,
        )
        for im in images
    ]


class ImageRepository(RepositoryBase):
    """A generation's images."""

    async def add_images(self, generation_id: int, images: Iterable[NewImage], *,
                         owner: str | None = None) -> list[Image]:
        """Store a generation's images (tokens packed as int16). Returns them in the order given. ``owner``: as
        in :meth:`set_status`."""
        rows = _image_rows(generation_id, images, self.now())
        async with self.sessions.begin() as s:
            gen = await s.get(Generation, generation_id, with_for_update=owner is not None)
            if gen is None:
                raise NotFound(f"generation {generation_id} does not exist")
            check_owner(gen, owner)
            s.add_all(rows)
        return rows

    async def finish_generation(
        self, generation_id: int, images: Iterable[NewImage], *, checkpoint_id: str | None = None,
        attention: str | None = None, owner: str | None = None,
    ) -> tuple[Generation, list[Image]]:
        """``add_images`` and ``set_status(done)`` in one transaction (one round trip, one write lock): the
        images are stored and the job is done, or neither. Same errors as those two."""
        rows = _image_rows(generation_id, images, self.now())
        async with self.sessions.begin() as s:
            gen = await lock_for_move(s, generation_id, Status.DONE.value, owner)
            s.add_all(rows)
            stamp_move(gen, Status.DONE.value, self.now(), checkpoint_id=checkpoint_id, attention=attention)
        return gen, rows

    async def get_image(self, image_id: int) -> Image | None:
        async with self._read() as s:
            return await s.get(Image, image_id)
