"""The image-hash blocklist: perceptual hashes of removed images, per guild (or for every guild: ``guild_id``
NULL). Each block and each lifting is written with its audited ``ModerationAction`` in one transaction. The
Hamming-distance matching is the caller's (``bot.blocklist``): the repository stores and lists hashes."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import or_, select

from store.models import ImageBlock, ModAction, ModerationAction
from store.repo.base import RepositoryBase


def _check_phash(phash: str) -> str:
    """A 64-bit hash as 16 lowercase hex digits, or ValueError."""
    text = str(phash or "").strip().lower()
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"a perceptual hash is 16 hex digits; got {phash!r}")
    return text


class BlocklistRepository(RepositoryBase):
    """Blocked perceptual hashes and their audit."""

    async def add_block(self, guild_id: int | None, phash: str, moderator_id: int, *, image_id: int | None = None,
                        case_id: int | None = None, reason: str | None = None) -> tuple[ImageBlock, bool]:
        """Block ``phash`` in the guild (None: every guild), audited as ``block``. The same hash already blocked
        there is returned as it is (``created`` False, nothing written)."""
        phash = _check_phash(phash)
        async with self.sessions.begin() as s:
            scope = ImageBlock.guild_id.is_(None) if guild_id is None else ImageBlock.guild_id == guild_id
            existing = (await s.execute(select(ImageBlock).where(
                scope, ImageBlock.phash == phash, ImageBlock.lifted_at.is_(None)).limit(1))).scalar_one_or_none()
            if existing is not None:
                return existing, False
            now = self.now()
            block = ImageBlock(guild_id=guild_id, phash=phash, image_id=image_id, case_id=case_id,
                               moderator_id=moderator_id, reason=reason, created_at=now)
            s.add(block)
            s.add(ModerationAction(case_id=case_id, moderator_id=moderator_id, guild_id=guild_id,
                                   action=ModAction.BLOCK.value,
                                   reason=f"image hash {phash}" + (f": {reason}" if reason else ""), created_at=now))
        return block, True

    async def active_blocks(self, guild_id: int | None, *, include_global: bool = True,
                            every_guild: bool = False) -> list[ImageBlock]:
        """Blocks in force: the guild's and (``include_global``) those for every guild, oldest first;
        ``every_guild``: all of them, whatever their guild (the operator's view)."""
        stmt = select(ImageBlock).where(ImageBlock.lifted_at.is_(None)).order_by(ImageBlock.id)
        if not every_guild:
            scopes = [ImageBlock.guild_id.is_(None)] if include_global or guild_id is None else []
            if guild_id is not None:
                scopes.append(ImageBlock.guild_id == guild_id)
            stmt = stmt.where(or_(*scopes))
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def lift_blocks(self, block_ids: Iterable[int], moderator_id: int, *, guild_id: int | None,
                          case_id: int | None = None, reason: str | None = None) -> list[ImageBlock]:
        """Lift the blocks still in force among ``block_ids``, audited as one ``unblock`` (none in force: nothing
        written). Returns the blocks lifted."""
        ids = sorted({int(i) for i in block_ids})
        if not ids:
            return []
        async with self.sessions.begin() as s:
            blocks = list((await s.execute(select(ImageBlock).where(
                ImageBlock.id.in_(ids), ImageBlock.lifted_at.is_(None)).with_for_update())).scalars())
            if not blocks:
                return []
            now = self.now()
            for block in blocks:
                block.lifted_at, block.lifted_by = now, moderator_id
            hashes = ", ".join(sorted({b.phash for b in blocks}))
            s.add(ModerationAction(case_id=case_id, moderator_id=moderator_id, guild_id=guild_id,
                                   action=ModAction.UNBLOCK.value,
                                   reason=f"image hash {hashes}" + (f": {reason}" if reason else ""),
                                   created_at=now))
        return blocks
