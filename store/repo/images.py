"""A generation's images: stored with the exact image tokens the model sampled (packed as int16), so feedback
on an image can train the model on the sequence it produced."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, or_, select

from store.models import (
    CaseSource,
    CaseStatus,
    Generation,
    Image,
    ModAction,
    ModerationAction,
    ModerationCase,
    Status,
    encode_tokens,
)
from store.repo.base import NotFound, RepositoryBase, check_choice
from store.repo.generations import check_owner, lock_for_move, stamp_move


@dataclass(frozen=True)
class DeletedResult:
    """What :meth:`ImageRepository.delete_result` did: ``deleted`` (the rows went; ``file_paths`` are the image files
    the caller may now remove) or kept because open case(s) ``kept_for`` still need them."""

    generation_id: int
    user_id: int
    deleted: bool
    file_paths: tuple[str, ...] = ()
    kept_for: tuple[int, ...] = ()


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
    phash: str | None = None  # perceptual hash (16 hex digits), for the image-hash blocklist
    critical: bool = False  # flagged for a critical concept: withheld whatever the guild's flagged mode

    @classmethod
    def from_generated(cls, image: Any, *, file_path: str | None = None, sha256: str | None = None,
                       hidden: bool | None = None, phash: str | None = None) -> NewImage:
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
            phash=phash,
            critical=bool(getattr(image, "critical", False)),
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
            phash=im.phash,
            critical=im.critical,
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
        cases: Mapping[int, tuple[str, str | None]] | None = None,
    ) -> tuple[Generation, list[Image]]:
        """``add_images``, the review cases of flagged or blocked images (``cases``: image index → (case source,
        reason)) and ``set_status(done)`` in one transaction: the images are stored, their cases open and the job
        done, or none of it. Same errors as ``add_images`` and ``set_status``."""
        rows = _image_rows(generation_id, images, self.now())
        cases = dict(cases or {})
        for source, _ in cases.values():
            check_choice("source", source, CaseSource)
        async with self.sessions.begin() as s:
            gen = await lock_for_move(s, generation_id, Status.DONE.value, owner)
            s.add_all(rows)
            if cases:
                await s.flush()  # the images' ids
                now = self.now()
                s.add_all(ModerationCase(image_id=row.id, generation_id=generation_id, guild_id=gen.guild_id,
                                         user_id=gen.user_id, source=cases[row.index][0],
                                         status=CaseStatus.OPEN.value, reason=cases[row.index][1], opened_at=now)
                          for row in rows if row.index in cases)
            stamp_move(gen, Status.DONE.value, self.now(), checkpoint_id=checkpoint_id, attention=attention)
        return gen, rows

    async def get_image(self, image_id: int) -> Image | None:
        async with self._read() as s:
            return await s.get(Image, image_id)

    async def delete_result(self, generation_id: int, actor_id: int, *, guild_id: int | None = None,
                            reason: str | None = None) -> DeletedResult | None:
        """A result taken down by its author (or a moderator): its rows (the generation, its images and their
        feedback) are deleted unless an open moderation case refers to it, and the deletion is audited
        (``ModAction.DELETE``) in the same transaction. Closed cases keep their audit trail (their references
        become NULL). None when the generation does not exist (deleted already)."""
        async with self.sessions.begin() as s:
            gen = await s.get(Generation, generation_id, with_for_update=True)
            if gen is None:
                return None
            open_cases = await _open_cases(s, generation_id)
            paths = await _file_paths(s, generation_id)
            s.add(ModerationAction(case_id=None, moderator_id=actor_id, action=ModAction.DELETE.value,
                                   guild_id=guild_id if guild_id is not None else gen.guild_id,
                                   target_user_id=gen.user_id, reason=reason, created_at=self.now()))
            result = DeletedResult(generation_id, gen.user_id, deleted=not open_cases,
                                   file_paths=() if open_cases else paths, kept_for=tuple(open_cases))
            if not open_cases:
                # the database's ON DELETE rules take the images and feedback with it and unlink closed cases
                await s.execute(delete(Generation).where(Generation.id == generation_id))
            elif gen.deleted_at is None:
                gen.deleted_at = self.now()  # finish_deleted_result deletes it once the cases are decided
        return result

    async def mark_result_deleted(self, generation_id: int, deleted: bool = True) -> bool | None:
        """Mark (or unmark) a result as taken down by its author, before its public message goes: the message's
        delete event then leaves the open cases on it to the moderators (``close_cases_of_messages`` skips it).
        None when the generation does not exist; else whether this call changed the mark."""
        async with self.sessions.begin() as s:
            gen = await s.get(Generation, generation_id, with_for_update=True)
            if gen is None:
                return None
            if (gen.deleted_at is not None) == deleted:
                return False
            gen.deleted_at = self.now() if deleted else None
            return True

    async def deleted_results_before(self, cutoff: datetime, limit: int = 100) -> list[int]:
        """Results marked deleted before ``cutoff`` whose rows are still here (waiting for a case, or left by a
        crash between a decision and :meth:`finish_deleted_result`), oldest first."""
        async with self._read() as s:
            return list((await s.execute(
                select(Generation.id).where(Generation.deleted_at.is_not(None), Generation.deleted_at < cutoff)
                .order_by(Generation.deleted_at, Generation.id).limit(limit))).scalars())

    async def finish_deleted_result(self, generation_id: int) -> tuple[str, ...] | None:
        """A case on a result its author deleted was decided: once no open case needs it, its rows go as
        :meth:`delete_result` would have deleted them. Returns the image files to remove; None when nothing went
        (not marked deleted, gone already, or a case is still open)."""
        async with self.sessions.begin() as s:
            gen = await s.get(Generation, generation_id, with_for_update=True)
            if gen is None or gen.deleted_at is None or await _open_cases(s, generation_id):
                return None
            paths = await _file_paths(s, generation_id)
            await s.execute(delete(Generation).where(Generation.id == generation_id))
        return paths


async def _open_cases(s: Any, generation_id: int) -> list[int]:
    """The open cases on a generation or on one of its images."""
    image_ids = select(Image.id).where(Image.generation_id == generation_id)
    return list((await s.execute(
        select(ModerationCase.id).where(
            ModerationCase.status == CaseStatus.OPEN.value,
            or_(ModerationCase.generation_id == generation_id, ModerationCase.image_id.in_(image_ids)))
        .order_by(ModerationCase.id))).scalars())


async def _file_paths(s: Any, generation_id: int) -> tuple[str, ...]:
    return tuple((await s.execute(select(Image.file_path).where(
        Image.generation_id == generation_id, Image.file_path.is_not(None)))).scalars())
