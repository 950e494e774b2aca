"""The Discord-independent life of a request: admit → persist → schedule → generate → persist → publish.

Both front ends (``bot.cogs.generate`` for Discord, ``bot.local`` for the terminal) drive this one service, so
filters, rate limits, queue caps, fairness and the database records are identical in both. A front end
implements ``Publisher`` to show progress and results; everything it needs to deliver a result later (after
a restart, after the interaction token expired) is on the ``Generation`` row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from bot.filters import FilterDecision, GuildPolicy, PromptFilter
from bot.ratelimit import LimitPolicy, RateLimiter
from bot.ratelimit import _human as _human
from bot.scheduler import QueuedJob, QueueRefused, Scheduler, SchedulerClosed, user_cap_message
from engine.api import Engine, EngineError, GenerationRequest, GenerationResult, RequestCancelled
from engine.priority import DEFAULT_MODEL_NICE
from store.models import CaseSource, FeedbackKind, FeedbackReason, FlaggedMode, GenerationKind, Status
from store.repository import ActiveLimitReached, NewImage, Repository, TakenOver

log = logging.getLogger(__name__)

MAX_IMAGES = 9
SEED_LIMIT = 2**31
LONG_PROMPT = 200  # characters above which the prompt filter runs in a worker thread


def from_discord(gen: Any) -> bool:
    """A job that came through a Discord interaction (it carries the application id): only the Discord bot can
    deliver it; jobs without one were typed at the terminal front end."""
    return getattr(gen, "application_id", None) is not None


def derive_seed(parent_seed: int, index: int) -> int:
    """Seed of a variation of image ``index`` of a generation with ``parent_seed``: a pure function of the
    lineage, so a variation is reproducible from the rows alone."""
    digest = hashlib.blake2b(f"variation:{parent_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_LIMIT


# --------------------------------------------------------------------------------------------------
# What the front ends see


@dataclass(frozen=True)
class Delivery:
    """Where and how to post the result (Discord: interaction token and channel; local: nothing)."""

    channel_id: int | None = None
    application_id: int | None = None
    interaction_token: str | None = None
    token_expires_at: datetime | None = None
    upload_limit: int | None = None  # bytes of attachments per message (Discord's attachment_size_limit)


@dataclass(frozen=True)
class Admission:
    """The answer to a submit: either a queued generation with its position, or a refusal with a reason."""

    ok: bool
    generation_id: int | None = None
    position: int | None = None
    seed: int | None = None
    category: str | None = None  # filter category, "rate:<scope>", "queue", "banned", "invalid"
    message: str = ""
    retry_after: float | None = None


@dataclass
class StoredImage:
    id: int
    index: int
    rank: int
    path: Path
    sha256: str
    clip_score: float
    flagged: bool
    hidden: bool  # shown behind a spoiler
    withheld: bool  # not posted at all (guild flagged_mode = withhold)
    png: bytes = field(repr=False, default=b"")


@dataclass
class Outcome:
    """A finished generation, ready to publish."""

    generation: Any  # store.models.Generation
    images: list[StoredImage]  # best CLIP score first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ProgressUpdate:
    generation_id: int
    state: str  # queued / running
    position: int | None = None
    tokens_done: int = 0
    tokens_total: int = 0

    @property
    def text(self) -> str:
        if self.state == "queued":
            return f"Queued, position {self.position}." if self.position else "Queued."
        if self.tokens_total:
            return f"Generating… {100 * self.tokens_done // self.tokens_total}%"
        return "Generating…"


class Publisher(Protocol):
    """A front end's side of the lifecycle; every method must tolerate being called after a restart."""

    async def progress(self, generation: Any, update: ProgressUpdate) -> None: ...

    async def publish(self, outcome: Outcome) -> int | None:
        """Post the result (or the failure); return the message id if there is one."""


@dataclass(frozen=True)
class FeedbackResult:
    ok: bool
    message: str
    case_id: int | None = None


# --------------------------------------------------------------------------------------------------


class GenerationService:
    def __init__(
        self,
        repo: Repository,
        engine: Engine,
        publisher: Publisher | None = None,
        *,
        output_dir: str | Path = "outputs",
        prompt_filter: PromptFilter | None = None,
        limiter: RateLimiter | None = None,
        scheduler: Scheduler | None = None,
        concurrency: int = 16,
        default_images: int = 9,
        progress_interval: float = 2.0,
        flagged_mode: str = FlaggedMode.SPOILER.value,
        checkpoint_id: str | None = None,
        guild_settings_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        lease_s: float = 60.0,
        engine_stall_timeout: float = 600.0,
    ) -> None:
        self.repo = repo
        self.engine = engine
        self.publisher = publisher
        self.output_dir = Path(output_dir)
        self.filter = prompt_filter or PromptFilter()
        self.limiter = limiter or RateLimiter()
        self.scheduler = scheduler or Scheduler()
        self.concurrency = concurrency
        self.default_images = default_images
        self.progress_interval = progress_interval
        self.flagged_mode = flagged_mode
        self.checkpoint_id = checkpoint_id
        self.clock = clock
        # a job whose engine event stream says nothing for this long (no queue move, no tokens) is given up:
        # cancelled on the engine and failed, so a hung model thread does not hold it, and its user, forever.
        # Longer than one sampling pass (a job queued in the engine waits a whole pass between events). 0: off.
        self.engine_stall_timeout = engine_stall_timeout
        self.retry_delay = 0.5  # seconds before the first retry of a failed database claim (doubling)
        # in engine request ids: another bot (or this one on a fresh database) numbers its jobs from 1 too, and an
        # engine service remembers ids for result_ttl; a clash would be refused as a duplicate request
        self._run_nonce = secrets.token_hex(4)
        # running jobs carry this process's id and a lease it renews every lease_s / 3; on a database several bot
        # processes share, only jobs whose lease ran out are taken back from a dead process (at start and while
        # running). None: decided by the database (SQLite is one process's alone, see bot.preflight).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{self._run_nonce}"
        self.lease_s = lease_s
        self.exclusive_database: bool | None = None
        self._lease_task: asyncio.Task | None = None
        # which stored jobs this front end resumes and delivers at start (None: all); the terminal front end and
        # the Discord bot may share a database, and neither can deliver the other's results
        self.owns: Callable[[Any], bool] | None = None
        self._workers: list[asyncio.Task] = []
        self._positions_changed = asyncio.Event()
        self._turns = _Turns()
        self._position_task: asyncio.Task | None = None
        self._running: dict[int, asyncio.Task] = {}
        self._publishing: dict[int, asyncio.Task] = {}  # generation id → its post, while under way
        self._post_failed: set[int] = set()  # posts that failed here for good: retried by the next start
        # a failed post (Discord down, a 5xx that outlived discord.py's own retries) is tried again after each of
        # these delays while this process runs; it keeps its lease meanwhile
        self.post_retry_delays: tuple[float, ...] = (30.0, 120.0, 600.0)
        self._post_retries: dict[int, asyncio.Task] = {}  # generation id → its wait before the next attempt
        self._engine_ids: dict[int, str] = {}
        self._closing = False
        self._last_positions: dict[int, int] = {}
        # guild settings are read on every submit and every finished job; they change rarely. Updates through
        # this service invalidate at once; the TTL bounds how long another process's update goes unseen.
        self.guild_settings_ttl = guild_settings_ttl
        self._guild_cache: dict[int, tuple[float, Any]] = {}
        self._guild_loads: dict[int, asyncio.Future] = {}
        self._guild_epoch: dict[int, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> list[int]:
        """Requeue interrupted jobs, load the queued jobs into the fair queue (on a shared database only those no
        live process holds), deliver results that were finished but never posted, and start the workers.
        Returns the ids of the jobs resumed."""
        self._closing = False
        self._turns = _Turns()
        self.scheduler.reopen()
        start_engine = getattr(self.engine, "start", None)  # an in-process engine warms up while the bot starts
        if callable(start_engine):
            start_engine()
        offset = await self.repo.sync_clock()  # leases are on the database's clock, shared by every host
        if abs(offset.total_seconds()) > self.lease_s / 6:
            log.warning("this host's clock is %+.1f s off the database's; leases use the database's clock",
                        -offset.total_seconds())
        await self.repo.requeue_interrupted(orphans_only=not self._exclusive(), mine=self.owner)
        resumed = await (self._load_queued() if self._exclusive() else self._adopt_queued())
        await self._post_undelivered()
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"dalle-worker-{i}") for i in range(self.concurrency)
        ]
        self._position_task = asyncio.create_task(self._position_loop(), name="dalle-positions")
        self._lease_task = asyncio.create_task(self._lease_loop(), name="dalle-leases")
        return resumed

    def _exclusive(self) -> bool:
        if self.exclusive_database is not None:
            return self.exclusive_database
        return bool(getattr(self.repo, "single_process", False))

    def _owns(self, gen: Any) -> bool:
        """Whether this front end resumes and delivers stored job ``gen`` (``self.owns``; None: every job)."""
        return self.owns is None or self.owns(gen)

    async def _load_queued(self, only: set[int] | None = None) -> list[int]:
        """Put the database's queued jobs (those in ``only``, if given) this front end owns into the fair queue."""
        added = []
        for job in await self.repo.queued_generations():
            if (only is None or job.id in only) and job.id not in self.scheduler.queue and self._owns(job):
                self.scheduler.add(QueuedJob(job.id, job.user_id, job.guild_id, job.queued_at), force=True)
                added.append(job.id)
        return added

    async def _adopt_queued(self) -> list[int]:
        """On a shared database: take into this process's queue the queued jobs no live process holds (their
        process died or stopped; their lease ran out), each adopted atomically first. Returns the ids taken."""
        free = [job.id for job in await self.repo.queued_generations(unvouched=True)
                if job.id not in self.scheduler.queue and self._owns(job)]
        if not free:
            return []
        adopted = set(await self.repo.adopt_queued(free, self.owner, self._lease()))
        return await self._load_queued(adopted) if adopted else []

    def _lease(self) -> datetime:
        """When a lease taken or renewed now runs out, on the database's clock (what other hosts compare)."""
        return self.repo.now() + timedelta(seconds=self.lease_s)

    async def _post_undelivered(self) -> None:
        """Post the finished results nobody posted: all of them on a database this process has alone; on a shared
        one only those no live process vouches for, each adopted atomically first. A post that failed in this
        process is left to the next start (or to another process, once its lease runs out)."""
        exclusive = self._exclusive()
        for gen in await self.repo.undelivered():
            if (not self._owns(gen) or gen.id in self._publishing or gen.id in self._post_failed
                    or gen.id in self._post_retries):
                continue
            if not exclusive and not await self.repo.adopt_result(gen.id, self.owner, self._lease()):
                continue
            self._publish_later(Outcome(gen, await self._stored_images(gen), error=gen.error))

    async def _lease_loop(self) -> None:
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
                queued = self.scheduler.queue.ids()
                mine = [*self._running, *self._publishing, *self._post_retries, *queued]
                renewed = await self.repo.renew_leases(self.owner, mine, self._lease())
                if not self._exclusive():  # (alone on its database, a process holds jobs it never leased)
                    # A queued job whose lease this process could not renew was taken by another one (this
                    # process stalled past its lease): drop it here, so it is neither run nor counted twice.
                    lost = [i for i in queued if i not in renewed and self.scheduler.queue.remove(i) is not None]
                    if lost or not renewed >= set(self._publishing):  # (running ids include claims under way)
                        log.warning("%d of this process's %d leases were taken over (queued jobs dropped: %s)",
                                    len(set(mine) - renewed), len(mine), lost)
                    if lost:
                        self._positions_changed.set()
                    orphans = await self.repo.requeue_interrupted(orphans_only=True)
                    adopted = await self._adopt_queued()
                    if adopted:
                        log.warning("took %d queued job(s) whose process stopped renewing them (%d of them "
                                    "running there): %s", len(adopted), len(set(adopted) & set(orphans)), adopted)
                        self._positions_changed.set()
                    await self._post_undelivered()
            except Exception:  # noqa: BLE001 - retried on the next beat; a lease lasts three beats
                log.warning("renewing job leases failed", exc_info=True)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work; let running jobs finish within ``grace`` seconds, else put them back in the queue
        (status queued) so the next start resumes them. Nothing is left half-recorded: the step that stores
        images and marks the job done runs shielded from cancellation. Results still being posted get the rest
        of ``grace``; one not posted by then stays undelivered and is posted by the next start."""
        self._closing = True
        self.scheduler.close()  # idle workers return; nothing is cancelled in the middle of a database call
        deadline = time.monotonic() + grace
        if self._lease_task is not None:  # no more take-overs; the leases held outlast the grace
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
            self._lease_task = None
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in self._post_retries.values():  # waiting to post again: the next start posts them
            task.cancel()
        handed_over = [*self._publishing, *self._post_failed, *self._post_retries, *self.scheduler.queue.ids()]
        await asyncio.gather(*self._post_retries.values(), return_exceptions=True)
        if self._publishing:
            posting = list(self._publishing.values())
            _, pending = await asyncio.wait(posting, timeout=max(deadline - time.monotonic(), 0.5))
            for task in pending:
                task.cancel()
            await asyncio.gather(*posting, return_exceptions=True)
        if handed_over:  # this process no longer vouches for them: another process (or the next start) runs/posts them
            with contextlib.suppress(Exception):
                await self.repo.renew_leases(self.owner, handed_over, self.repo.now() - timedelta(seconds=1))
        _, stuck = await asyncio.wait(self._workers, timeout=5.0) if self._workers else (set(), set())
        for w in stuck:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._position_task is not None:
            self._position_task.cancel()
            await asyncio.gather(self._position_task, return_exceptions=True)
            self._position_task = None

    # -- admission -----------------------------------------------------------------------------------

    async def guild_settings(self, guild_id: int | None) -> Any:
        """The guild's ``GuildSettings`` row (None if it has none), cached for ``guild_settings_ttl`` seconds;
        concurrent misses for one guild share one database read."""
        if guild_id is None:
            return None
        hit = self._guild_cache.get(guild_id)
        if hit is not None and hit[0] > self.clock():
            return hit[1]
        load = self._guild_loads.get(guild_id)
        if load is None:
            load = asyncio.ensure_future(self._load_guild_settings(guild_id))
            self._guild_loads[guild_id] = load
            load.add_done_callback(lambda f: self._guild_loads.pop(guild_id, None)
                                   if self._guild_loads.get(guild_id) is f else None)
        return await asyncio.shield(load)

    async def _load_guild_settings(self, guild_id: int) -> Any:
        epoch = self._guild_epoch.get(guild_id, 0)
        gs = await self.repo.get_guild_settings(guild_id)
        if self._guild_epoch.get(guild_id, 0) == epoch:  # not invalidated while reading: safe to keep
            self._guild_cache[guild_id] = (self.clock() + self.guild_settings_ttl, gs)
        return gs

    def invalidate_guild_settings(self, guild_id: int | None = None) -> None:
        """Forget the cached settings of one guild (or all): the next read goes to the database."""
        for gid in ([guild_id] if guild_id is not None else list(self._guild_cache) + list(self._guild_loads)):
            self._guild_cache.pop(gid, None)
            self._guild_loads.pop(gid, None)
            self._guild_epoch[gid] = self._guild_epoch.get(gid, 0) + 1

    async def update_guild_settings(self, guild_id: int, **fields: Any) -> Any:
        """Change a guild's settings (the repository validates ``fields``); this process sees it at once."""
        self.invalidate_guild_settings(guild_id)
        try:
            return await self.repo.update_guild_settings(guild_id, **fields)
        finally:
            self.invalidate_guild_settings(guild_id)  # a read that raced the write must not keep the old row

    async def _policies(self, guild_id: int | None) -> tuple[GuildPolicy, LimitPolicy | None, int | None, str]:
        gs = await self.guild_settings(guild_id)
        if gs is None:
            return GuildPolicy(), None, None, self.flagged_mode
        base = self.limiter.policy
        limit = LimitPolicy(
            user=gs.rate_limit_user or base.user,
            guild=gs.rate_limit_guild or base.guild,
            daily_quota=gs.daily_quota if gs.daily_quota is not None else base.daily_quota,
        )
        return (GuildPolicy(block=gs.block_list or (), allow=gs.allow_list or ()), limit, gs.max_queue_per_user,
                gs.flagged_mode or self.flagged_mode)

    async def submit(
        self,
        *,
        user_id: int,
        prompt: str,
        guild_id: int | None = None,
        n: int | None = None,
        seed: int | None = None,
        private: bool = False,
        delivery: Delivery | None = None,
        kind: str = GenerationKind.NEW.value,
        parent_generation_id: int | None = None,
        parent_image_id: int | None = None,
        count_rate: bool = True,
    ) -> Admission:
        """Admit a request or refuse it with a reason the user can act on. Every refusal is recorded."""
        n = self.default_images if n is None else n
        if not 1 <= n <= MAX_IMAGES:
            return await self._refuse(user_id, guild_id, prompt, None, "invalid",
                                      f"images must be between 1 and {MAX_IMAGES}.")
        if seed is not None and not 0 <= seed < 2**63:
            return await self._refuse(user_id, guild_id, prompt, None, "invalid", "seed must be between 0 and 2^63-1.")
        if self._closing:
            return Admission(False, category="closing", message="The bot is restarting; try again in a minute.")
        state = await self.repo.get_user_state(user_id)
        if state is not None and state.banned:
            return await self._refuse(user_id, guild_id, prompt, None, "banned",
                                      "You are not allowed to generate images here.")
        policy, limits, user_cap, _ = await self._policies(guild_id)
        if user_cap is None:
            user_cap = self.scheduler.per_user_cap
        decision: FilterDecision = (
            await asyncio.to_thread(self.filter.check, prompt, policy)  # long prompts cost milliseconds: off the loop
            if len(prompt) > LONG_PROMPT else self.filter.check(prompt, policy))
        if not decision.allowed:
            msg = f"Sorry, I can't draw that: {decision.reason}"
            if decision.category != "invalid":
                strikes, cooldown = await self.limiter.strike(user_id)
                await self.repo.add_strike(user_id)
                if cooldown:
                    msg += f" You're on a cooldown for {_human(cooldown)} after {strikes} blocked prompts."
            return await self._refuse(user_id, guild_id, prompt, decision.normalised, decision.category or "filter",
                                      msg, detail=decision.matched)
        # Admission is atomic without a lock: the cap check and the slot it takes are one synchronous step on the
        # event loop, and the held slot counts against the caps while the rate limiter and the insert are awaited.
        # On a shared database the user's jobs other processes hold count too (read just before; one this process
        # adopted meanwhile counts once), and the insert counts again under a per-user database lock, which is
        # what holds when two processes admit the same user at once.
        shared = not self._exclusive()
        elsewhere = await self.repo.active_ids(user_id, not_owner=self.owner) if shared else set()
        try:
            self.scheduler.reserve(user_id, user_cap, elsewhere)
        except QueueRefused as exc:
            return await self._refuse(user_id, guild_id, prompt, decision.normalised, "queue", str(exc))
        reserved = True
        try:
            if count_rate:
                rate = await self.limiter.hit(user_id, guild_id, limits)
                if not rate.allowed:
                    self.scheduler.release(user_id)
                    reserved = False
                    return await self._refuse(user_id, guild_id, prompt, decision.normalised, f"rate:{rate.scope}",
                                              rate.message, retry_after=rate.retry_after)
            seed = secrets.randbelow(SEED_LIMIT) if seed is None else seed
            d = delivery or Delivery()
            try:
                gen = await self.repo.create_generation(
                    user_id=user_id, prompt=prompt, normalized_prompt=decision.normalised, guild_id=guild_id,
                    channel_id=d.channel_id, n_images=n, seed=seed, kind=kind,
                    parent_generation_id=parent_generation_id, parent_image_id=parent_image_id,
                    checkpoint_id=self.checkpoint_id, private=private, application_id=d.application_id,
                    interaction_token=d.interaction_token, token_expires_at=d.token_expires_at,
                    upload_limit=d.upload_limit, owner=self.owner, lease_until=self._lease(),
                    max_active=user_cap if shared else None,
                )
            except ActiveLimitReached as exc:  # another process admitted this user meanwhile
                self.scheduler.release(user_id)
                reserved = False
                return await self._refuse(user_id, guild_id, prompt, decision.normalised, "queue",
                                          user_cap_message(exc.active, user_cap))
            self.scheduler.release(user_id)  # the slot becomes the queued job, with no await in between
            reserved = False
            position = self.scheduler.add(QueuedJob(gen.id, user_id, guild_id, gen.queued_at, payload=gen),
                                          force=True)
        finally:
            if reserved:
                self.scheduler.release(user_id)
        log.info("queued generation %s for user %s at position %s", gen.id, user_id, position)
        return Admission(True, generation_id=gen.id, position=position, seed=seed)

    async def _refuse(self, user_id, guild_id, prompt, normalised, category, message, *, detail=None,
                      retry_after=None) -> Admission:
        reason = category if not detail else f"{category}: {detail}"
        await self.repo.record_refusal(user_id=user_id, guild_id=guild_id, prompt=prompt[:2000], reason=reason,
                                       normalized=normalised)
        log.info("refused user %s (%s)", user_id, reason)
        return Admission(False, category=category, message=message, retry_after=retry_after)

    async def reroll(self, generation_id: int, user_id: int, *, guild_id: int | None = None,
                     delivery: Delivery | None = None) -> Admission:
        """Same prompt and size, a new random seed; the new row points at its parent."""
        parent = await self.repo.get_generation(generation_id, with_images=False)
        if parent is None:
            return Admission(False, category="invalid", message="That generation no longer exists.")
        return await self.submit(
            user_id=user_id, prompt=parent.prompt, guild_id=guild_id if guild_id is not None else parent.guild_id,
            n=parent.n_images, private=parent.private, delivery=delivery, kind=GenerationKind.REROLL.value,
            parent_generation_id=parent.id,
        )

    async def variation(self, image_id: int, user_id: int, *, guild_id: int | None = None,
                        delivery: Delivery | None = None) -> Admission:
        """More like image ``image_id``: the same prompt with a seed derived from (parent seed, image index)."""
        image = await self.repo.get_image(image_id)
        if image is None:
            return Admission(False, category="invalid", message="That image no longer exists.")
        parent = await self.repo.get_generation(image.generation_id, with_images=False)
        return await self.submit(
            user_id=user_id, prompt=parent.prompt, guild_id=guild_id if guild_id is not None else parent.guild_id,
            n=parent.n_images, seed=derive_seed(parent.seed, image.index), private=parent.private,
            delivery=delivery, kind=GenerationKind.VARIATION.value, parent_generation_id=parent.id,
            parent_image_id=image.id,
        )

    async def cancel(self, generation_id: int, user_id: int | None = None) -> bool:
        """Cancel a job that is still queued (only its owner may, unless ``user_id`` is None)."""
        gen = await self.repo.get_generation(generation_id, with_images=False)
        if gen is None or (user_id is not None and gen.user_id != user_id) or gen.status != Status.QUEUED.value:
            return False
        if not self.scheduler.cancel(generation_id):
            return False
        await self.repo.set_status(generation_id, Status.CANCELLED.value)
        await self.repo.mark_delivered(generation_id)
        return True

    async def feedback(self, image_id: int, user_id: int, kind: str, *, reason: str | None = None,
                       note: str | None = None) -> FeedbackResult:
        """Record 👍 / 👎 / report; a report opens (or joins) a moderation case."""
        if kind not in {k.value for k in FeedbackKind}:
            return FeedbackResult(False, f"Unknown feedback {kind!r}: use up, down or report.")
        if reason is not None and reason not in {r.value for r in FeedbackReason}:
            return FeedbackResult(False, f"Unknown reason {reason!r}: use nsfw, bias, quality or other.")
        if kind == FeedbackKind.REPORT.value and reason is None:
            reason = FeedbackReason.OTHER.value
        image = await self.repo.get_image(image_id)
        if image is None:
            return FeedbackResult(False, f"Image {image_id} does not exist.")
        await self.repo.record_feedback(image_id, user_id, kind, reason=reason, note=note)
        if kind != FeedbackKind.REPORT.value:
            return FeedbackResult(True, "Thanks for the feedback!")
        case, _ = await self.repo.open_case(CaseSource.REPORT.value, image_id=image_id,
                                            reason=f"{reason}: {note}" if note else reason)
        return FeedbackResult(True, "Thanks, a moderator will review this image.", case_id=case.id)

    # -- queries -------------------------------------------------------------------------------------

    def position(self, generation_id: int) -> int | None:
        return self.scheduler.position(generation_id)

    async def user_queue(self, user_id: int) -> list[tuple[Any, int | None]]:
        """The user's unfinished jobs with their positions (0 = running)."""
        out = []
        for gen in await self.repo.list_generations(user_id=user_id, limit=50):
            if gen.status in (Status.QUEUED.value, Status.RUNNING.value):
                out.append((gen, self.scheduler.position(gen.id)))
        out.sort(key=lambda p: (p[1] is None, p[1] or 0))
        return out

    # -- running -------------------------------------------------------------------------------------

    async def _worker(self, number: int) -> None:
        while not self._closing:
            try:
                job = await self.scheduler.next()
            except SchedulerClosed:
                return
            if self._closing:  # not claimed: it stays queued in the database for the next start
                self.scheduler.done(job.id)
                return
            self._positions_changed.set()  # told by the position task: the worker goes straight to the engine
            task = asyncio.create_task(self._run_job(job.id, self._turns.take()))
            self._running[job.id] = task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if self._closing:
                    raise
            except Exception:  # noqa: BLE001 - one job's bug must not kill the worker
                log.exception("generation %s crashed", job.id)
            finally:
                self._running.pop(job.id, None)
                self.scheduler.done(job.id)

    async def record_ack(self, generation_id: int, ack_message_id: int) -> Any:
        """Store the id of the message that acknowledged the request, in the row and in the queued job's
        snapshot that queue-position updates are published from."""
        gen = await self.repo.update_delivery(generation_id, ack_message_id=ack_message_id)
        job = self.scheduler.job(generation_id)
        if job is not None:
            job.payload = gen
        return gen

    async def _position_loop(self) -> None:
        """One task publishes queue positions after dispatches, coalescing bursts of them into one pass."""
        while True:
            await self._positions_changed.wait()
            self._positions_changed.clear()
            try:
                await self._notify_positions()
            except Exception:  # noqa: BLE001 - progress is best effort
                log.warning("queue position updates failed", exc_info=True)

    async def _notify_positions(self) -> None:
        if self.publisher is None:
            return
        positions = self.scheduler.positions()
        changed = {gid: p for gid, p in positions.items() if self._last_positions.get(gid) != p}
        self._last_positions = positions
        for gid, pos in changed.items():
            await asyncio.sleep(0)  # a long backlog of expired tokens never awaits below: let the loop breathe
            job = self.scheduler.job(gid)
            gen = job.payload if job is not None else None
            if gen is None:  # restored at start-up: read the row once
                gen = await self.repo.get_generation(gid, with_images=False)
                if job is not None:
                    job.payload = gen
            if gen is not None and self.scheduler.is_queued(gid):  # still queued after the awaits
                await self._progress(gen, ProgressUpdate(gid, "queued", position=pos))

    async def _progress(self, gen: Any, update: ProgressUpdate) -> None:
        if self.publisher is None:
            return
        try:
            await self.publisher.progress(gen, update)
        except Exception:  # noqa: BLE001 - progress is best effort
            log.warning("progress update for %s failed", update.generation_id, exc_info=True)

    async def _run_job(self, generation_id: int, turn: int | None = None) -> None:
        """Claim, hand to the engine in dispatch order (``turn``), await the result, store it, publish it."""
        turns = self._turns
        gen = None
        try:
            gen = await self._claim(generation_id)
        finally:
            if gen is None and turn is not None:  # no engine submit follows: let the next ticket go
                turns.finish(turn)
        if gen is None:  # cancelled (or taken by another process) meanwhile
            return
        request = GenerationRequest(prompt=gen.prompt, n=gen.n_images, seed=int(gen.seed),
                                    request_id=f"gen-{gen.id}-{gen.attempts}-{self._run_nonce}")
        try:
            try:
                if turn is not None:
                    await turns.wait(turn)  # claims run concurrently; the engine's FIFO gets the fair order
                rid = await self.engine.submit(request)
            finally:
                if turn is not None:
                    turns.finish(turn)
            self._engine_ids[gen.id] = rid
            await self._progress(gen, ProgressUpdate(gen.id, "running"))
            heard = _Heard(asyncio.get_running_loop().time())
            events = asyncio.create_task(self._forward_events(gen, rid, heard))
            try:
                result = await self._result_unless_stalled(rid, events, heard)
            finally:
                events.cancel()
                try:
                    await events
                except asyncio.CancelledError:
                    pass
                except Exception:  # noqa: BLE001 - progress is best effort; the result decides the job
                    log.warning("progress stream of generation %s failed", gen.id, exc_info=True)
        except asyncio.CancelledError:
            # shutdown: give the job back to the queue for the next start (and cancel it on the engine, also
            # when the submit was under way: the engine may have taken it under the id we chose)
            rid = self._engine_ids.get(gen.id, request.request_id)
            if rid:
                with contextlib.suppress(Exception):
                    await self.engine.cancel(rid)
            await asyncio.shield(self.repo.release(gen.id, self.owner))
            raise
        except (EngineError, RequestCancelled) as exc:
            await asyncio.shield(self._finish_failed(gen, str(exc) or exc.__class__.__name__))
            return
        except Exception:  # noqa: BLE001 - a bug or a broken engine: the user hears of it, the job is not stranded
            log.exception("generation %s: the engine call failed unexpectedly", gen.id)
            await asyncio.shield(self._finish_failed(gen, "internal error in the image engine; please try again"))
            return
        finally:
            self._engine_ids.pop(gen.id, None)
        try:
            outcome = await asyncio.shield(self._finish_ok(gen, result))
        except TakenOver:  # our lease ran out and another process runs the job now: its result counts
            log.warning("generation %s was taken over by another process; this result is dropped", gen.id)
            return
        except Exception:  # noqa: BLE001 - disk full, database gone...: fail the job instead of leaving it running
            log.exception("generation %s: storing the result failed", gen.id)
            await asyncio.shield(self._finish_failed(gen, "the images could not be stored; please try again"))
            return
        self._publish_later(outcome)

    async def _claim(self, generation_id: int, attempts: int = 4) -> Any:
        """``repo.claim`` with a few retries: a transient database error must not drop a queued job (the worker
        forgets it either way; the row would wait for the next start)."""
        for attempt in range(attempts):
            try:
                return await self.repo.claim(generation_id, self.owner, self._lease())
            except Exception:  # noqa: BLE001 - retried, then raised
                if attempt == attempts - 1:
                    raise
                log.warning("claiming generation %s failed; retrying", generation_id, exc_info=True)
                await asyncio.sleep(self.retry_delay * 2**attempt)
        return None

    async def _result_unless_stalled(self, rid: str, events: asyncio.Task, heard: _Heard) -> GenerationResult:
        """``engine.result(rid)``, given up (cancelled on the engine, EngineError) once the job's event stream has
        been silent for ``engine_stall_timeout``. A stream that ended or broke cannot be watched: then this waits
        for the result as it is."""
        loop = asyncio.get_running_loop()
        result = asyncio.ensure_future(self.engine.result(rid))
        try:
            while True:
                if not self.engine_stall_timeout or events.done():
                    return await result
                left = heard.at + self.engine_stall_timeout - loop.time()
                if left <= 0:
                    break
                done, _ = await asyncio.wait({result}, timeout=left)
                if done:
                    return result.result()
        finally:
            if not result.done():
                result.cancel()
        log.error("engine request %s: no progress for %.0f s; cancelling it", rid, self.engine_stall_timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.engine.cancel(rid), 10.0)
        raise EngineError(f"the image engine stopped responding (no progress for {_human(self.engine_stall_timeout)})"
                          "; please try again")

    async def _forward_events(self, gen: Any, rid: str, heard: _Heard) -> None:
        last = -1e9
        loop = asyncio.get_running_loop()
        async for ev in self.engine.events(rid):
            heard.at = loop.time()
            if ev.state != "running":
                continue
            now = self.clock()
            if now - last < self.progress_interval and ev.tokens_done < ev.tokens_total:
                continue
            last = now
            await self._progress(gen, ProgressUpdate(gen.id, "running", tokens_done=ev.tokens_done,
                                                     tokens_total=ev.tokens_total))

    async def _finish_failed(self, gen: Any, error: str) -> None:
        log.warning("generation %s failed: %s", gen.id, error)
        try:
            gen = await self.repo.set_status(gen.id, Status.FAILED.value, error=error[:500], owner=self.owner)
        except TakenOver:
            log.warning("generation %s was taken over by another process; not marked failed here", gen.id)
            return
        self._publish_later(Outcome(gen, [], error=error))

    async def _finish_ok(self, gen: Any, result: GenerationResult) -> Outcome:
        """Write PNGs, store Image rows, open cases for flagged images, mark done (one uncancellable step)."""
        _, _, _, mode = await self._policies(gen.guild_id)
        folder = self.output_dir / str(gen.id)
        files = await asyncio.to_thread(_write_pngs, folder, gen.id, result)
        new = [NewImage.from_generated(im, file_path=str(path), sha256=sha, hidden=bool(im.flagged))
               for im, (path, sha) in zip(result.images, files, strict=True)]
        if not any(im.flagged for im in new):  # the common case: one transaction
            gen, rows = await self.repo.finish_generation(gen.id, new, checkpoint_id=result.checkpoint_id,
                                                          owner=self.owner)
        else:  # the cases are opened before the job counts as done, so none is lost to a crash in between
            rows = await self.repo.add_images(gen.id, new, owner=self.owner)
            for row in rows:
                if row.flagged:
                    await self.repo.open_case(CaseSource.AUTO.value, image_id=row.id, generation_id=gen.id,
                                              reason="safety checker: " + ", ".join(
                                                  f"{k}={v:.2f}" for k, v in sorted(row.safety_scores.items())))
            gen = await self.repo.set_status(gen.id, Status.DONE.value, checkpoint_id=result.checkpoint_id)
        images = [
            StoredImage(id=row.id, index=row.index, rank=row.rank, path=Path(path), sha256=sha,
                        clip_score=row.clip_score, flagged=row.flagged, hidden=row.hidden,
                        withheld=row.flagged and mode == FlaggedMode.WITHHOLD.value, png=im.png)
            for row, im, (path, sha) in zip(rows, result.images, files, strict=True)
        ]
        images.sort(key=lambda s: s.rank)
        return Outcome(gen, images)

    async def _stored_images(self, gen: Any) -> list[StoredImage]:
        _, _, _, mode = await self._policies(gen.guild_id)
        out = []
        for row in sorted(gen.images, key=lambda r: (r.rank if r.rank is not None else r.index)):
            path = Path(row.file_path) if row.file_path else None
            png = await asyncio.to_thread(path.read_bytes) if path and path.exists() else b""
            out.append(StoredImage(id=row.id, index=row.index, rank=row.rank or 0, path=path or Path(),
                                   sha256=row.sha256 or "", clip_score=row.clip_score or 0.0, flagged=row.flagged,
                                   hidden=row.hidden, withheld=row.flagged and mode == FlaggedMode.WITHHOLD.value,
                                   png=png))
        return out

    def _publish_later(self, outcome: Outcome, attempt: int = 0) -> None:
        """Post a stored result in its own task. The worker's engine slot is free once the images are stored:
        posting waits on Discord (one channel's messages go out one at a time), and a worker held through it
        keeps the next job from the engine, so the engine samples smaller batches than it could."""
        gid = outcome.generation.id
        task = asyncio.create_task(self._publish(outcome, attempt), name=f"dalle-publish-{gid}")
        self._publishing[gid] = task
        task.add_done_callback(lambda _t: self._publishing.pop(gid, None))

    async def _publish(self, outcome: Outcome, attempt: int = 0) -> None:
        if self.publisher is None:
            return
        gid = outcome.generation.id
        try:
            message_id = await self.publisher.publish(outcome)
        except Exception:  # noqa: BLE001 - stays undelivered: tried again later here, else by the next start
            if attempt < len(self.post_retry_delays) and not self._closing:
                delay = self.post_retry_delays[attempt]
                log.warning("publishing generation %s failed (attempt %d); trying again in %.0f s", gid,
                            attempt + 1, delay, exc_info=True)
                self._post_retries[gid] = asyncio.create_task(self._publish_again(outcome, attempt + 1, delay),
                                                              name=f"dalle-publish-retry-{gid}")
            else:
                log.exception("publishing generation %s failed; the next start posts it", gid)
                self._post_failed.add(gid)
            return
        try:
            await self.repo.mark_delivered(outcome.generation.id, result_message_id=message_id)
        except Exception:  # noqa: BLE001 - posted but not recorded: the next start may post it again
            log.exception("recording the delivery of generation %s failed", outcome.generation.id)
            self._post_failed.add(outcome.generation.id)

    async def _publish_again(self, outcome: Outcome, attempt: int, delay: float) -> None:
        gid = outcome.generation.id
        try:
            await asyncio.sleep(delay)
        finally:
            self._post_retries.pop(gid, None)
        if not self._closing:
            self._publish_later(outcome, attempt)


@dataclass
class _Heard:
    """When (event-loop time) a job's engine event stream last said anything."""

    at: float


class _Turns:
    """Tickets in the order workers took jobs from the fair queue: ``wait(t)`` returns once every earlier ticket
    is ``finish``ed, so jobs whose database claims overlap still reach the engine in the scheduler's order."""

    def __init__(self) -> None:
        self._issued = 0
        self._turn = 0  # every ticket below this is finished
        self._finished: set[int] = set()
        self._waiters: dict[int, asyncio.Future] = {}

    def take(self) -> int:
        self._issued += 1
        return self._issued - 1

    async def wait(self, ticket: int) -> None:
        if ticket <= self._turn:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = fut
        try:
            await fut
        finally:
            self._waiters.pop(ticket, None)

    def finish(self, ticket: int) -> None:
        """Idempotent; must be called for every ticket taken (also when its job fails or is cancelled)."""
        if ticket < self._turn:
            return
        self._finished.add(ticket)
        while self._turn in self._finished:
            self._finished.discard(self._turn)
            self._turn += 1
        fut = self._waiters.get(self._turn)
        if fut is not None and not fut.done():
            fut.set_result(None)


def _write_pngs(folder: Path, gen_id: int, result: GenerationResult) -> list[tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for im in result.images:
        path = folder / f"{gen_id}-r{im.rank}-i{im.index}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(im.png)
        tmp.replace(path)
        out.append((path.resolve(), hashlib.sha256(im.png).hexdigest()))
    return out


# --------------------------------------------------------------------------------------------------
# Wiring from settings (shared by the Discord and terminal front ends)


class EngineUnavailable(RuntimeError):
    """The configured engine could not be started; the message is one line for the operator."""


def _setting(settings: Any, name: str, default: Any = None) -> Any:
    value = getattr(settings, name, None)
    if value is None:
        value = getattr(settings, name.upper(), None)
    return default if value is None else value


def engine_from_settings(settings: Any, *, warmup: bool | None = None) -> Engine:
    """The engine the settings ask for: engine services over HTTP (ENGINE_MODE=http, ENGINE_URLS) or the model
    in-process from CHECKPOINT_DIR. Imported lazily: a front end never imports JAX unless it runs the model.
    ``warmup`` (None: ENGINE_WARMUP): the in-process engine compiles every batch size while idle. ENGINE_DTYPE:
    DalleBart's weights and activations in-process (bfloat16 halves the memory; logits stay float32)."""
    mode = str(_setting(settings, "engine_mode", "inprocess"))
    urls = list(_setting(settings, "engine_urls", ()) or ())
    token = _setting(settings, "engine_token")
    checkpoint = _setting(settings, "checkpoint_dir")
    try:
        if mode == "http":
            from engine.client import HttpEngine, MultiEngine

            if not urls:
                raise EngineUnavailable("ENGINE_MODE=http needs ENGINE_URLS")
            return HttpEngine(urls[0], token) if len(urls) == 1 else MultiEngine.from_urls(urls, token)
        from engine.client import InProcessEngine
        from engine.compile_cache import configure
        from engine.pipeline import load_pipeline

        configure(_setting(settings, "xla_cache_dir"))  # before the first compile: reuse last run's programs
        if warmup is None:
            warmup = bool(_setting(settings, "engine_warmup", True))
        dtype = str(_setting(settings, "engine_dtype", "float32"))
        # without warm-up, compile only what each pass needs (the terminal front end: one request at a time)
        native = _setting(settings, "engine_native_attention", None)  # None: the sampler decides
        pipeline = load_pipeline(checkpoint, dtype=dtype, eager_text_programs=warmup, native_attention=native)
        nice = int(_setting(settings, "engine_model_nice", DEFAULT_MODEL_NICE))
        return InProcessEngine(pipeline, warmup=warmup, model_nice=nice)
    except EngineUnavailable:
        raise
    except ImportError as exc:
        raise EngineUnavailable(f"the model engine is not available in this installation ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise EngineUnavailable(f"could not load the model from {checkpoint}: {first}") from exc


def engine_for_settings(settings: Any, *, warmup: bool | None = None) -> Engine:
    """ENGINE_FACTORY / DALLE_ENGINE_FACTORY = ``module:callable`` (development and tests: e.g. a fake engine),
    else the configured engine."""
    spec = _setting(settings, "engine_factory") or os.environ.get("DALLE_ENGINE_FACTORY")
    if spec:
        module, _, attr = str(spec).partition(":")
        try:
            return getattr(importlib.import_module(module), attr or "create_engine")()
        except (ImportError, AttributeError) as exc:
            raise EngineUnavailable(f"engine factory {spec!r} could not be loaded: {exc}") from exc
    return engine_from_settings(settings, warmup=warmup)


async def open_repository(settings: Any) -> Repository:
    """Repository on DATABASE_URL (default: the embedded SQLite file), migrated when AUTO_MIGRATE allows."""
    from store.db import default_sqlite_url, ensure_migrated

    url = str(_setting(settings, "database_url") or default_sqlite_url())
    await asyncio.to_thread(ensure_migrated, url, bool(_setting(settings, "auto_migrate", True)))
    return Repository.from_url(url)


def service_from_settings(settings: Any, repo: Repository, engine: Engine, publisher: Publisher | None,
                          **overrides: Any) -> GenerationService:
    limiter = RateLimiter(
        storage_uri=_setting(settings, "redis_url"),
        namespace=str(_setting(settings, "redis_namespace", "dalle")),
        policy=LimitPolicy(
            user=str(_setting(settings, "rate_limit_user", LimitPolicy.user)),
            guild=str(_setting(settings, "rate_limit_guild", LimitPolicy.guild)),
            daily_quota=_setting(settings, "daily_quota", LimitPolicy.daily_quota),
        ),
    )
    scheduler = Scheduler(per_user_cap=int(_setting(settings, "max_queue_per_user", 5)),
                          total_cap=int(_setting(settings, "max_queue_total", 1000)))
    kwargs: dict[str, Any] = dict(
        output_dir=_setting(settings, "output_dir", "outputs"), limiter=limiter, scheduler=scheduler,
        concurrency=int(_setting(settings, "engine_concurrency", 16)),
        engine_stall_timeout=float(_setting(settings, "engine_stall_timeout", 600)),
        default_images=int(_setting(settings, "default_images", 9)),
        flagged_mode=str(_setting(settings, "flagged_mode", FlaggedMode.SPOILER.value)),
    )
    kwargs.update(overrides)
    return GenerationService(repo, engine, publisher, **kwargs)
