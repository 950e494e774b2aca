"""One image of a result, as a user picks it from the result's menu: its full-size PNG and what may be shown.

The per-image panel (``bot.views.image_panel``) answers a pick with this image and buttons that vote on it,
report it or vary it by its id, so feedback and cases point at the image the user means, not at the best one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.outcome import is_withheld
from store.models import FlaggedMode


@dataclass(frozen=True)
class PickedImage:
    """The answer to a pick: the image (``ok``) or why it cannot be shown (``message``)."""

    ok: bool
    message: str = ""
    image_id: int | None = None
    generation_id: int | None = None
    png: bytes = field(default=b"", repr=False)
    spoiler: bool = False  # flagged by the safety checker and not approved: shown behind a spoiler


class ImagePicks:
    """Reads a picked image for a user, with the same rules as the result message it came from: a private
    generation's images are its owner's alone, a removed image is gone, a flagged one is withheld or spoilered as
    the guild's flagged mode says."""

    def __init__(self, repo: Any, flagged_mode: Callable[[int | None], Awaitable[str]]) -> None:
        self.repo = repo
        self.flagged_mode = flagged_mode

    async def pick(self, image_id: int, user_id: int) -> PickedImage:
        image = await self.repo.get_image(image_id)
        gen = None if image is None else await self.repo.get_generation(image.generation_id, with_images=False)
        if image is None or gen is None:
            return PickedImage(False, "That image no longer exists.")
        if gen.private and gen.user_id != user_id:
            return PickedImage(False, "That generation is private: only the user who made it can see its images.")
        hidden = await self.hidden_from_public(image, gen)
        if hidden is not None:
            return PickedImage(False, hidden)
        png = await asyncio.to_thread(_read, image.file_path)
        if not png:
            return PickedImage(False, "That image's file is no longer stored.")
        return PickedImage(True, image_id=image.id, generation_id=gen.id, png=png, spoiler=bool(image.hidden))


    async def hidden_from_public(self, image: Any, gen: Any) -> str | None:
        """Why the public message does not show ``image`` (its result deleted, the image removed, or withheld as the
        guild's flagged mode says),
        or None when it does. Variations go by this too: they must not copy what moderation took down."""
        if getattr(gen, "deleted_at", None) is not None:  # kept only for an open case's review
            return "That result was deleted."
        if image.id in await self.repo.removed_image_ids(gen.id):
            return "That image was removed by a moderator."
        withhold = await self.flagged_mode(gen.guild_id) == FlaggedMode.WITHHOLD.value
        if is_withheld(image.flagged, image.hidden, withhold, image.critical):
            return "That image is withheld until a moderator reviews it."
        return None


def _read(path: str | None) -> bytes:
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""
