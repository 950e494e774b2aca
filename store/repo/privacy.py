"""A user's own data: everything stored about them (for an export), and its deletion.

Deletion keeps what an open moderation case still needs, so a user cannot make evidence disappear while it is
being reviewed: a generation with an open case on it or on one of its images, their reports on an image with an
open case, and their refused prompts while a refusals case about them is open. Jobs still queued or running are
kept too (the workers own them). Strikes, bans and the audit trail are moderation records, not the user's to
delete. The deletion itself is audited (``ModerationAction`` ``delete``, counts only, never a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import selectinload

from store.models import (
    FINISHED_STATUSES,
    CaseSource,
    CaseStatus,
    Feedback,
    FeedbackKind,
    Generation,
    GuildBan,
    Image,
    ModAction,
    ModerationAction,
    ModerationCase,
    Refusal,
    Strike,
    UserState,
)
from store.repo.base import RepositoryBase


@dataclass(frozen=True)
class UserData:
    """Everything stored about one user, oldest first."""

    user_id: int
    state: UserState | None
    generations: list[Generation]  # with their images loaded
    feedback: list[Feedback]  # their votes and reports
    refusals: list[Refusal]
    strikes: list[Strike]
    bans: list[GuildBan]
    cases: list[ModerationCase]  # cases on their images or about them


@dataclass(frozen=True)
class Deletion:
    """What a deletion removed (or, as a preview, would remove) and what it kept and why."""

    generations: int = 0
    images: int = 0
    feedback: int = 0
    refusals: int = 0
    kept_for_cases: int = 0  # generations an open case needs
    kept_reports: int = 0  # reports an open case answers
    kept_refusals: int = 0  # refusals an open refusals case is about
    in_progress: int = 0  # generations still queued or running
    files: list[str] = field(default_factory=list)  # the deleted images' files, for the caller to remove

    @property
    def nothing(self) -> bool:
        return not (self.generations or self.feedback or self.refusals)


class PrivacyRepository(RepositoryBase):
    """A user's export and deletion."""

    async def user_data(self, user_id: int) -> UserData:
        async with self._read() as s:
            gens = list((await s.execute(
                select(Generation).where(Generation.user_id == user_id).options(selectinload(Generation.images))
                .order_by(Generation.id))).scalars())
            gen_ids = [g.id for g in gens]
            case_filter = [ModerationCase.user_id == user_id]
            if gen_ids:
                case_filter.append(ModerationCase.generation_id.in_(gen_ids))
            return UserData(
                user_id=user_id,
                state=await s.get(UserState, user_id),
                generations=gens,
                feedback=list((await s.execute(select(Feedback).where(Feedback.user_id == user_id)
                                               .order_by(Feedback.id))).scalars()),
                refusals=list((await s.execute(select(Refusal).where(Refusal.user_id == user_id)
                                               .order_by(Refusal.id))).scalars()),
                strikes=list((await s.execute(select(Strike).where(Strike.user_id == user_id)
                                              .order_by(Strike.id))).scalars()),
                bans=list((await s.execute(select(GuildBan).where(GuildBan.user_id == user_id)
                                           .order_by(GuildBan.id))).scalars()),
                cases=list((await s.execute(select(ModerationCase).where(or_(*case_filter))
                                            .order_by(ModerationCase.id))).scalars()),
            )

    async def delete_user_data(self, user_id: int, *, dry_run: bool = False) -> Deletion:
        """Delete the user's finished generations (their images, and the votes on those go with them), their
        votes and reports, and their refused prompts, except what an open case needs (see the module's note).
        ``dry_run``: count only, change nothing (the confirmation's preview). Audited when anything went."""
        async with self.sessions.begin() as s:
            gens = (await s.execute(select(Generation.id, Generation.status)
                                    .where(Generation.user_id == user_id))).all()
            finished = [g.id for g in gens if g.status in FINISHED_STATUSES]
            in_progress = len(gens) - len(finished)
            open_cases = (await s.execute(
                select(ModerationCase.generation_id, ModerationCase.image_id, ModerationCase.source,
                       ModerationCase.user_id)
                .where(ModerationCase.status == CaseStatus.OPEN.value))).all()
            open_images = {c.image_id for c in open_cases if c.image_id is not None}
            needed = {c.generation_id for c in open_cases if c.generation_id is not None}
            if open_images:
                needed |= set((await s.execute(select(Image.generation_id)
                                               .where(Image.id.in_(open_images)))).scalars())
            doomed = [g for g in finished if g not in needed]
            kept_for_cases = len(finished) - len(doomed)
            images = (await s.execute(select(Image.id, Image.file_path)
                                      .where(Image.generation_id.in_(doomed)))).all() if doomed else []

            mine = (await s.execute(select(Feedback.id, Feedback.kind, Feedback.image_id)
                                    .where(Feedback.user_id == user_id))).all()
            kept_reports = [f.id for f in mine if f.kind == FeedbackKind.REPORT.value and f.image_id in open_images]
            feedback_ids = [f.id for f in mine if f.id not in set(kept_reports)]

            refusals_case = any(c.source == CaseSource.REFUSALS.value and c.user_id == user_id for c in open_cases)
            refusal_ids = list((await s.execute(select(Refusal.id).where(Refusal.user_id == user_id))).scalars())
            kept_refusals = len(refusal_ids) if refusals_case else 0
            if refusals_case:
                refusal_ids = []

            result = Deletion(generations=len(doomed), images=len(images), feedback=len(feedback_ids),
                              refusals=len(refusal_ids), kept_for_cases=kept_for_cases,
                              kept_reports=len(kept_reports), kept_refusals=kept_refusals, in_progress=in_progress,
                              files=[i.file_path for i in images if i.file_path])
            if dry_run:
                await s.rollback()
                return result
            if feedback_ids:
                await s.execute(delete(Feedback).where(Feedback.id.in_(feedback_ids)))
            if refusal_ids:
                await s.execute(delete(Refusal).where(Refusal.id.in_(refusal_ids)))
            if doomed:  # images, and everyone's votes on them, go with them (ON DELETE CASCADE)
                await s.execute(delete(Generation).where(Generation.id.in_(doomed)))
            if not result.nothing:
                s.add(ModerationAction(
                    moderator_id=user_id, action=ModAction.DELETE.value, target_user_id=user_id,
                    reason=(f"privacy delete by the user: {result.generations} generation(s), {result.images} "
                            f"image(s), {result.feedback} vote(s)/report(s), {result.refusals} refusal(s); kept "
                            f"{result.kept_for_cases} generation(s) and {result.kept_reports} report(s) for open "
                            f"cases, {result.kept_refusals} refusal(s) for an open refusals case"),
                    created_at=self.now()))
        return result
