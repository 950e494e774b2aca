"""The queries the bot and the training loop run, as one async :class:`Repository`.

Every method is one short transaction on its own session and returns detached rows whose columns stay
readable (``expire_on_commit=False``). Rows are snapshots: change them through the repository, not by
mutating the returned objects.

Queue fairness is deliberately NOT decided here: the bot's scheduler reads :meth:`Repository.queued_generations`
(FIFO order with user and guild ids), picks whichever job its policy prefers, and takes it with
:meth:`Repository.claim` (atomic ``queued → running``; ``None`` if someone else got it or it was cancelled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, and_, bindparam, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from store.db import async_session_factory, make_async_engine
from store.models import (
    CaseSource,
    CaseStatus,
    Checkpoint,
    CheckpointStatus,
    Feedback,
    FeedbackKind,
    FeedbackReason,
    FlaggedMode,
    Generation,
    GenerationKind,
    GuildSettings,
    Image,
    ModAction,
    ModerationAction,
    ModerationCase,
    Refusal,
    Status,
    TrainingRun,
    UserState,
    decode_tokens,
    encode_tokens,
    utcnow,
)

log = logging.getLogger(__name__)


class StatusError(ValueError):
    """A status change the life cycle does not allow (e.g. a finished job back to running)."""


class TakenOver(StatusError):
    """The job is no longer this process's: its lease ran out and another process took it back."""


class ActiveLimitReached(Exception):
    """``create_generation(max_active=...)`` refused: the user already has ``active`` queued or running jobs."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} active jobs")
        self.active = active


# PostgreSQL advisory-lock key space of per-user admissions (XOR-ed with the user id)
_ADMISSION_LOCK = 0x0DA1_1E00_0000_0000


class NotFound(LookupError):
    """The row the caller named does not exist."""


# queued → running → done/failed/cancelled; running → queued only when a restart interrupted it.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELLED, Status.FAILED}),
    Status.RUNNING: frozenset({Status.DONE, Status.FAILED, Status.CANCELLED, Status.QUEUED}),
    Status.DONE: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}

_GUILD_FIELDS = frozenset(
    {
        "flagged_mode",
        "review_channel_id",
        "rate_limit_user",
        "rate_limit_guild",
        "daily_quota",
        "max_queue_per_user",
        "block_list",
        "allow_list",
    }
)
_USER_FIELDS = frozenset({"banned", "ban_reason", "opted_out", "strikes", "cooldown_until", "daily_quota"})
_DELIVERY_FIELDS = frozenset(
    {"application_id", "interaction_token", "token_expires_at", "upload_limit", "ack_message_id", "result_message_id",
     "channel_id"}
)


@dataclass(frozen=True)
class QueuedJob:
    """What a fairness policy needs to know about one queued generation."""

    id: int
    user_id: int
    guild_id: int | None
    queued_at: datetime
    n_images: int
    kind: str
    application_id: int | None = None  # set for jobs from Discord interactions (which front end can deliver it)


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


def _check_value(name: str, value: Any, allowed: type, nullable: bool = False) -> str | None:
    if value is None and nullable:
        return None
    values = [v.value for v in allowed]  # type: ignore[attr-defined]
    if value not in values:
        raise ValueError(f"{name} must be one of {', '.join(values)}; got {value!r}")
    return str(value)


# a running job given back to the queue: no start time, no owner, no lease
_BACK_TO_QUEUE = {"status": Status.QUEUED.value, "started_at": None, "owner": None, "lease_until": None}


def _unvouched(now: datetime) -> Any:
    """Rows no live process vouches for at ``now`` (database clock): no lease, or one that ran out."""
    return or_(Generation.lease_until.is_(None), Generation.lease_until < now)


def _active_of(user_id: int) -> Any:
    """Condition: a job of ``user_id`` that is queued or running (what counts against the per-user cap)."""
    return and_(Generation.user_id == user_id, Generation.status.in_([Status.QUEUED.value, Status.RUNNING.value]))


def _check_owner(gen: Generation, owner: str | None) -> None:
    if owner is not None and (gen.status != Status.RUNNING.value or gen.owner != owner):
        raise TakenOver(f"generation {gen.id} is no longer running for this process ({gen.status})")


class Repository:
    """Async data access for the bot and training; construct with a session factory or :meth:`from_url`.

    Timestamps it writes, and the leases processes compare, are on the *database's* clock once
    :meth:`sync_clock` has run: ``now()`` is the database time read at the last sync plus the time elapsed since
    on a monotonic clock, so processes on hosts whose clocks disagree still agree on whose lease ran out, and a
    step of the local wall clock (NTP, a resumed VM) changes nothing. ``clock`` is the local wall clock, used
    until the first sync; ``monotonic`` measures elapsed time (tests replace both)."""

    #: a clock sample whose round trip took longer than this is too uncertain to replace a good one
    MAX_SYNC_ROUND_TRIP_S = 1.0

    def __init__(self, sessions: async_sessionmaker[AsyncSession], engine: AsyncEngine | None = None,
                 clock: Callable[[], datetime] = utcnow, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self._engine = engine
        self._clock = clock
        self._monotonic = monotonic
        self._anchor: tuple[datetime, float] | None = None  # (database time, monotonic time) of the last sync
        self.clock_offset = timedelta(0)  # database minus local wall clock, as last measured (for logs)

    def now(self) -> datetime:
        """The database's current time, as this process best knows it (the local clock before any sync)."""
        if self._anchor is None:
            return self._clock()
        db_then, mono_then = self._anchor
        return db_then + timedelta(seconds=self._monotonic() - mono_then)

    async def sync_clock(self) -> timedelta:
        """Read the database's clock and anchor :meth:`now` on it (taken at the middle of the round trip);
        returns how far the database's clock is ahead of the local wall clock. A sample whose round trip took
        over ``MAX_SYNC_ROUND_TRIP_S`` is dropped when an earlier one exists. PostgreSQL: ``clock_timestamp()``;
        SQLite: the host's clock, which corrects nothing on a real host but keeps one code path."""
        async with self._read() as s:
            start = self._monotonic()
            if s.bind.dialect.name == "postgresql":
                db_now = (await s.execute(text("SELECT clock_timestamp()"))).scalar_one()
            else:
                raw = (await s.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))).scalar_one()
                db_now = datetime.fromisoformat(raw).replace(tzinfo=UTC)
            end = self._monotonic()
        if end - start > self.MAX_SYNC_ROUND_TRIP_S and self._anchor is not None:
            log.info("database clock sample dropped: its round trip took %.1f s", end - start)
            return self.clock_offset
        mid = (start + end) / 2
        self._anchor = (db_now, mid)
        self.clock_offset = db_now - (self._clock() - timedelta(seconds=self._monotonic() - mid))
        return self.clock_offset

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], datetime] = utcnow,
                 monotonic: Callable[[], float] = time.monotonic, **engine_kwargs: Any) -> Repository:
        engine = make_async_engine(url, **engine_kwargs)
        return cls(async_session_factory(engine), engine, clock=clock, monotonic=monotonic)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only: on SQLite its transaction is DEFERRED, so it never blocks writers."""
        async with self.sessions() as s:
            await s.connection(execution_options={"sqlite_begin": "DEFERRED"})
            yield s

    async def close(self) -> None:
        """Dispose the engine if this repository created it."""
        if self._engine is not None:
            await self._engine.dispose()

    # --- generations ---------------------------------------------------------------------------------------

    async def create_generation(
        self,
        *,
        user_id: int,
        prompt: str,
        normalized_prompt: str | None = None,
        guild_id: int | None = None,
        channel_id: int | None = None,
        n_images: int = 9,
        seed: int = 0,
        params: Mapping[str, Any] | None = None,
        kind: str = GenerationKind.NEW,
        parent_generation_id: int | None = None,
        parent_image_id: int | None = None,
        checkpoint_id: str | None = None,
        private: bool = False,
        application_id: int | None = None,
        interaction_token: str | None = None,
        token_expires_at: datetime | None = None,
        upload_limit: int | None = None,
        owner: str | None = None,
        lease_until: datetime | None = None,
        max_active: int | None = None,
    ) -> Generation:
        """Persist a new queued job (durable before the user is acknowledged). ``owner``/``lease_until``: the
        process that queued it vouches for it until then (on a shared database, others adopt it afterwards).

        ``max_active``: refuse (:class:`ActiveLimitReached`) if the user already has that many queued or running
        jobs, counted in the inserting transaction. On PostgreSQL a per-user advisory lock makes every process's
        admissions of one user take turns, so the count is exact across bot processes."""
        _check_value("kind", kind, GenerationKind)
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1; got {n_images}")
        gen = Generation(
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            prompt=prompt,
            normalized_prompt=normalized_prompt if normalized_prompt is not None else prompt,
            n_images=n_images,
            seed=seed,
            params=dict(params or {}),
            kind=str(kind),
            parent_generation_id=parent_generation_id,
            parent_image_id=parent_image_id,
            checkpoint_id=checkpoint_id,
            private=private,
            status=Status.QUEUED.value,
            queued_at=self.now(),
            attempts=0,
            application_id=application_id,
            interaction_token=interaction_token,
            token_expires_at=token_expires_at,
            upload_limit=upload_limit,
            owner=owner,
            lease_until=lease_until,
        )
        async with self.sessions.begin() as s:
            if max_active is not None:
                if s.bind.dialect.name == "postgresql":  # held until this transaction commits
                    await s.execute(text("SELECT pg_advisory_xact_lock(:key)").bindparams(
                        bindparam("key", (_ADMISSION_LOCK ^ user_id) & (2**63 - 1), type_=BigInteger)))
                active = (await s.execute(
                    select(func.count()).select_from(Generation).where(_active_of(user_id)))).scalar_one()
                if active >= max_active:
                    raise ActiveLimitReached(int(active))
            s.add(gen)
        return gen

    async def get_generation(self, generation_id: int, *, with_images: bool = True) -> Generation | None:
        stmt = select(Generation).where(Generation.id == generation_id)
        if with_images:
            stmt = stmt.options(selectinload(Generation.images))
        async with self._read() as s:
            return (await s.execute(stmt)).scalar_one_or_none()

    async def set_status(
        self,
        generation_id: int,
        status: str,
        *,
        error: str | None = None,
        checkpoint_id: str | None = None,
        owner: str | None = None,
    ) -> Generation:
        """Move a job along its life cycle, stamping times: running → started_at and attempts+1;
        done/failed/cancelled → finished_at; back to queued → started_at cleared. Raises :class:`StatusError`
        for a transition :data:`ALLOWED_TRANSITIONS` forbids, :class:`TakenOver` when ``owner`` is given and the
        job is not running for it, and :class:`NotFound` for an unknown id."""
        _check_value("status", status, Status)
        async with self.sessions.begin() as s:
            gen = (
                await s.execute(select(Generation).where(Generation.id == generation_id).with_for_update())
            ).scalar_one_or_none()
            if gen is None:
                raise NotFound(f"generation {generation_id} does not exist")
            _check_owner(gen, owner)
            if status not in ALLOWED_TRANSITIONS[gen.status]:
                raise StatusError(f"generation {generation_id}: cannot go from {gen.status} to {status}")
            now = self.now()
            gen.status = str(status)
            if status == Status.RUNNING:
                gen.started_at = now
                gen.attempts = gen.attempts + 1
            elif status == Status.QUEUED:
                gen.started_at = None
            else:
                gen.finished_at = now
            if error is not None:
                gen.error = error
            if checkpoint_id is not None:
                gen.checkpoint_id = checkpoint_id
        return gen

    async def claim(self, generation_id: int, owner: str | None = None,
                    lease_until: datetime | None = None) -> Generation | None:
        """Atomically take a queued job (queued → running) for ``owner`` with a lease until ``lease_until``.
        ``None`` if it is no longer queued."""
        now = self.now()
        async with self.sessions.begin() as s:
            result = await s.execute(
                update(Generation)
                .where(Generation.id == generation_id, Generation.status == Status.QUEUED.value)
                .values(status=Status.RUNNING.value, started_at=now, attempts=Generation.attempts + 1, owner=owner,
                        lease_until=lease_until)
            )
            if result.rowcount != 1:
                return None
            return (await s.execute(select(Generation).where(Generation.id == generation_id))).scalar_one()

    async def renew_leases(self, owner: str, ids: Iterable[int], lease_until: datetime) -> set[int]:
        """Extend the lease of ``owner``'s jobs among ``ids`` (queued in its fair queue, running, or finished and
        waiting to be posted); returns the ids renewed (an id missing was taken over by another process)."""
        ids = list(ids)
        if not ids:
            return set()
        async with self.sessions.begin() as s:
            result = await s.execute(
                update(Generation).where(Generation.id.in_(ids), Generation.owner == owner)
                .values(lease_until=lease_until).returning(Generation.id)
            )
            return set(result.scalars())

    async def release(self, generation_id: int, owner: str | None) -> bool:
        """Give a running job back to the queue (a graceful stop), unless another process has taken it since."""
        async with self.sessions.begin() as s:
            result = await s.execute(
                update(Generation)
                .where(Generation.id == generation_id, Generation.status == Status.RUNNING.value,
                       Generation.owner.is_(None) if owner is None else Generation.owner == owner)
                .values(**_BACK_TO_QUEUE)
            )
            return result.rowcount == 1

    @property
    def single_process(self) -> bool:
        """True on SQLite: a bot process holds the database file's lock (``bot.preflight``), so no other bot runs
        on it and every running job at start-up was left by a dead process."""
        bind = self._engine or self.sessions.kw.get("bind")
        return bind is not None and bind.dialect.name == "sqlite"

    async def queued_generations(self, limit: int | None = None, *, unvouched: bool = False) -> list[QueuedJob]:
        """Queued jobs, oldest first (ties by id), with the ids a fairness policy groups by. ``unvouched``: only
        those no live process holds in its queue (no lease, or it ran out)."""
        stmt = (
            select(
                Generation.id,
                Generation.user_id,
                Generation.guild_id,
                Generation.queued_at,
                Generation.n_images,
                Generation.kind,
                Generation.application_id,
            )
            .where(Generation.status == Status.QUEUED.value)
            .order_by(Generation.queued_at, Generation.id)
        )
        if unvouched:
            stmt = stmt.where(_unvouched(self.now()))
        if limit is not None:
            stmt = stmt.limit(limit)
        async with self._read() as s:
            rows = (await s.execute(stmt)).all()
        return [QueuedJob(*row) for row in rows]

    async def active_ids(self, user_id: int, *, not_owner: str | None = None) -> set[int]:
        """The ids of ``user_id``'s queued or running jobs; ``not_owner``: only those that process does not hold
        (held by other bot processes on a shared database, or by none)."""
        stmt = select(Generation.id).where(_active_of(user_id))
        if not_owner is not None:
            stmt = stmt.where(or_(Generation.owner.is_(None), Generation.owner != not_owner))
        async with self._read() as s:
            return set((await s.execute(stmt)).scalars())

    async def requeue_interrupted(self, *, orphans_only: bool = False, mine: str | None = None) -> list[int]:
        """Jobs left ``running`` by a dead process go back to ``queued``. Returns their ids.

        ``orphans_only=False``: every running job (the caller knows it is the only process on the database).
        ``True``: only jobs whose lease ran out or that carry none, plus those of owner ``mine`` (this process's own
        id, if it was restarted under the same one): another live process's jobs stay with it.
        """
        cond = Generation.status == Status.RUNNING.value
        if orphans_only:
            orphan = _unvouched(self.now())
            cond = and_(cond, or_(orphan, Generation.owner == mine) if mine is not None else orphan)
        async with self._read() as s:
            found = list((await s.execute(select(Generation.id).where(cond).order_by(Generation.id))).scalars())
        return await self._update_each(found, cond, _BACK_TO_QUEUE)

    async def _update_each(self, ids: Iterable[int], cond: Any, values: Mapping[str, Any]) -> list[int]:
        """Set ``values`` on each row of ``ids`` that still meets ``cond``, one conditional update per row (of two
        processes sweeping at once, one gets each row). Returns the ids updated."""
        done = []
        for gid in ids:
            async with self.sessions.begin() as s:
                result = await s.execute(update(Generation).where(Generation.id == gid, cond).values(**values))
            if result.rowcount == 1:
                done.append(gid)
        return done

    async def adopt_queued(self, ids: Iterable[int], owner: str, lease_until: datetime) -> list[int]:
        """Take into ``owner``'s queue the queued jobs among ``ids`` that nobody vouches for (their process died or
        stopped), one conditional update each: of several processes trying, one gets each job. Returns the ids
        ``owner`` got."""
        return await self._update_each(ids, and_(Generation.status == Status.QUEUED.value, _unvouched(self.now())),
                                       {"owner": owner, "lease_until": lease_until})

    async def update_delivery(self, generation_id: int, **fields: Any) -> Generation:
        """Set delivery fields (application_id, interaction_token, token_expires_at, upload_limit, ack_message_id,
        result_message_id, channel_id)."""
        unknown = set(fields) - _DELIVERY_FIELDS
        if unknown:
            raise ValueError(f"not delivery fields: {', '.join(sorted(unknown))}")
        return await self._update_generation(generation_id, fields)

    async def mark_delivered(self, generation_id: int, *, result_message_id: int | None = None) -> Generation:
        """The result was posted: stamp delivered_at and drop the interaction token (no longer needed)."""
        values: dict[str, Any] = {"delivered_at": self.now(), "interaction_token": None}
        if result_message_id is not None:
            values["result_message_id"] = result_message_id
        return await self._update_generation(generation_id, values)

    async def undelivered(self) -> list[Generation]:
        """Finished jobs (done or failed) whose result was never posted: deliver them after a restart."""
        stmt = (
            select(Generation)
            .where(Generation.status.in_([Status.DONE.value, Status.FAILED.value]), Generation.delivered_at.is_(None))
            .options(selectinload(Generation.images))
            .order_by(Generation.finished_at, Generation.id)
        )
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def adopt_result(self, generation_id: int, owner: str, lease_until: datetime) -> bool:
        """Take over posting a finished, unposted result that nobody vouches for (its lease ran out, or it has
        none), atomically: of several processes trying, one gets it. True if ``owner`` got it."""
        async with self.sessions.begin() as s:
            result = await s.execute(
                update(Generation)
                .where(Generation.id == generation_id,
                       Generation.status.in_([Status.DONE.value, Status.FAILED.value]),
                       Generation.delivered_at.is_(None),
                       _unvouched(self.now()))
                .values(owner=owner, lease_until=lease_until)
            )
            return result.rowcount == 1

    async def list_generations(
        self, *, user_id: int | None = None, status: str | None = None, limit: int = 20
    ) -> list[Generation]:
        """Newest first."""
        stmt = select(Generation).order_by(Generation.queued_at.desc(), Generation.id.desc()).limit(limit)
        if user_id is not None:
            stmt = stmt.where(Generation.user_id == user_id)
        if status is not None:
            stmt = stmt.where(Generation.status == status)
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def _update_generation(self, generation_id: int, values: Mapping[str, Any]) -> Generation:
        async with self.sessions.begin() as s:
            gen = await s.get(Generation, generation_id)
            if gen is None:
                raise NotFound(f"generation {generation_id} does not exist")
            for key, value in values.items():
                setattr(gen, key, value)
        return gen

    # --- images --------------------------------------------------------------------------------------------

    async def add_images(self, generation_id: int, images: Iterable[NewImage], *,
                         owner: str | None = None) -> list[Image]:
        """Store a generation's images (tokens packed as int16). Returns them in the order given. ``owner``: as
        in :meth:`set_status`."""
        rows = _image_rows(generation_id, images, self.now())
        async with self.sessions.begin() as s:
            gen = await s.get(Generation, generation_id, with_for_update=owner is not None)
            if gen is None:
                raise NotFound(f"generation {generation_id} does not exist")
            _check_owner(gen, owner)
            s.add_all(rows)
        return rows

    async def finish_generation(
        self, generation_id: int, images: Iterable[NewImage], *, checkpoint_id: str | None = None,
        owner: str | None = None,
    ) -> tuple[Generation, list[Image]]:
        """``add_images`` and ``set_status(done)`` in one transaction (one round trip, one write lock): the
        images are stored and the job is done, or neither. Same errors as those two."""
        rows = _image_rows(generation_id, images, self.now())
        async with self.sessions.begin() as s:
            gen = (
                await s.execute(select(Generation).where(Generation.id == generation_id).with_for_update())
            ).scalar_one_or_none()
            if gen is None:
                raise NotFound(f"generation {generation_id} does not exist")
            _check_owner(gen, owner)
            if Status.DONE.value not in ALLOWED_TRANSITIONS[gen.status]:
                raise StatusError(f"generation {generation_id}: cannot go from {gen.status} to done")
            s.add_all(rows)
            gen.status = Status.DONE.value
            gen.finished_at = self.now()
            if checkpoint_id is not None:
                gen.checkpoint_id = checkpoint_id
        return gen, rows

    async def get_image(self, image_id: int) -> Image | None:
        async with self._read() as s:
            return await s.get(Image, image_id)

    # --- feedback and refusals -----------------------------------------------------------------------------

    async def record_feedback(
        self, image_id: int, user_id: int, kind: str, *, reason: str | None = None, note: str | None = None
    ) -> Feedback:
        """Record 👍/👎 (one vote per user per image: a new vote replaces the old) or a report (one per user
        per image: a repeat updates reason/note). Atomic upsert on both databases."""
        kind = _check_value("kind", kind, FeedbackKind)  # type: ignore[assignment]
        reason = _check_value("reason", reason, FeedbackReason, nullable=True)
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

    async def record_refusal(
        self,
        *,
        user_id: int,
        prompt: str,
        reason: str,
        guild_id: int | None = None,
        normalized: str | None = None,
    ) -> Refusal:
        row = Refusal(
            user_id=user_id, guild_id=guild_id, prompt=prompt, normalized=normalized, reason=reason,
            created_at=self.now(),
        )
        async with self.sessions.begin() as s:
            s.add(row)
        return row

    async def list_refusals(
        self, *, user_id: int | None = None, since: datetime | None = None, limit: int = 100
    ) -> list[Refusal]:
        """Newest first."""
        stmt = select(Refusal).order_by(Refusal.created_at.desc(), Refusal.id.desc()).limit(limit)
        if user_id is not None:
            stmt = stmt.where(Refusal.user_id == user_id)
        if since is not None:
            stmt = stmt.where(Refusal.created_at >= since)
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

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
                _check_value("kind", k, FeedbackKind)
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

    # --- moderation ----------------------------------------------------------------------------------------

    async def open_case(
        self,
        source: str,
        *,
        image_id: int | None = None,
        generation_id: int | None = None,
        reason: str | None = None,
    ) -> tuple[ModerationCase, bool]:
        """Open a review case; if the image already has an open case, return that one.
        Returns ``(case, created)``."""
        _check_value("source", source, CaseSource)
        if image_id is None and generation_id is None:
            raise ValueError("a moderation case needs an image_id or a generation_id")
        for attempt in range(3):
            try:
                async with self.sessions.begin() as s:
                    if image_id is not None:
                        existing = (
                            await s.execute(
                                select(ModerationCase).where(
                                    ModerationCase.image_id == image_id,
                                    ModerationCase.status == CaseStatus.OPEN.value,
                                )
                            )
                        ).scalar_one_or_none()
                        if existing is not None:
                            return existing, False
                        if generation_id is None:
                            image = await s.get(Image, image_id)
                            if image is None:
                                raise NotFound(f"image {image_id} does not exist")
                            generation_id = image.generation_id
                    case = ModerationCase(
                        image_id=image_id,
                        generation_id=generation_id,
                        source=str(source),
                        status=CaseStatus.OPEN.value,
                        reason=reason,
                        opened_at=self.now(),
                    )
                    s.add(case)
                return case, True
            except IntegrityError:
                if image_id is None or attempt == 2:
                    raise
                # a concurrent report opened a case for this image first: go round and return it
        raise AssertionError("unreachable")

    async def set_case_review_message(self, case_id: int, message_id: int) -> ModerationCase:
        async with self.sessions.begin() as s:
            case = await s.get(ModerationCase, case_id)
            if case is None:
                raise NotFound(f"moderation case {case_id} does not exist")
            case.review_message_id = message_id
        return case

    async def get_case(self, case_id: int) -> ModerationCase | None:
        stmt = select(ModerationCase).where(ModerationCase.id == case_id).options(selectinload(ModerationCase.actions))
        async with self._read() as s:
            return (await s.execute(stmt)).scalar_one_or_none()

    async def list_open_cases(self, limit: int = 50) -> list[ModerationCase]:
        """Open cases, oldest first."""
        stmt = (
            select(ModerationCase)
            .where(ModerationCase.status == CaseStatus.OPEN.value)
            .order_by(ModerationCase.opened_at, ModerationCase.id)
            .limit(limit)
        )
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def add_action(
        self,
        case_id: int | None,
        moderator_id: int,
        action: str,
        *,
        reason: str | None = None,
        target_user_id: int | None = None,
    ) -> ModerationAction:
        """Record a moderator's action and apply it in the same transaction:

        - approve: case → approved (closed), the image is un-hidden;
        - remove: case → removed (closed), the image is hidden;
        - ban / unban: the target user (default: the author of the case's generation) is (un)banned;
          a ban adds a strike. The case stays as it is.
        """
        _check_value("action", action, ModAction)
        async with self.sessions.begin() as s:
            case = None
            if case_id is not None:
                case = await s.get(ModerationCase, case_id)
                if case is None:
                    raise NotFound(f"moderation case {case_id} does not exist")
            now = self.now()
            if action in (ModAction.APPROVE, ModAction.REMOVE):
                if case is None:
                    raise ValueError(f"{action} needs a case")
                case.status = CaseStatus.APPROVED.value if action == ModAction.APPROVE else CaseStatus.REMOVED.value
                case.closed_at = now
                if case.image_id is not None:
                    image = await s.get(Image, case.image_id)
                    if image is not None:
                        image.hidden = action == ModAction.REMOVE
            else:
                if target_user_id is None and case is not None and case.generation_id is not None:
                    gen = await s.get(Generation, case.generation_id)
                    target_user_id = gen.user_id if gen is not None else None
                if target_user_id is None:
                    raise ValueError(f"{action} needs a target_user_id (or a case with a generation)")
                state = await s.get(UserState, target_user_id)
                if state is None:
                    state = UserState(user_id=target_user_id, banned=False, opted_out=False, strikes=0)
                    s.add(state)
                if action == ModAction.BAN:
                    state.banned = True
                    state.ban_reason = reason
                    state.strikes = (state.strikes or 0) + 1
                else:
                    state.banned = False
                    state.ban_reason = None
                state.updated_at = now
            row = ModerationAction(
                case_id=case_id,
                moderator_id=moderator_id,
                action=str(action),
                target_user_id=target_user_id,
                reason=reason,
                created_at=now,
            )
            s.add(row)
        return row

    # --- guild settings and user state ---------------------------------------------------------------------

    async def get_guild_settings(self, guild_id: int) -> GuildSettings | None:
        async with self._read() as s:
            return await s.get(GuildSettings, guild_id)

    async def update_guild_settings(self, guild_id: int, **fields: Any) -> GuildSettings:
        """Create or update a guild's overrides (None clears an override back to the global setting)."""
        unknown = set(fields) - _GUILD_FIELDS
        if unknown:
            raise ValueError(f"unknown guild setting(s): {', '.join(sorted(unknown))}")
        if "flagged_mode" in fields:
            _check_value("flagged_mode", fields["flagged_mode"], FlaggedMode, nullable=True)
        for key in ("block_list", "allow_list"):
            if key in fields:
                fields[key] = [str(x) for x in (fields[key] or [])]
        return await self._upsert(GuildSettings, guild_id, fields, {"block_list": [], "allow_list": []})

    async def get_user_state(self, user_id: int) -> UserState | None:
        async with self._read() as s:
            return await s.get(UserState, user_id)

    async def update_user_state(self, user_id: int, **fields: Any) -> UserState:
        """Create or update a user's state (banned, ban_reason, opted_out, strikes, cooldown_until, daily_quota)."""
        unknown = set(fields) - _USER_FIELDS
        if unknown:
            raise ValueError(f"unknown user state field(s): {', '.join(sorted(unknown))}")
        return await self._upsert(UserState, user_id, fields, {"banned": False, "opted_out": False, "strikes": 0})

    async def add_strike(self, user_id: int) -> int:
        """Increment a user's strike count atomically; returns the new count."""
        for attempt in range(3):
            created = False
            try:
                async with self.sessions.begin() as s:
                    state = await s.get(UserState, user_id, with_for_update=True)
                    if state is None:
                        created = True
                        state = UserState(user_id=user_id, banned=False, opted_out=False, strikes=0)
                        s.add(state)
                    state.strikes = (state.strikes or 0) + 1
                    state.updated_at = self.now()
                return state.strikes
            except IntegrityError:
                if not created or attempt == 2:
                    raise
                # another task created the row first: go round and increment it
        raise AssertionError("unreachable")

    async def _upsert(self, model: type, key: int, fields: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
        for quota in ("daily_quota", "max_queue_per_user"):
            if fields.get(quota) is not None and int(fields[quota]) < 0:
                raise ValueError(f"{quota} must be >= 0; got {fields[quota]}")
        for attempt in range(3):
            created = False
            try:
                async with self.sessions.begin() as s:
                    row = await s.get(model, key, with_for_update=True)
                    if row is None:
                        created = True
                        row = model(**{model.__mapper__.primary_key[0].key: key}, **defaults)  # type: ignore[attr-defined]
                        s.add(row)
                    for name, value in fields.items():
                        setattr(row, name, value)
                    row.updated_at = self.now()
                return row
            except IntegrityError:
                if not created or attempt == 2:
                    raise
                # another task created the row first: go round and update it
        raise AssertionError("unreachable")

    # --- checkpoints and training runs ---------------------------------------------------------------------

    async def register_checkpoint(
        self,
        checkpoint_id: str,
        path: str,
        *,
        parent_id: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Add a checkpoint as a ``candidate``."""
        row = Checkpoint(
            id=checkpoint_id,
            path=str(path),
            parent_id=parent_id,
            metrics=dict(metrics or {}),
            status=CheckpointStatus.CANDIDATE.value,
            created_at=self.now(),
        )
        async with self.sessions.begin() as s:
            s.add(row)
        return row

    async def get_checkpoint(self, checkpoint_id: str) -> Checkpoint | None:
        async with self._read() as s:
            return await s.get(Checkpoint, checkpoint_id)

    async def list_checkpoints(self, status: str | None = None) -> list[Checkpoint]:
        stmt = select(Checkpoint).order_by(Checkpoint.created_at, Checkpoint.id)
        if status is not None:
            stmt = stmt.where(Checkpoint.status == status)
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def update_checkpoint_metrics(self, checkpoint_id: str, metrics: Mapping[str, Any]) -> Checkpoint:
        """Merge ``metrics`` into the checkpoint's metrics."""
        async with self.sessions.begin() as s:
            row = await s.get(Checkpoint, checkpoint_id, with_for_update=True)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id!r} is not registered")
            row.metrics = {**row.metrics, **dict(metrics)}
        return row

    async def set_active_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        """Make one checkpoint ``active``; the previously active one becomes ``retired``."""
        async with self.sessions.begin() as s:
            row = await s.get(Checkpoint, checkpoint_id, with_for_update=True)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id!r} is not registered")
            await s.execute(
                update(Checkpoint)
                .where(and_(Checkpoint.status == CheckpointStatus.ACTIVE.value, Checkpoint.id != checkpoint_id))
                .values(status=CheckpointStatus.RETIRED.value)
            )
            await s.flush()
            row.status = CheckpointStatus.ACTIVE.value
        return row

    async def retire_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        """Take a checkpoint out of service (an active one leaves no active checkpoint behind)."""
        async with self.sessions.begin() as s:
            row = await s.get(Checkpoint, checkpoint_id, with_for_update=True)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id!r} is not registered")
            row.status = CheckpointStatus.RETIRED.value
        return row

    async def get_active_checkpoint(self) -> Checkpoint | None:
        stmt = select(Checkpoint).where(Checkpoint.status == CheckpointStatus.ACTIVE.value)
        async with self._read() as s:
            return (await s.execute(stmt)).scalar_one_or_none()

    async def create_training_run(
        self,
        kind: str,
        *,
        config: Mapping[str, Any] | None = None,
        input_checkpoint_id: str | None = None,
        log_path: str | None = None,
        status: str = Status.RUNNING,
    ) -> TrainingRun:
        _check_value("status", status, Status)
        row = TrainingRun(
            kind=kind,
            config=dict(config or {}),
            status=str(status),
            input_checkpoint_id=input_checkpoint_id,
            metrics={},
            started_at=self.now() if status == Status.RUNNING else None,
            log_path=log_path,
        )
        async with self.sessions.begin() as s:
            s.add(row)
        return row

    async def finish_training_run(
        self,
        run_id: int,
        status: str,
        *,
        metrics: Mapping[str, Any] | None = None,
        output_checkpoint_id: str | None = None,
    ) -> TrainingRun:
        _check_value("status", status, Status)
        async with self.sessions.begin() as s:
            row = await s.get(TrainingRun, run_id, with_for_update=True)
            if row is None:
                raise NotFound(f"training run {run_id} does not exist")
            row.status = str(status)
            row.finished_at = self.now()
            if metrics is not None:
                row.metrics = {**row.metrics, **dict(metrics)}
            if output_checkpoint_id is not None:
                row.output_checkpoint_id = output_checkpoint_id
        return row

    async def get_training_run(self, run_id: int) -> TrainingRun | None:
        async with self._read() as s:
            return await s.get(TrainingRun, run_id)


def _image_rows(generation_id: int, images: Iterable[NewImage], now: datetime) -> list[Image]:
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
