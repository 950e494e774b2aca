"""This process's hold on its jobs, and the posting of their results.

Queued, running and unposted jobs carry this process's id (``owner``) and a lease it renews every ``lease_s / 3``.
On a database several bot processes share, only jobs whose lease ran out are taken from another process (its
process died or stopped): at start and at every renewal beat. SQLite is one process's alone (``bot.preflight``),
so there every stored job is this process's.

A result is posted in its own task; a post that fails is tried again after each of ``post_retry_delays`` while
this process runs, and the job keeps its lease meanwhile. One that still failed is left undelivered: the next start
posts it, or another process once the lease ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bot.metrics import BotMetrics
from bot.outcome import Outcome, Publisher, StoredImage, is_withheld
from bot.retry import while_unreachable
from bot.scheduler import QueueEntry, Scheduler
from store.models import FlaggedMode
from store.repository import Repository

log = logging.getLogger(__name__)


class Leases:
    def __init__(
        self,
        repo: Repository,
        scheduler: Scheduler,
        publisher: Publisher | None,
        *,
        owner: str,
        lease_s: float,
        positions_changed: asyncio.Event,
        flagged_mode: Callable[[int | None], Awaitable[str]],
        owns: Callable[[Any], bool] | None = None,
    ) -> None:
        self.repo = repo
        self.scheduler = scheduler
        self.publisher = publisher
        self.owner = owner
        self.lease_s = lease_s
        # None: decided by the database (SQLite is one process's alone, see bot.preflight)
        self.exclusive_database: bool | None = None
        # which stored jobs this front end resumes and delivers (None: all); the terminal front end and the
        # Discord bot may share a database, and neither can deliver the other's results
        self.owns = owns
        self.positions_changed = positions_changed  # set when this process's queue changed outside the workers
        self.flagged_mode = flagged_mode  # the guild's flagged_mode, for images read back from the store
        self.renewal: asyncio.Task | None = None
        self.publishing: dict[int, asyncio.Task] = {}  # generation id → its post, while under way
        self.post_failed: set[int] = set()  # posts that failed here for good: retried by the next start
        # a failed post (Discord down, a 5xx that outlived discord.py's own retries) is tried again after each of
        # these delays while this process runs; it keeps its lease meanwhile
        self.post_retry_delays: tuple[float, ...] = (30.0, 120.0, 600.0)
        self.retrying: dict[int, asyncio.Task] = {}  # generation id → its wait before the next attempt
        # called with each outcome once it is posted and recorded (moderation posts its flagged images' cases)
        self.on_delivered: Callable[[Outcome], Awaitable[None]] | None = None
        self.metrics: BotMetrics | None = None  # counts posted results when set (GenerationService.use_metrics)

    def exclusive(self) -> bool:
        """Whether this process has the database alone (then every stored job is its own)."""
        if self.exclusive_database is not None:
            return self.exclusive_database
        return bool(getattr(self.repo, "single_process", False))

    def owns_job(self, gen: Any) -> bool:
        """Whether this front end resumes and delivers stored job ``gen`` (``self.owns``; None: every job)."""
        return self.owns is None or self.owns(gen)

    def until(self) -> datetime:
        """When a lease taken or renewed now runs out, on the database's clock (what other hosts compare)."""
        return self.repo.now() + timedelta(seconds=self.lease_s)

    # -- start ---------------------------------------------------------------------------------------

    async def resume(self) -> list[int]:
        """Requeue interrupted jobs, load the queued jobs into the fair queue (on a shared database only those no
        live process holds) and post results that were finished but never posted. Returns the ids resumed."""
        offset = await self.repo.sync_clock()  # leases are on the database's clock, shared by every host
        if abs(offset.total_seconds()) > self.lease_s / 6:
            log.warning("this host's clock is %+.1f s off the database's; leases use the database's clock",
                        -offset.total_seconds())
        await self.repo.requeue_interrupted(orphans_only=not self.exclusive(), mine=self.owner)
        resumed = await (self._load_queued() if self.exclusive() else self.adopt_queued())
        await self.post_undelivered()
        return resumed

    async def _load_queued(self, only: set[int] | None = None) -> list[int]:
        """Put the database's queued jobs (those in ``only``, if given) this front end owns into the fair queue."""
        added = []
        for job in await self.repo.queued_generations():
            if (only is None or job.id in only) and job.id not in self.scheduler.queue and self.owns_job(job):
                self.scheduler.add(QueueEntry(job.id, job.user_id, job.guild_id, job.queued_at), force=True)
                added.append(job.id)
        return added

    async def adopt_queued(self) -> list[int]:
        """On a shared database: take into this process's queue the queued jobs no live process holds (their
        process died or stopped; their lease ran out), each adopted atomically first. Returns the ids taken."""
        free = [job.id for job in await self.repo.queued_generations(unvouched=True)
                if job.id not in self.scheduler.queue and self.owns_job(job)]
        if not free:
            return []
        adopted = set(await self.repo.adopt_queued(free, self.owner, self.until()))
        return await self._load_queued(adopted) if adopted else []

    async def post_undelivered(self) -> None:
        """Post the finished results nobody posted: all of them on a database this process has alone; on a shared
        one only those no live process vouches for, each adopted atomically first. A post that failed in this
        process is left to the next start (or to another process, once its lease runs out)."""
        exclusive = self.exclusive()
        for gen in await self.repo.undelivered():
            if (not self.owns_job(gen) or gen.id in self.publishing or gen.id in self.post_failed
                    or gen.id in self.retrying):
                continue
            if not exclusive and not await self.repo.adopt_result(gen.id, self.owner, self.until()):
                continue
            self.publish_later(Outcome(gen, await self._stored_images(gen), error=gen.error))

    async def _stored_images(self, gen: Any) -> list[StoredImage]:
        withhold = await self.flagged_mode(gen.guild_id) == FlaggedMode.WITHHOLD.value
        out = []
        for row in sorted(gen.images, key=lambda r: (r.rank if r.rank is not None else r.index)):
            path = Path(row.file_path) if row.file_path else None
            png = await asyncio.to_thread(path.read_bytes) if path and path.exists() else b""
            out.append(StoredImage(id=row.id, index=row.index, rank=row.rank or 0, path=path or Path(),
                                   sha256=row.sha256 or "", clip_score=row.clip_score or 0.0, flagged=row.flagged,
                                   hidden=row.hidden, png=png,
                                   withheld=is_withheld(row.flagged, row.hidden, withhold, row.critical)))
        return out

    # -- renewal -------------------------------------------------------------------------------------

    def start_renewing(self) -> None:
        self.renewal = asyncio.create_task(self._renew_loop(), name="dalle-leases")

    async def stop_renewing(self) -> None:
        """No more renewals or take-overs; the leases held outlast a shutdown's grace."""
        if self.renewal is not None:
            self.renewal.cancel()
            await asyncio.gather(self.renewal, return_exceptions=True)
            self.renewal = None

    async def _renew_loop(self) -> None:
        """Renew the leases of this process's queued, running and unposted jobs; on a shared database, also take
        over the jobs of a process that died (their lease ran out): running ones go back to the queue, and queued
        ones into this process's queue."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.repo.sync_clock()  # the database's clock drifts from the monotonic one: re-anchor
            except Exception:  # noqa: BLE001 - the last good anchor serves; leases are still renewed below
                log.warning("reading the database's clock failed", exc_info=True)
            try:
                await self._renew()
            except Exception:  # noqa: BLE001 - retried on the next beat; a lease lasts three beats
                log.warning("renewing job leases failed", exc_info=True)

    async def _renew(self) -> None:
        queued = self.scheduler.queue.ids()
        running = [job.id for job in self.scheduler.running]  # (running ids include claims under way)
        mine = [*running, *self.publishing, *self.retrying, *queued]
        renewed = await self.repo.renew_leases(self.owner, mine, self.until())
        if self.exclusive():  # (alone on its database, a process holds jobs it never leased)
            return
        # A queued job whose lease this process could not renew was taken by another one (this process stalled
        # past its lease): drop it here, so it is neither run nor counted twice.
        lost = [i for i in queued if i not in renewed and self.scheduler.queue.remove(i) is not None]
        if lost or not renewed >= set(self.publishing):
            log.warning("%d of this process's %d leases were taken over (queued jobs dropped: %s)",
                        len(set(mine) - renewed), len(mine), lost)
        if lost:
            self.positions_changed.set()
        orphans = await self.repo.requeue_interrupted(orphans_only=True)
        adopted = await self.adopt_queued()
        if adopted:
            log.warning("took %d queued job(s) whose process stopped renewing them (%d of them running there): %s",
                        len(adopted), len(set(adopted) & set(orphans)), adopted)
            self.positions_changed.set()
        await self.post_undelivered()

    # -- posting -------------------------------------------------------------------------------------

    def publish_later(self, outcome: Outcome, attempt: int = 0) -> None:
        """Post a stored result in its own task. The worker's engine slot is free once the images are stored:
        posting waits on Discord (one channel's messages go out one at a time), and a worker held through it
        keeps the next job from the engine, so the engine samples smaller batches than it could."""
        gid = outcome.generation.id
        task = asyncio.create_task(self._publish(outcome, attempt), name=f"dalle-publish-{gid}")
        self.publishing[gid] = task
        task.add_done_callback(lambda _t: self.publishing.pop(gid, None))

    async def _publish(self, outcome: Outcome, attempt: int = 0) -> None:
        if self.publisher is None:
            return
        gid = outcome.generation.id
        try:
            # on a shared database another process may have adopted this result while this one was too slow to
            # renew its lease: then that one posts it (checked and re-leased at once, so it cannot adopt it now)
            if not self.exclusive() and not await self.repo.hold_result(gid, self.owner, self.until()):
                log.warning("generation %s: another process took over posting it; not posting it here", gid)
                return
            message_id = await self.publisher.publish(outcome)
        except Exception:  # noqa: BLE001 - stays undelivered: tried again later here, else by the next start
            if attempt < len(self.post_retry_delays) and not self.scheduler.closed:
                delay = self.post_retry_delays[attempt]
                log.warning("publishing generation %s failed (attempt %d); trying again in %.0f s", gid,
                            attempt + 1, delay, exc_info=True)
                self.retrying[gid] = asyncio.create_task(self._publish_again(outcome, attempt + 1, delay),
                                                         name=f"dalle-publish-retry-{gid}")
            else:
                log.exception("publishing generation %s failed; the next start posts it", gid)
                self.post_failed.add(gid)
            return
        try:  # posted: recording it rides out a database restart rather than posting it again at the next start
            await while_unreachable(f"recording the delivery of generation {gid}",
                                    lambda: self.repo.mark_delivered(gid, result_message_id=message_id))
        except Exception:  # noqa: BLE001 - posted but not recorded: the next start may post it again
            log.exception("recording the delivery of generation %s failed", gid)
            self.post_failed.add(gid)
            return
        if self.metrics is not None:
            self.metrics.results_posted.labels("ok" if outcome.ok else "failed").inc()
        if self.on_delivered is not None:
            try:
                await self.on_delivered(outcome)
            except Exception:  # noqa: BLE001 - the result is delivered; what follows is best effort
                log.warning("after delivering generation %s", gid, exc_info=True)

    async def _publish_again(self, outcome: Outcome, attempt: int, delay: float) -> None:
        gid = outcome.generation.id
        try:
            await asyncio.sleep(delay)
        finally:
            self.retrying.pop(gid, None)
        if not self.scheduler.closed:
            self.publish_later(outcome, attempt)

    # -- stop ----------------------------------------------------------------------------------------

    async def hand_over(self, deadline: float) -> None:
        """At a stop: posts waiting for a retry are dropped, posts under way get until ``deadline``
        (``time.monotonic()``); then this process stops vouching for its unposted results and queued jobs, so
        another process (or the next start) runs and posts them at once."""
        for task in self.retrying.values():  # waiting to post again: the next start posts them
            task.cancel()
        handed_over = [*self.publishing, *self.post_failed, *self.retrying, *self.scheduler.queue.ids()]
        await asyncio.gather(*self.retrying.values(), return_exceptions=True)
        if self.publishing:
            posting = list(self.publishing.values())
            _, pending = await asyncio.wait(posting, timeout=max(deadline - time.monotonic(), 0.5))
            for task in pending:
                task.cancel()
            await asyncio.gather(*posting, return_exceptions=True)
        if handed_over:
            with contextlib.suppress(Exception):
                await self.repo.renew_leases(self.owner, handed_over, self.repo.now() - timedelta(seconds=1))
