"""The feedback dataset's source: every judged image with the exact tokens it was sampled as, its prompt and model
id, its votes (with the reasons given for 👎), its reports with their reasons and the moderators' decisions on it
(``training.feedback`` turns this into preference data).

Consent is applied here, where the rows are: an image whose author opted out (``UserState.opted_out``) is left
out with everything said about it, and a vote or report by a user who opted out is left out too. Only counts of
what was left out leave the database.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import select, union

from store.models import CaseStatus, Feedback, FeedbackKind, Generation, Image, ModerationCase, UserState, decode_tokens
from store.repo.base import RepositoryBase

#: case outcomes that are a moderator's judgement of the image (open cases are not decided yet)
DECIDED = (CaseStatus.APPROVED.value, CaseStatus.REMOVED.value, CaseStatus.DISMISSED.value)


@dataclass(frozen=True)
class JudgedImage:
    """One image someone said something about, with what was said (from consenting users only)."""

    image_id: int
    generation_id: int
    author_id: int
    prompt: str
    normalized_prompt: str
    tokens: np.ndarray
    checkpoint_id: str | None
    clip_score: float | None
    up: int
    down: int
    report_reasons: tuple[str, ...]  # one per report ("" where the reporter gave none)
    decisions: tuple[str, ...]  # closed cases' statuses, oldest first: approved / removed / dismissed
    created_at: datetime
    down_reasons: tuple[str, ...] = ()  # the reasons given with 👎 votes (votes without one give none)

    @property
    def removed(self) -> bool:
        return CaseStatus.REMOVED.value in self.decisions


@dataclass(frozen=True)
class DatasetSource:
    images: list[JudgedImage]  # by image id
    opted_out_images: int  # judged images left out because their author opted out
    opted_out_feedback: int  # votes and reports left out because their giver opted out


class DatasetRepository(RepositoryBase):
    """The training loop's read of feedback and decisions."""

    async def dataset_source(self) -> DatasetSource:
        """Every image with stored tokens that has a vote, a report or a decided case, as :class:`JudgedImage`,
        with consent applied (see the module's note). One read-only transaction, so the three reads agree."""
        judged = union(
            select(Feedback.image_id),
            select(ModerationCase.image_id).where(ModerationCase.image_id.is_not(None),
                                                  ModerationCase.status.in_(DECIDED)),
        ).subquery()
        author = UserState.__table__.alias("author_state")
        giver = UserState.__table__.alias("giver_state")
        images_stmt = (
            select(Image.id, Image.generation_id, Image.token_bytes, Image.clip_score, Image.created_at,
                   Generation.user_id, Generation.prompt, Generation.normalized_prompt, Generation.checkpoint_id,
                   author.c.opted_out)
            .join(Generation, Generation.id == Image.generation_id)
            .outerjoin(author, author.c.user_id == Generation.user_id)
            .where(Image.id.in_(select(judged.c.image_id)), Image.token_bytes.is_not(None))
            .order_by(Image.id)
        )
        feedback_stmt = (
            select(Feedback.image_id, Feedback.kind, Feedback.reason, giver.c.opted_out)
            .outerjoin(giver, giver.c.user_id == Feedback.user_id)
            .order_by(Feedback.id)
        )
        cases_stmt = (
            select(ModerationCase.image_id, ModerationCase.status)
            .where(ModerationCase.image_id.is_not(None), ModerationCase.status.in_(DECIDED))
            .order_by(ModerationCase.closed_at, ModerationCase.id)
        )
        async with self._read() as s:
            image_rows = (await s.execute(images_stmt)).all()
            feedback_rows = (await s.execute(feedback_stmt)).all()
            case_rows = (await s.execute(cases_stmt)).all()

        kept = {r.id for r in image_rows if not r.opted_out}
        votes: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        reasons: dict[int, list[str]] = defaultdict(list)
        down_reasons: dict[int, list[str]] = defaultdict(list)
        left_out_feedback = 0
        for image_id, kind, reason, opted_out in feedback_rows:
            if image_id not in kept:
                continue
            if opted_out:
                left_out_feedback += 1
            elif kind == FeedbackKind.REPORT.value:
                reasons[image_id].append(reason or "")
            else:
                votes[image_id][kind] += 1
                if kind == FeedbackKind.DOWN.value and reason:
                    down_reasons[image_id].append(reason)
        decisions: dict[int, list[str]] = defaultdict(list)
        for image_id, status in case_rows:
            decisions[image_id].append(status)

        out = []
        for r in image_rows:
            if r.opted_out:
                continue
            if not (votes[r.id]["up"] or votes[r.id]["down"] or reasons[r.id] or decisions[r.id]):
                continue  # only an opted-out user had said something about it
            out.append(JudgedImage(
                image_id=r.id, generation_id=r.generation_id, author_id=r.user_id, prompt=r.prompt,
                normalized_prompt=r.normalized_prompt, tokens=decode_tokens(r.token_bytes),
                checkpoint_id=r.checkpoint_id, clip_score=r.clip_score, up=votes[r.id]["up"],
                down=votes[r.id]["down"], report_reasons=tuple(reasons[r.id]), decisions=tuple(decisions[r.id]),
                created_at=r.created_at, down_reasons=tuple(down_reasons[r.id])))
        return DatasetSource(images=out, opted_out_images=sum(1 for r in image_rows if r.opted_out),
                             opted_out_feedback=left_out_feedback)
