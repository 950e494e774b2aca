"""Generations and the job queue: admission, the status life cycle, claims, leases, take-over of a dead
process's jobs, and delivery of results.

Queue fairness is deliberately NOT decided here: the bot's scheduler reads :meth:`queued_generations` (FIFO order
with user and guild ids), picks whichever job its policy prefers, and takes it with :meth:`claim` (atomic
``queued → running``; ``None`` if someone else got it or it was cancelled).

Several bot processes may share one PostgreSQL database. A process vouches for the jobs it holds (queued in its
fair queue, running, or finished and waiting to be posted) with a lease it renews (``owner``, ``lease_until``,
on the database's clock); a job whose lease ran out, or that has none, was left by a process that died or
stopped, and another process takes it over, one conditional update per job so that exactly one gets it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, and_, bindparam, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from store.models import Generation, GenerationKind, Status
from store.repo.base import NotFound, RepositoryBase, check_choice


class StatusError(ValueError):
    """A status change the life cycle does not allow (e.g. a finished job back to running)."""


class TakenOver(StatusError):
    """The job is no longer this process's: its lease ran out and another process took it back."""


class ActiveLimitReached(Exception):
    """``create_generation(max_active=...)`` refused: the user already has ``active`` queued or running jobs."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} active jobs")
        self.active = active


# queued → running → done/failed/cancelled; running → queued only when a restart interrupted it.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELLED, Status.FAILED}),
    Status.RUNNING: frozenset({Status.DONE, Status.FAILED, Status.CANCELLED, Status.QUEUED}),
    Status.DONE: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}

# PostgreSQL advisory-lock key space of per-user admissions (XOR-ed with the user id)
_ADMISSION_LOCK = 0x0DA1_1E00_0000_0000

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


# a running job given back to the queue: no start time, no owner, no lease
_BACK_TO_QUEUE = {"status": Status.QUEUED.value, "started_at": None, "owner": None, "lease_until": None}


def _unvouched(now: datetime) -> Any:
    """Rows no live process vouches for at ``now`` (database clock): no lease, or one that ran out."""
    return or_(Generation.lease_until.is_(None), Generation.lease_until < now)


def _active_of(user_id: int) -> Any:
    """Condition: a job of ``user_id`` that is queued or running (what counts against the per-user cap)."""
    return and_(Generation.user_id == user_id, Generation.status.in_([Status.QUEUED.value, Status.RUNNING.value]))


def check_owner(gen: Generation, owner: str | None) -> None:
    """Raise :class:`TakenOver` unless ``owner`` is None (no check) or the job is running for ``owner``."""
    if owner is not None and (gen.status != Status.RUNNING.value or gen.owner != owner):
        raise TakenOver(f"generation {gen.id} is no longer running for this process ({gen.status})")


async def lock_for_move(s: AsyncSession, generation_id: int, status: str, owner: str | None) -> Generation:
    """The job's row, locked in session ``s`` for a move to ``status``: :class:`NotFound` for an unknown id,
    :class:`TakenOver` when ``owner`` is given and the job is not running for it, :class:`StatusError` for a
    transition :data:`ALLOWED_TRANSITIONS` forbids."""
    gen = (
        await s.execute(select(Generation).where(Generation.id == generation_id).with_for_update())
    ).scalar_one_or_none()
    if gen is None:
        raise NotFound(f"generation {generation_id} does not exist")
    check_owner(gen, owner)
    if status not in ALLOWED_TRANSITIONS[gen.status]:
        raise StatusError(f"generation {generation_id}: cannot go from {gen.status} to {status}")
    return gen


def stamp_move(gen: Generation, status: str, now: datetime, *, error: str | None = None,
               checkpoint_id: str | None = None, attention: str | None = None) -> None:
    """Apply a move to ``status`` checked by :func:`lock_for_move`: running → started_at and attempts+1;
    done/failed/cancelled → finished_at; back to queued → started_at cleared; what made the images, if given."""
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
    if attention is not None:
        gen.attention = attention


class GenerationRepository(RepositoryBase):
    """Generations and the job queue."""

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
        check_choice("kind", kind, GenerationKind)
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
        attention: str | None = None,
        owner: str | None = None,
    ) -> Generation:
        """Move a job along its life cycle, stamping times: running → started_at and attempts+1;
        done/failed/cancelled → finished_at; back to queued → started_at cleared. Raises :class:`StatusError`
        for a transition :data:`ALLOWED_TRANSITIONS` forbids, :class:`TakenOver` when ``owner`` is given and the
        job is not running for it, and :class:`NotFound` for an unknown id."""
        check_choice("status", status, Status)
        async with self.sessions.begin() as s:
            gen = await lock_for_move(s, generation_id, status, owner)
            stamp_move(gen, status, self.now(), error=error, checkpoint_id=checkpoint_id, attention=attention)
        return gen

    # --- claims and leases ---------------------------------------------------------------------------------

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

    # --- the queue and take-over ---------------------------------------------------------------------------

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

    # --- delivery and listing ------------------------------------------------------------------------------

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

    async def hold_result(self, generation_id: int, owner: str, lease_until: datetime) -> bool:
        """Just before posting a finished result: renew ``owner``'s lease on it if it is still ``owner``'s and
        unposted, atomically. False when another process adopted it (this one's lease ran out while it was slow):
        that process posts it, so this one must not."""
        async with self.sessions.begin() as s:
            result = await s.execute(
                update(Generation)
                .where(Generation.id == generation_id, Generation.owner == owner,
                       Generation.delivered_at.is_(None))
                .values(lease_until=lease_until)
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
