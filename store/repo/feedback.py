"""Feedback on images: 👍/👎 votes and reports, and their export with the exact image tokens for training.

Training uses a user's data only with their consent: the export leaves out feedback from, and on generations by,
users who opted out (``UserState.opted_out``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import or_, select, text
from sqlalchemy.dialects import postgresql, sqlite

from store.models import Feedback, FeedbackKind, FeedbackReason, Generation, Image, UserState, decode_tokens
from store.repo.base import NotFound, RepositoryBase, check_choice


@dataclass(frozen=True)
class FeedbackRecord:
    """One feedback row joined with what training needs: the prompt and the exact tokens that were judged."""

    feedback_id: int
    image_id: int
    generation_id: int
    user_id: int
    kind: str
    reason: str | None
    prompt: str
    normalized_prompt: str
    tokens: np.ndarray
    checkpoint_id: str | None
    clip_score: float | None
    created_at: datetime


class FeedbackRepository(RepositoryBase):
    """Votes, reports and the training export."""

    async def record_feedback(
        self, image_id: int, user_id: int, kind: str, *, reason: str | None = None, note: str | None = None
    ) -> Feedback:
        """Record 👍/👎 (one vote per user per image: a new vote replaces the old) or a report (one per user
        per image: a repeat updates reason/note). Atomic upsert on both databases."""
        kind = check_choice("kind", kind, FeedbackKind)  # type: ignore[assignment]
        reason = check_choice("reason", reason, FeedbackReason, nullable=True)
        vote = kind in (FeedbackKind.UP, FeedbackKind.DOWN)
        where = "kind IN ('up', 'down')" if vote else "kind = 'report'"
        values = {
            "image_id": image_id,
            "user_id": user_id,
            "kind": kind,
            "reason": reason,
            "note": note,
            "created_at": self.now(),
        }
        async with self.sessions.begin() as s:
            insert = postgresql.insert if s.bind.dialect.name == "postgresql" else sqlite.insert
            stmt = insert(Feedback).values(**values)
            stmt = stmt.on_conflict_do_update(
                index_elements=[Feedback.image_id, Feedback.user_id],
                index_where=text(where),
                set_={"kind": stmt.excluded.kind, "reason": stmt.excluded.reason, "note": stmt.excluded.note,
                      "created_at": stmt.excluded.created_at},
            ).returning(Feedback.id)
            if await s.get(Image, image_id) is None:
                raise NotFound(f"image {image_id} does not exist")
            fid = (await s.execute(stmt)).scalar_one()
            row = (
                await s.execute(select(Feedback).where(Feedback.id == fid).execution_options(populate_existing=True))
            ).scalar_one()
        return row


    async def feedback_export(
        self,
        *,
        since: datetime | None = None,
        kinds: Sequence[str] | None = None,
        include_opted_out: bool = False,
    ) -> list[FeedbackRecord]:
        """Feedback joined with prompt and image tokens, oldest first, for preference fine-tuning.

        Skips images without stored tokens and (unless ``include_opted_out``) feedback from, or on generations
        by, users who opted out.
        """
        author = UserState.__table__.alias("author_state")
        voter = UserState.__table__.alias("voter_state")
        stmt = (
            select(Feedback, Image.generation_id, Image.token_bytes, Image.clip_score, Generation)
            .join(Image, Image.id == Feedback.image_id)
            .join(Generation, Generation.id == Image.generation_id)
            .where(Image.token_bytes.is_not(None))
            .order_by(Feedback.created_at, Feedback.id)
        )
        if not include_opted_out:
            stmt = (
                stmt.outerjoin(author, author.c.user_id == Generation.user_id)
                .outerjoin(voter, voter.c.user_id == Feedback.user_id)
                .where(
                    or_(author.c.opted_out.is_(None), author.c.opted_out.is_(False)),
                    or_(voter.c.opted_out.is_(None), voter.c.opted_out.is_(False)),
                )
            )
        if since is not None:
            stmt = stmt.where(Feedback.created_at >= since)
        if kinds is not None:
            for k in kinds:
                check_choice("kind", k, FeedbackKind)
            stmt = stmt.where(Feedback.kind.in_(list(kinds)))
        async with self._read() as s:
            rows = (await s.execute(stmt)).all()
        out = []
        for fb, generation_id, blob, clip_score, gen in rows:
            out.append(
                FeedbackRecord(
                    feedback_id=fb.id,
                    image_id=fb.image_id,
                    generation_id=generation_id,
                    user_id=fb.user_id,
                    kind=fb.kind,
                    reason=fb.reason,
                    prompt=gen.prompt,
                    normalized_prompt=gen.normalized_prompt,
                    tokens=decode_tokens(blob),
                    checkpoint_id=gen.checkpoint_id,
                    clip_score=clip_score,
                    created_at=fb.created_at,
                )
            )
        return out
