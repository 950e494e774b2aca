"""Fair queue of generation jobs.

The durable copy of the queue is the database (``Generation`` rows with status ``queued``, written before
the user is acknowledged); this module is the in-memory index the service rebuilds from those rows on
start-up and uses to decide what runs next.

Fairness: round-robin over guilds, then round-robin over the users of that guild, oldest job first within a
user. A user who queues ten jobs gets one turn per round like everyone else, so they never starve others
(peers.md #16); a busy guild gets one turn per round like a quiet one.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class QueueEntry:
    """A generation in the in-memory queue: what fairness needs (the rest lives in the database), and ``payload``,
    the caller's snapshot of the job (the service keeps the Generation row that progress is published from)."""

    id: int
    user_id: int
    guild_id: int | None
    queued_at: datetime | float
    payload: object = field(default=None, compare=False, repr=False)


class QueueRefused(Exception):
    """The queue will not take the job; ``str(exc)`` is safe to show the user."""


def user_cap_message(active: int, cap: int) -> str:
    """What a user over the per-user cap is told."""
    return (f"You already have {active} image request{'s' if active != 1 else ''} waiting (the limit is {cap}). "
            "Wait for one to finish or cancel one.")


class SchedulerClosed(Exception):
    """``next()`` was waiting when the scheduler was closed (shutdown)."""


class _Ring:
    """Round-robin over keys that have work; a key re-joins at the back after each turn."""

    def __init__(self) -> None:
        self.order: deque = deque()
        self.members: set = set()

    def add(self, key) -> None:
        if key not in self.members:
            self.members.add(key)
            self.order.append(key)

    def discard(self, key) -> None:
        if key in self.members:
            self.members.discard(key)
            self.order.remove(key)


class FairQueue:
    """Round-robin by guild, then by user, then oldest first. Not thread-safe; used from one event loop."""

    def __init__(self) -> None:
        self._jobs: dict[int, QueueEntry] = {}
        self._guilds = _Ring()
        self._users: dict[object, _Ring] = {}  # guild key -> ring of user ids
        self._per_user: dict[tuple[object, int], OrderedDict[int, QueueEntry]] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._jobs

    def ids(self) -> list[int]:
        """The queued job ids (any order)."""
        return list(self._jobs)

    @staticmethod
    def _gkey(job: QueueEntry) -> object:
        return ("dm",) if job.guild_id is None else job.guild_id

    def add(self, job: QueueEntry) -> None:
        if job.id in self._jobs:
            raise ValueError(f"job {job.id} is already queued")
        self._jobs[job.id] = job
        g = self._gkey(job)
        jobs = self._per_user.setdefault((g, job.user_id), OrderedDict())
        jobs[job.id] = job
        # keep a user's jobs in queued_at order even when restored out of order
        if len(jobs) > 1 and _key(next(reversed(jobs.values()))) < _key(list(jobs.values())[-2]):
            items = sorted(jobs.values(), key=_key)
            jobs.clear()
            jobs.update((j.id, j) for j in items)
        self._users.setdefault(g, _Ring()).add(job.user_id)
        self._guilds.add(g)

    def remove(self, job_id: int) -> QueueEntry | None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        g = self._gkey(job)
        jobs = self._per_user[(g, job.user_id)]
        del jobs[job_id]
        if not jobs:
            del self._per_user[(g, job.user_id)]
            self._users[g].discard(job.user_id)
            if not self._users[g].members:
                del self._users[g]
                self._guilds.discard(g)
        return job

    def pop(self, eligible: Callable[[int], bool] | None = None) -> QueueEntry | None:
        """Take the next job in fair order, advancing the round-robin pointers. With ``eligible``, users for
        whom it is False are passed over without losing their place (they go first once eligible again)."""
        if not self._jobs:
            return None
        for g in self._guilds.order:
            users = self._users[g]
            u = next((u for u in users.order if eligible is None or eligible(u)), None)
            if u is not None:
                break
        else:
            return None
        self._guilds.order.remove(g)
        users.order.remove(u)
        jobs = self._per_user[(g, u)]
        job_id, job = next(iter(jobs.items()))
        del jobs[job_id]
        del self._jobs[job_id]
        if jobs:
            users.order.append(u)
        else:
            users.members.discard(u)
            del self._per_user[(g, u)]
        if users.order:
            self._guilds.order.append(g)
        else:
            self._guilds.members.discard(g)
            del self._users[g]
        return job

    def order(self) -> list[QueueEntry]:
        """The dispatch order if nothing else arrived (simulated on copies; O(n))."""
        guilds = deque(self._guilds.order)
        users = {g: deque(r.order) for g, r in self._users.items()}
        per_user = {k: deque(v.values()) for k, v in self._per_user.items()}
        out: list[QueueEntry] = []
        while guilds:
            g = guilds.popleft()
            u = users[g].popleft()
            out.append(per_user[(g, u)].popleft())
            if per_user[(g, u)]:
                users[g].append(u)
            if users[g]:
                guilds.append(g)
        return out

    def positions(self) -> dict[int, int]:
        """job id -> 1-based position in the dispatch order."""
        return {job.id: i for i, job in enumerate(self.order(), 1)}

    def position(self, job_id: int) -> int | None:
        return self.positions().get(job_id)

    def user_jobs(self, user_id: int) -> list[QueueEntry]:
        return [j for j in self._jobs.values() if j.user_id == user_id]

    def __iter__(self) -> Iterator[QueueEntry]:
        return iter(self.order())


def _key(job: QueueEntry) -> tuple:
    q = job.queued_at
    return (q.timestamp() if isinstance(q, datetime) else float(q), job.id)


class Scheduler:
    """A ``FairQueue`` with admission caps and an awaitable ``next()`` for the service's workers."""

    def __init__(self, per_user_cap: int = 5, total_cap: int = 1000, per_user_running: int | None = 2) -> None:
        if per_user_cap < 1 or total_cap < 1:
            raise ValueError("queue caps must be at least 1")
        if per_user_running is not None and per_user_running < 1:
            raise ValueError("per_user_running must be at least 1 (or None for no limit)")
        # With many engine slots, one user's burst would otherwise fill them all before anyone else arrives and
        # the others would wait behind it in the engine's FIFO, where fairness no longer applies.
        self.per_user_running = per_user_running
        self.queue = FairQueue()
        self.per_user_cap = per_user_cap
        self.total_cap = total_cap
        self._running: dict[int, QueueEntry] = {}
        self._reserved: dict[int, int] = {}  # user id -> admissions between reserve() and add()
        self._changed = asyncio.Event()
        self.closed = False

    def close(self) -> None:
        """Wake every ``next()`` waiter with ``SchedulerClosed``; queued jobs stay (they are in the database)."""
        self.closed = True
        self._changed.set()

    def reopen(self) -> None:
        self.closed = False

    def check_admission(self, user_id: int, per_user_cap: int | None = None,
                        elsewhere: Collection[int] = ()) -> None:
        """Raise ``QueueRefused`` if this user (or everyone) has too much queued, running or being admitted
        already. ``per_user_cap`` overrides the scheduler's cap for this check (a guild's own limit);
        ``elsewhere``: ids of the user's jobs other bot processes hold (they count against the same cap; one
        this scheduler holds too, e.g. adopted meanwhile, counts once)."""
        cap = self.per_user_cap if per_user_cap is None else per_user_cap
        mine = len(self.held_ids(user_id).union(elsewhere)) + self._reserved.get(user_id, 0)
        if mine >= cap:
            raise QueueRefused(user_cap_message(mine, cap))
        if len(self.queue) + sum(self._reserved.values()) >= self.total_cap:
            raise QueueRefused("The queue is full right now. Please try again in a few minutes.")

    def held_ids(self, user_id: int) -> set[int]:
        """The ids of ``user_id``'s jobs queued or running here."""
        return ({j.id for j in self.queue.user_jobs(user_id)}
                | {j.id for j in self._running.values() if j.user_id == user_id})

    def reserve(self, user_id: int, per_user_cap: int | None = None, elsewhere: Collection[int] = ()) -> None:
        """Check the caps and hold one slot for ``user_id`` in the same synchronous step, so admissions that
        are concurrently awaiting the database (between this and ``add``) cannot together exceed a cap.
        Every ``reserve`` must be matched by one ``release``."""
        self.check_admission(user_id, per_user_cap, elsewhere)
        self._reserved[user_id] = self._reserved.get(user_id, 0) + 1

    def release(self, user_id: int) -> None:
        """Give back a slot taken by ``reserve`` (just before ``add(..., force=True)``, or on refusal)."""
        left = self._reserved.get(user_id, 0) - 1
        if left < 0:
            raise ValueError(f"user {user_id} has no reserved admission to release")
        if left:
            self._reserved[user_id] = left
        else:
            del self._reserved[user_id]

    def add(self, job: QueueEntry, *, force: bool = False) -> int:
        """Queue a job (``force`` skips the caps: used when restoring jobs after a restart). Returns its position."""
        if not force:
            self.check_admission(job.user_id)
        self.queue.add(job)
        self._changed.set()
        return self.queue.position(job.id) or 0

    def cancel(self, job_id: int) -> bool:
        """Remove a job that has not started. False if it is running or unknown."""
        removed = self.queue.remove(job_id) is not None
        if removed:
            self._changed.set()
        return removed

    async def next(self) -> QueueEntry:
        """Wait for and take the next job; it counts as running until ``done(job_id)``."""
        while True:
            if self.closed:
                raise SchedulerClosed
            job = self.queue.pop(self._may_run if self.per_user_running is not None else None)
            if job is not None:
                self._running[job.id] = job
                self._changed.set()
                return job
            self._changed.clear()
            await self._changed.wait()

    def job(self, job_id: int) -> QueueEntry | None:
        """The queued or running job with this id (its ``payload`` is the caller's to use), else None."""
        return self._running.get(job_id) or self.queue._jobs.get(job_id)

    def _may_run(self, user_id: int) -> bool:
        return sum(1 for j in self._running.values() if j.user_id == user_id) < self.per_user_running  # type: ignore[operator]

    def done(self, job_id: int) -> None:
        if self._running.pop(job_id, None) is not None:
            self._changed.set()  # that user may run another job now

    def is_queued(self, job_id: int) -> bool:
        """Waiting in the queue (O(1), unlike ``position``, which simulates the dispatch order)."""
        return job_id in self.queue

    def position(self, job_id: int) -> int | None:
        """1-based queue position, 0 while running, None if unknown."""
        if job_id in self._running:
            return 0
        return self.queue.position(job_id)

    def positions(self) -> dict[int, int]:
        return self.queue.positions()

    @property
    def running(self) -> list[QueueEntry]:
        return list(self._running.values())
