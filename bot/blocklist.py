"""The image-hash blocklist: what moderators removed stays out when the model draws it again.

Every stored image carries its perceptual hash (``imagehash.phash``, 64 bits as 16 hex digits). Removing an image
blocks its hash in the case's guild (the operator may block one in every guild); a later image within
``max_distance`` bits of a block in force is withheld and opens a ``blocklist`` case. Unblocking goes by the
same distance, so the case of any near-copy (a re-encoded or slightly changed one) lifts the block too. Every
block and unblock is an audited ``ModerationAction`` (``store.repo.blocklist``).

A near-flat image hashes to almost no set bits, and every other near-flat image hashes the same: such hashes are
never blocked (they would withhold every plain image).
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
from PIL import Image, UnidentifiedImageError

from bot.moderation import ModerationService, Moderator, NotModerator

log = logging.getLogger(__name__)

MAX_DISTANCE = 8  # bits of 64: re-encodes and small edits stay within it; distinct images differ by ~32
PLAIN_BITS = 8  # a hash with fewer set bits than this (or more than 64 - this) comes from a near-flat image


def phash_png(png: bytes) -> str | None:
    """The image's perceptual hash as 16 hex digits, None if it cannot be read. CPU work: call it off the event
    loop (``asyncio.to_thread``)."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            return str(imagehash.phash(image))
    except (OSError, ValueError, UnidentifiedImageError):
        return None


def distance(a: str, b: str) -> int:
    """Hamming distance between two hashes (bits that differ)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


INLINE_COMPARISONS = 2000  # more hash comparisons than this run in a worker thread, off the event loop


def too_plain(phash: str) -> bool:
    bits = bin(int(phash, 16)).count("1")
    return bits < PLAIN_BITS or bits > 64 - PLAIN_BITS


@dataclass(frozen=True)
class BlockMatch:
    """The block in force nearest to an image's hash."""

    block_id: int
    phash: str
    distance: int
    guild_id: int | None  # None: blocked in every guild

    @property
    def reason(self) -> str:
        scope = "in every server" if self.guild_id is None else "in this server"
        return f"near-duplicate of blocked image hash #{self.block_id} ({scope}; {self.distance} bits apart)"


class BlocklistService:
    """Blocks, unblocks and matches; permissions are the moderation service's (the same checks as its actions)."""

    def __init__(self, repo: Any, moderation: ModerationService, *, max_distance: int = MAX_DISTANCE) -> None:
        self.repo = repo
        self.moderation = moderation
        self.max_distance = max_distance

    # -- matching (the runner, for every finished generation) -----------------------------------------

    async def matches(self, guild_id: int | None, phashes: list[str | None]) -> list[BlockMatch | None]:
        """For each hash, the nearest block in force for the guild (its own and every guild's) within
        ``max_distance``, or None. One database read for all of them."""
        if not any(phashes):
            return [None] * len(phashes)
        blocks = [(b.id, b.phash, int(b.phash, 16), b.guild_id) for b in await self.repo.active_blocks(guild_id)]
        if len(blocks) * len(phashes) > INLINE_COMPARISONS:
            return await asyncio.to_thread(_nearest, phashes, blocks, self.max_distance)
        return _nearest(phashes, blocks, self.max_distance)

    # -- blocking ---------------------------------------------------------------------------------------

    async def _image_hash(self, image_id: int | None) -> str | None:
        """The stored hash of the image, or one computed from its file (images stored before the blocklist)."""
        image = await self.repo.get_image(image_id) if image_id is not None else None
        if image is None:
            return None
        if image.phash:
            return image.phash
        if not image.file_path:
            return None
        png = await asyncio.to_thread(_read, Path(image.file_path))
        return await asyncio.to_thread(phash_png, png) if png else None

    async def block_removed(self, case: Any, actor: Moderator, reason: str | None) -> None:
        """A moderator removed the case's image: block its hash in the case's guild (audited ``block``). Called
        by ``ModerationService`` after the removal is recorded; a failure here never undoes the removal."""
        try:
            phash = await self._image_hash(case.image_id)
            if phash is None or too_plain(phash):
                log.info("case %s: the removed image has no usable hash; not blocked", case.id)
                return
            guild_id = case.guild_id if case.guild_id is not None else actor.guild_id
            await self.repo.add_block(guild_id, phash, actor.user_id, image_id=case.image_id, case_id=case.id,
                                      reason=reason or f"removed in case #{case.id}")
        except Exception:  # noqa: BLE001 - the removal stands; the block can be added by hand
            log.warning("blocking the image of case %s failed", case.id, exc_info=True)

    async def _case_hash(self, actor: Moderator, case_id: int) -> tuple[Any, str]:
        view = await self.moderation.case(actor, case_id)  # exists, and the actor moderates it
        phash = await self._image_hash(view.image_id)
        if phash is None:
            raise ValueError(f"Case #{case_id} has no image whose hash could be read.")
        return view, phash

    async def block_everywhere(self, actor: Moderator, case_id: int, reason: str | None = None) -> str:
        """The operator blocks the case's image hash in every guild (audited ``block``)."""
        if not actor.operator:
            raise NotModerator("Only the bot's operator blocks an image in every server.")
        view, phash = await self._case_hash(actor, case_id)
        if too_plain(phash):
            raise ValueError(f"Case #{case_id}'s image is too plain to block: its hash would match every plain "
                             f"image.")
        block, created = await self.repo.add_block(None, phash, actor.user_id, image_id=view.image_id,
                                                   case_id=case_id, reason=reason)
        if not created:
            return f"Image hash {phash} is already blocked in every server (block #{block.id}); nothing changed."
        return f"Image hash {phash} (case #{case_id}) is blocked in every server (block #{block.id})."

    async def unblock(self, actor: Moderator, case_id: int, reason: str | None = None) -> str:
        """Lift the blocks in force within ``max_distance`` of the case's image (audited ``unblock``): a guild's
        moderators lift their guild's blocks, the operator any block (every guild's ones too)."""
        view, phash = await self._case_hash(actor, case_id)
        if actor.operator:
            blocks = await self.repo.active_blocks(None, every_guild=True)
        else:
            guild_id = view.guild_id if view.guild_id is not None else actor.guild_id
            blocks = await self.repo.active_blocks(guild_id, include_global=False)
            blocks = [b for b in blocks if b.guild_id is not None]
        near = await asyncio.to_thread(lambda: [b for b in blocks if distance(phash, b.phash) <= self.max_distance])
        if not near:
            return f"No block in force here matches case #{case_id}'s image; nothing changed."
        lifted = await self.repo.lift_blocks([b.id for b in near], actor.user_id,
                                             guild_id=view.guild_id if view.guild_id is not None else actor.guild_id,
                                             case_id=case_id, reason=reason)
        if not lifted:
            return f"No block in force here matches case #{case_id}'s image; nothing changed."
        ids = ", ".join(f"#{b.id}" for b in lifted)
        return f"Unblocked {len(lifted)} image hash(es) ({ids}): images like case #{case_id}'s are shown again."

    async def blocks(self, actor: Moderator) -> list[Any]:
        """The blocks in force where the actor moderates (their guild's and every guild's; the operator: all)."""
        if actor.operator:
            return await self.repo.active_blocks(None, every_guild=True)
        if actor.guild_id is None or not await self.moderation.is_moderator(actor.guild_id, actor.role_ids,
                                                                            actor.can_manage_messages):
            raise NotModerator()
        return await self.repo.active_blocks(actor.guild_id)


def _nearest(phashes: list[str | None], blocks: list[tuple[int, str, int, int | None]],
             max_distance: int) -> list[BlockMatch | None]:
    """For each hash, the nearest of ``blocks`` ((id, hash, hash as int, guild)) within ``max_distance``."""
    out: list[BlockMatch | None] = []
    for phash in phashes:
        best = None
        if phash and not too_plain(phash):
            value = int(phash, 16)
            for block_id, block_hash, block_value, guild_id in blocks:
                d = (value ^ block_value).bit_count()
                if d <= max_distance and (best is None or d < best.distance):
                    best = BlockMatch(block_id, block_hash, d, guild_id)
        out.append(best)
    return out


def blocks_text(blocks: list[Any]) -> str:
    """The ``blocklist`` listing, one line a block."""
    if not blocks:
        return "No image hashes are blocked."
    lines = ["**Blocked image hashes** (unblock with the case of the image or of any near-copy)"]
    for b in blocks[:25]:
        scope = "every server" if b.guild_id is None else f"server {b.guild_id}"
        case = f"case #{b.case_id}" if b.case_id is not None else "no case"
        lines.append(f"#{b.id} `{b.phash}` · {scope} · {case} · by <@{b.moderator_id}> "
                     f"<t:{int(b.created_at.timestamp())}:R>" + (f" · {b.reason[:100]}" if b.reason else ""))
    if len(blocks) > 25:
        lines.append(f"… and {len(blocks) - 25} more")
    return "\n".join(lines)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
