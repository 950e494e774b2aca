"""What the moderators' web page reads and writes beyond the moderation service's own queries: one-time sign-in
links (redeemed once, atomically, whichever process serves the page), the case queue with its filters and search,
the audit log, and the dashboard's daily counts. Every query takes the guilds the reader may see (None: all)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import String, cast, delete, func, or_, select, update

from store.models import (
    CaseStatus,
    Feedback,
    FeedbackKind,
    Generation,
    Image,
    ModerationAction,
    ModerationCase,
    Refusal,
    WebSignIn,
)
from store.repo.base import RepositoryBase


@dataclass(frozen=True)
class QueueRow:
    case: ModerationCase
    prompt: str | None
    author_id: int | None
    seed: int | None
    model_id: str | None
    safety_scores: dict[str, Any]
    report_reasons: list[str]


@dataclass(frozen=True)
class DailyCounts:
    days: list[str]  # ISO dates, oldest first
    requests: list[int]
    flags: list[int]
    reports: list[int]
    refusals_by_reason: dict[str, int]
    open_cases: int
    median_decision_s: float | None


def _day(column: Any, dialect: str) -> Any:
    """A timestamp's UTC day as YYYY-MM-DD in SQL: SQLite keeps UTC text, PostgreSQL a timestamptz."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.substr(column, 1, 10)


def _scope(column: Any, guild_ids: list[int] | None) -> Any:
    return True if guild_ids is None else column.in_(guild_ids or [-1])


class WebRepository(RepositoryBase):
    # -- one-time sign-in links ------------------------------------------------------------------------

    async def create_sign_in(self, token_hash: str, user_id: int, *, operator: bool, grants: dict[str, Any],
                             ttl: timedelta) -> WebSignIn:
        """Store a link (its secret's hash); expired links are deleted on the way."""
        now = self.now()
        async with self.sessions.begin() as s:
            await s.execute(delete(WebSignIn).where(WebSignIn.expires_at < now - timedelta(days=1)))
            row = WebSignIn(token_hash=token_hash, user_id=user_id, operator=operator, grants=grants,
                            created_at=now, expires_at=now + ttl)
            s.add(row)
        return row

    async def redeem_sign_in(self, token_hash: str, *, session_ttl: timedelta | None = None) -> WebSignIn | None:
        """Mark the link used if it is unused and unexpired; the link for the one caller that did, else None.
        ``session_ttl``: the row then stands for the session it opens, live until then (or until signed out)."""
        now = self.now()
        extra = {"expires_at": now + session_ttl} if session_ttl is not None else {}
        async with self.sessions.begin() as s:
            done = await s.execute(update(WebSignIn).where(
                WebSignIn.token_hash == token_hash, WebSignIn.used_at.is_(None), WebSignIn.expires_at > now,
            ).values(used_at=now, **extra))
            if done.rowcount != 1:
                return None
            return (await s.execute(select(WebSignIn).where(WebSignIn.token_hash == token_hash))).scalar_one()

    async def sign_in_live(self, token_hash: str) -> bool:
        """Whether the session a redeemed link opened still holds (not signed out, not past its lifetime)."""
        async with self._read() as s:
            found = await s.execute(select(WebSignIn.token_hash).where(
                WebSignIn.token_hash == token_hash, WebSignIn.used_at.is_not(None), WebSignIn.expires_at > self.now()))
            return found.first() is not None

    async def end_sign_in(self, token_hash: str) -> None:
        """Sign-out: the session ends here, so a copy of its cookie stops working too."""
        async with self.sessions.begin() as s:
            await s.execute(update(WebSignIn).where(WebSignIn.token_hash == token_hash).values(expires_at=self.now()))

    # -- the queue ---------------------------------------------------------------------------------------

    async def queue(self, guild_ids: list[int] | None, *, status: str | None = CaseStatus.OPEN.value,
                    source: str | None = None, older_than: timedelta | None = None, search: str | None = None,
                    limit: int = 100) -> list[QueueRow]:
        """Cases (open ones oldest first) with what a moderator judges them by. ``search``: a case number
        (``#12`` or ``12``), an author's user id, or words of the prompt."""
        stmt = (select(ModerationCase, Generation.prompt, Generation.user_id, Generation.seed, Generation.checkpoint_id,
                       Image.safety_scores)
                .outerjoin(Generation, Generation.id == ModerationCase.generation_id)
                .outerjoin(Image, Image.id == ModerationCase.image_id)
                .where(_scope(ModerationCase.guild_id, guild_ids))
                .order_by(ModerationCase.opened_at, ModerationCase.id).limit(limit))
        if status:
            stmt = stmt.where(ModerationCase.status == status)
        if source:
            stmt = stmt.where(ModerationCase.source == source)
        if older_than is not None:
            stmt = stmt.where(ModerationCase.opened_at <= self.now() - older_than)
        if search and search.strip():
            term = search.strip()
            number = term.lstrip("#")
            conditions = [func.lower(Generation.prompt).contains(term.lower(), autoescape=True)]
            if number.isdigit():
                conditions += [ModerationCase.id == int(number), Generation.user_id == int(number),
                               ModerationCase.user_id == int(number)]
            stmt = stmt.where(or_(*conditions))
        async with self._read() as s:
            rows = (await s.execute(stmt)).all()
            image_ids = [case.image_id for case, *_ in rows if case.image_id is not None]
            reasons: dict[int, list[str]] = {}
            if image_ids:
                reports = select(Feedback.image_id, Feedback.reason).where(
                    Feedback.image_id.in_(image_ids), Feedback.kind == FeedbackKind.REPORT.value)
                for image_id, reason in (await s.execute(reports)).all():
                    reasons.setdefault(image_id, []).append(reason or "other")
        return [QueueRow(case, prompt, author if author is not None else case.user_id, seed, model,
                         dict(scores or {}), reasons.get(case.image_id, []) if case.image_id else [])
                for case, prompt, author, seed, model, scores in rows]

    async def generation_images(self, generation_id: int) -> list[Image]:
        """Every image of a generation, in the result's order."""
        stmt = select(Image).where(Image.generation_id == generation_id).order_by(Image.rank, Image.index)
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def user_generations(self, user_id: int, guild_id: int | None,
                               limit: int = 20) -> list[tuple[Generation, int | None]]:
        """A user's newest generations in a guild, each with its best image's id (None: no image stored)."""
        best = (select(Image.id).where(Image.generation_id == Generation.id)
                .order_by(Image.rank, Image.index).limit(1).scalar_subquery())
        stmt = (select(Generation, best).where(Generation.user_id == user_id, Generation.guild_id == guild_id)
                .order_by(Generation.id.desc()).limit(limit))
        async with self._read() as s:
            return [(gen, image_id) for gen, image_id in (await s.execute(stmt)).all()]

    # -- the audit log -----------------------------------------------------------------------------------

    async def audit_log(self, guild_ids: list[int] | None, *, action: str | None = None,
                        moderator_id: int | None = None, case_id: int | None = None, user_id: int | None = None,
                        limit: int = 200) -> list[ModerationAction]:
        """Audited actions, newest first. A reader limited to guilds sees those guilds' actions only."""
        stmt = (select(ModerationAction).where(_scope(ModerationAction.guild_id, guild_ids))
                .order_by(ModerationAction.id.desc()).limit(limit))
        if action:
            stmt = stmt.where(ModerationAction.action == action)
        if moderator_id is not None:
            stmt = stmt.where(ModerationAction.moderator_id == moderator_id)
        if case_id is not None:
            stmt = stmt.where(ModerationAction.case_id == case_id)
        if user_id is not None:
            stmt = stmt.where(ModerationAction.target_user_id == user_id)
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    # -- the dashboard -----------------------------------------------------------------------------------

    async def daily_counts(self, guild_ids: list[int] | None, days: int = 14) -> DailyCounts:
        """Requests, flagged images and reports per day for the last ``days`` days, refusals by reason, the open
        cases and the median time from a case's opening to its decision (cases closed in the window)."""
        now = self.now()
        since = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
        keys = [(since + timedelta(days=i)).date().isoformat() for i in range(days)]

        async def per_day(s: Any, column: Any, stmt: Any) -> list[int]:
            """Rows per UTC day, counted by the database (GROUP BY): a busy fortnight is not loaded into Python."""
            day = _day(column, s.bind.dialect.name)
            counts = dict.fromkeys(keys, 0)
            for key, n in (await s.execute(stmt.add_columns(day, func.count()).group_by(day))).all():
                if str(key)[:10] in counts:
                    counts[str(key)[:10]] += int(n)
            return list(counts.values())

        async with self._read() as s:
            gens = select().select_from(Generation).where(Generation.queued_at >= since,
                                                          _scope(Generation.guild_id, guild_ids))
            flags = (select().select_from(Image).join(Generation, Generation.id == Image.generation_id)
                     .where(Image.created_at >= since, Image.flagged.is_(True), _scope(Generation.guild_id, guild_ids)))
            reports = (select().select_from(Feedback).join(Image, Image.id == Feedback.image_id)
                       .join(Generation, Generation.id == Image.generation_id)
                       .where(Feedback.created_at >= since, Feedback.kind == FeedbackKind.REPORT.value,
                              _scope(Generation.guild_id, guild_ids)))
            refusals = (select(cast(Refusal.reason, String), func.count())
                        .where(Refusal.created_at >= since, _scope(Refusal.guild_id, guild_ids))
                        .group_by(Refusal.reason))
            open_cases = select(func.count()).select_from(ModerationCase).where(
                ModerationCase.status == CaseStatus.OPEN.value, _scope(ModerationCase.guild_id, guild_ids))
            decided = select(ModerationCase.opened_at, ModerationCase.closed_at).where(
                ModerationCase.closed_at.is_not(None), ModerationCase.closed_at >= since,
                _scope(ModerationCase.guild_id, guild_ids))
            requests = await per_day(s, Generation.queued_at, gens)
            flagged = await per_day(s, Image.created_at, flags)
            reported = await per_day(s, Feedback.created_at, reports)
            by_reason = {reason: int(n) for reason, n in (await s.execute(refusals)).all()}
            n_open = int((await s.execute(open_cases)).scalar_one())
            spans = [(closed - opened).total_seconds() for opened, closed in (await s.execute(decided)).all()]
        return DailyCounts(keys, requests, flagged, reported, by_reason, n_open,
                           statistics.median(spans) if spans else None)
