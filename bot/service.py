"""The Discord-independent life of a request: admit → persist → schedule → generate → persist → publish.

Every front end (``bot.cogs`` for Discord, ``bot.terminal``) drives this one service, so filters, rate limits,
queue caps, fairness and the database records are the same in each. ``GenerationService`` admits requests
(filters, limits, the fair queue, the database row), derives rerolls and variations, cancels, records feedback
and answers queries; its ``Runner`` (``bot.runner``) runs the queued jobs and its ``Leases`` (``bot.leases``)
hold them in the database and post the results. A front end implements ``bot.outcome.Publisher`` to show
progress and results.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.admin import AdminService
from bot.appeals import AppealService
from bot.automod import AutoModRules
from bot.blocklist import BlocklistService
from bot.case_upkeep import CaseUpkeep
from bot.config import Settings
from bot.deletion import ResultDeletion
from bot.filters import FilterDecision, GuildPolicy, PromptFilter
from bot.guildrules import capped_images, channel_refusal, private_refusal
from bot.leases import Leases
from bot.metrics import BotMetrics
from bot.moderation import ModerationService
from bot.outcome import MAX_FEEDBACK_NOTE, MAX_IMAGES, Admission, Delivery, FeedbackResult, Publisher
from bot.picks import ImagePicks
from bot.ratelimit import LimitPolicy, RateLimiter, human_duration
from bot.runner import Runner
from bot.scheduler import QueueEntry, QueueRefused, Scheduler, user_cap_message
from bot.strikes import StrikeService
from engine.api import SEED_LIMIT, Engine
from store.models import CaseSource, FeedbackKind, FeedbackReason, FlaggedMode, GenerationKind, Status
from store.repository import ActiveLimitReached, Repository

log = logging.getLogger(__name__)

RANDOM_SEEDS = 2**31  # seeds the bot draws (and derives variations into) lie below this: short enough to type


def _not_yours(action: str) -> Admission:
    """Another user's private generation: its prompt and images are its owner's alone. Not recorded as a
    refusal (the row would copy the private prompt under another user)."""
    return Admission(False, category="private",
                     message=f"That generation is private: only the user who made it can {action} it.")


def cap_note(note: str | None) -> str | None:
    """A feedback note as stored: stripped, None when empty, at most ``MAX_FEEDBACK_NOTE`` characters (the
    Discord form's limit; the terminal and any other front end get the same)."""
    note = (note or "").strip()
    if len(note) > MAX_FEEDBACK_NOTE:
        note = note[: MAX_FEEDBACK_NOTE - 1].rstrip() + "…"
    return note or None


def derive_seed(parent_seed: int, index: int) -> int:
    """Seed of a variation of image ``index`` of a generation with ``parent_seed``: a pure function of the
    lineage, so a variation is reproducible from the rows alone."""
    digest = hashlib.blake2b(f"variation:{parent_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % RANDOM_SEEDS


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
        concurrency: int = Settings.engine_concurrency,
        default_images: int = MAX_IMAGES,
        progress_interval: float = 2.0,
        flagged_mode: str = FlaggedMode.SPOILER.value,
        checkpoint_id: str | None = None,
        guild_settings_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        lease_s: float = 60.0,
        engine_stall_timeout: float = Settings.engine_stall_timeout,
        owns: Callable[[Any], bool] | None = None,
        review_channel_id: int | None = None,
        reping_hours: int = Settings.case_reping_hours,
        upkeep_interval_s: float = Settings.case_upkeep_seconds,
    ) -> None:
        """``owns``: which stored jobs this front end resumes and delivers (None: all of them);
        ``review_channel_id``: where moderation cases go for guilds without their own review channel."""
        self.repo = repo
        self.engine = engine
        self.publisher = publisher
        self.filter = prompt_filter or PromptFilter()
        self.limiter = limiter or RateLimiter()
        self.scheduler = scheduler or Scheduler()
        self.default_images = default_images
        self.flagged_mode = flagged_mode
        self.checkpoint_id = checkpoint_id
        self.clock = clock
        # this process's jobs carry its owner id in the database, and its engine request ids carry the nonce
        run_nonce = secrets.token_hex(4)
        positions_changed = asyncio.Event()  # the fair queue changed: publish queue positions
        self.leases = Leases(repo, self.scheduler, publisher, owner=f"{socket.gethostname()}:{os.getpid()}:{run_nonce}",
                             lease_s=lease_s, positions_changed=positions_changed,
                             flagged_mode=self.flagged_mode_for, owns=owns)
        self.owner = self.leases.owner
        self.runner = Runner(repo, engine, self.scheduler, publisher, self.leases, run_nonce=run_nonce,
                             positions_changed=positions_changed, flagged_mode=self.flagged_mode_for,
                             output_dir=output_dir, concurrency=concurrency, progress_interval=progress_interval,
                             engine_stall_timeout=engine_stall_timeout, clock=clock)
        # guild settings are read on every submit and every finished job; they change rarely. Updates through
        # this service invalidate at once; the TTL bounds how long another process's update goes unseen.
        self.guild_settings_ttl = guild_settings_ttl
        self._guild_cache: dict[int, tuple[float, Any]] = {}
        self._guild_loads: dict[int, asyncio.Future] = {}
        self._guild_epoch: dict[int, int] = {}
        # cases, moderators' actions and guild bans; a front end sets its ``front_end`` to post the review queue
        self.moderation = ModerationService(repo, guild_settings=self.guild_settings,
                                            flagged_mode=self.flagged_mode_for, review_channel_id=review_channel_id)
        self.leases.on_delivered = self.moderation.outcome_delivered
        # strikes that expire and the cooldowns/bans they lead to (durable); removals strike the author
        self.strikes = StrikeService(repo, self.moderation, guild_settings=self.guild_settings)
        self.moderation.on_removed = self.strikes.removal
        self.appeals = AppealService(repo, self.moderation, self.strikes)
        # the image-hash blocklist (Remove blocks; the runner withholds near-duplicates) and the review queue's upkeep
        self.blocklist = BlocklistService(repo, self.moderation)
        self.moderation.blocklist = self.runner.blocklist = self.blocklist
        self.upkeep = CaseUpkeep(repo, self.moderation, reping_hours=reping_hours, interval_s=upkeep_interval_s)
        self.picks = ImagePicks(repo, self.flagged_mode_for)  # one image of a result, for its per-image panel
        self.metrics: BotMetrics | None = None  # the Discord front end's (bot.app): see use_metrics
        self.deletion = ResultDeletion(repo, self.moderation)  # the author's 🗑
        self.moderation.on_decided = self.deletion.case_decided  # rows kept for a case go once it is decided
        self.automod = AutoModRules()  # a guild's own AutoMod keyword rules; a front end sets its loader
        self.admin = AdminService(repo, guild_settings=self.guild_settings, update_settings=self.update_guild_settings,
                                  defaults={"review_channel_id": review_channel_id, "flagged_mode": flagged_mode,
                                            "daily_quota": self.limiter.policy.daily_quota,
                                            "max_queue_per_user": self.scheduler.per_user_cap,
                                            "rate_limit_user": self.limiter.policy.user,
                                            "rate_limit_guild": self.limiter.policy.guild, "max_images": MAX_IMAGES,
                                            "private_results": True, "notify_mode": "ephemeral", "automod": True,
                                            "reping_hours": reping_hours,
                                            **dataclasses.asdict(self.strikes.defaults)},
                                  invalidate=self.invalidate_guild_settings, automod=self.automod,
                                  engine_info=engine.info)

    def use_metrics(self, metrics: BotMetrics) -> None:
        """Count refusals and posted results in ``metrics`` from now on."""
        self.metrics = metrics
        self.leases.metrics = metrics

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> list[int]:
        """Requeue interrupted jobs, load the queued jobs into the fair queue (on a shared database only those no
        live process holds), deliver results that were finished but never posted, and start the workers.
        Returns the ids of the jobs resumed."""
        self.scheduler.reopen()
        start_engine = getattr(self.engine, "start", None)  # an in-process engine warms up while the bot starts
        if callable(start_engine):
            start_engine()
        warm_filter = getattr(self.filter, "warm", None)  # the prompt filter's encoder loads once, off the loop
        if callable(warm_filter):
            await asyncio.to_thread(warm_filter)
        resumed = await self.leases.resume()
        self.runner.start()
        self.leases.start_renewing()
        return resumed

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work; let running jobs finish within ``grace`` seconds, else put them back in the queue
        (status queued) so the next start resumes them. Nothing is left half-recorded: the step that stores
        images and marks the job done runs shielded from cancellation. Results still being posted get the rest
        of ``grace``; one not posted by then stays undelivered and is posted by the next start."""
        self.scheduler.close()  # idle workers return; nothing is cancelled in the middle of a database call
        deadline = time.monotonic() + grace
        await self.leases.stop_renewing()  # no more take-overs; the leases held outlast the grace
        await self.runner.finish_running(grace)
        await self.leases.hand_over(deadline)
        await self.runner.stop()

    # -- guild settings ------------------------------------------------------------------------------

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

    async def flagged_mode_for(self, guild_id: int | None) -> str:
        """What the guild's users see of images the safety checker flagged: spoiler or withhold."""
        return (await self._policies(guild_id))[3]

    # -- admission -----------------------------------------------------------------------------------

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
        if seed is not None and not 0 <= seed < SEED_LIMIT:
            return await self._refuse(user_id, guild_id, prompt, None, "invalid",
                                      f"seed must be between 0 and {SEED_LIMIT - 1}.")
        if self.scheduler.closed:
            return Admission(False, category="closing", message="The bot is restarting; try again in a minute.")
        state = await self.repo.get_user_state(user_id)
        if state is not None and state.banned:
            return await self._refuse(user_id, guild_id, prompt, None, "banned",
                                      "You are not allowed to generate images here.")
        # the user-wide cooldown is earned in DMs and holds there only; a server's own is a guild ban (kind cooldown)
        if (guild_id is None and state is not None and state.cooldown_until is not None
                and state.cooldown_until > self.repo.now()):
            left = (state.cooldown_until - self.repo.now()).total_seconds()
            return await self._refuse(user_id, guild_id, prompt, None, "rate:cooldown", "You're on a cooldown after "
                                      f"blocked prompts. Try again in {human_duration(left)}.", retry_after=left)
        guild_ban = await self.moderation.ban_message(user_id, guild_id)
        if guild_ban is not None:
            return await self._refuse(user_id, guild_id, prompt, None, "banned", guild_ban)
        gs = await self.guild_settings(guild_id)  # the guild's own rules (/dalle-admin), cached
        where = channel_refusal(gs, (delivery or Delivery()).channel_id) or private_refusal(gs, private)
        if where is not None:
            return await self._refuse(user_id, guild_id, prompt, None, "settings", where)
        n = capped_images(gs, n)
        policy, limits, user_cap, _ = await self._policies(guild_id)
        if user_cap is None:
            user_cap = self.scheduler.per_user_cap
        # the sentence encoder costs a few milliseconds a prompt: off the event loop
        decision: FilterDecision = await asyncio.to_thread(self.filter.check, prompt, policy)
        if not decision.allowed:
            refusal = await self._refuse(user_id, guild_id, prompt, decision.normalised, decision.category or "filter",
                                         f"Sorry, I can't draw that: {decision.reason}", detail=decision.matched)
            if decision.category != "invalid":  # a strike (after the refusal row: a refusals case lists it)
                extra = await self.strikes.refusal(user_id, guild_id, decision.category or "filter")
                refusal = dataclasses.replace(refusal, message=refusal.message + extra) if extra else refusal
            return refusal
        if getattr(gs, "automod", None) is not False and (hit := await self.automod.check(guild_id, prompt)):
            return await self._refuse(user_id, guild_id, prompt, decision.normalised, "automod",
                                      f"Sorry, I can't draw that: the prompt trips this server's AutoMod rule "
                                      f"“{hit.rule}”.", detail=hit.matched)
        # Admission is atomic without a lock: the cap check and the slot it takes are one synchronous step on the
        # event loop, and the held slot counts against the caps while the rate limiter and the insert are awaited.
        # On a shared database the user's jobs other processes hold count too (read just before; one this process
        # adopted meanwhile counts once), and the insert counts again under a per-user database lock, which is
        # what holds when two processes admit the same user at once.
        shared = not self.leases.exclusive()
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
            seed = secrets.randbelow(RANDOM_SEEDS) if seed is None else seed
            d = delivery or Delivery()
            try:
                gen = await self.repo.create_generation(
                    user_id=user_id, prompt=prompt, normalized_prompt=decision.normalised, guild_id=guild_id,
                    channel_id=d.channel_id, n_images=n, seed=seed, kind=kind,
                    parent_generation_id=parent_generation_id, parent_image_id=parent_image_id,
                    checkpoint_id=self.checkpoint_id, private=private, application_id=d.application_id,
                    interaction_token=d.interaction_token, token_expires_at=d.token_expires_at,
                    upload_limit=d.upload_limit, owner=self.owner, lease_until=self.leases.until(),
                    max_active=user_cap if shared else None,
                )
            except ActiveLimitReached as exc:  # another process admitted this user meanwhile
                self.scheduler.release(user_id)
                reserved = False
                return await self._refuse(user_id, guild_id, prompt, decision.normalised, "queue",
                                          user_cap_message(exc.active, user_cap))
            self.scheduler.release(user_id)  # the slot becomes the queued job, with no await in between
            reserved = False
            position = self.scheduler.add(QueueEntry(gen.id, user_id, guild_id, gen.queued_at, payload=gen),
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
        if self.metrics is not None:
            self.metrics.refused(category)
        return Admission(False, category=category, message=message, retry_after=retry_after)

    async def reroll(self, generation_id: int, user_id: int, *, guild_id: int | None = None,
                     delivery: Delivery | None = None) -> Admission:
        """Same prompt and size, a new random seed; the new row points at its parent."""
        parent = await self.repo.get_generation(generation_id, with_images=False)
        if parent is None:
            return Admission(False, category="invalid", message="That generation no longer exists.")
        if parent.private and parent.user_id != user_id:
            return _not_yours("reroll")
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
        if parent is None:
            return Admission(False, category="invalid", message="That image no longer exists.")
        if parent.private and parent.user_id != user_id:
            return _not_yours("make variations of")
        hidden = await self.picks.hidden_from_public(image, parent)  # a panel or V button left from before
        if hidden is not None:
            return Admission(False, category="invalid", message=hidden)
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
        limits = (await self._policies(gen.guild_id))[1]  # a cancelled job does not count against the rate limits
        await self.limiter.give_back(gen.user_id, gen.guild_id, limits, hit_at=gen.queued_at.timestamp())
        return True

    async def feedback(self, image_id: int, user_id: int, kind: str, *, reason: str | None = None,
                       note: str | None = None, contact: Delivery | None = None) -> FeedbackResult:
        """Record 👍 / 👎 / report; a report opens (or joins) a moderation case, posted to the review queue
        (``contact``: how to tell the reporter the outcome)."""
        if kind not in {k.value for k in FeedbackKind}:
            return FeedbackResult(False, f"Unknown feedback {kind!r}: use up, down or report.")
        if reason is not None and reason not in {r.value for r in FeedbackReason}:
            return FeedbackResult(False, f"Unknown reason {reason!r}: use nsfw, bias, quality or other.")
        if kind == FeedbackKind.REPORT.value and reason is None:
            reason = FeedbackReason.OTHER.value
        image = await self.repo.get_image(image_id)
        if image is None:
            return FeedbackResult(False, f"Image {image_id} does not exist.")
        note = cap_note(note)
        await self.repo.record_feedback(image_id, user_id, kind, reason=reason, note=note)
        if kind != FeedbackKind.REPORT.value:
            return FeedbackResult(True, "Thanks for the feedback!")
        case_id, _ = await self.moderation.open_case(CaseSource.REPORT.value, image_id=image_id,
                                                     reason=f"{reason}: {note}" if note else reason,
                                                     reporter=user_id, contact=contact)
        return FeedbackResult(True, "Thanks, a moderator will review this image.", case_id=case_id)

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

    async def record_ack(self, generation_id: int, ack_message_id: int) -> Any:
        """Store the id of the message that acknowledged the request, in the row and in the queued job's
        snapshot that queue-position updates are published from."""
        gen = await self.repo.update_delivery(generation_id, ack_message_id=ack_message_id)
        job = self.scheduler.job(generation_id)
        if job is not None:
            job.payload = gen
        return gen
