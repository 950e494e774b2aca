"""Rate limits on the ``limits`` library: per-user and per-guild moving windows, a daily quota, a cancelled
request's hit given back (``give_back``), and an in-memory strike counter with escalating cooldowns
(``strike``). The generation service's strikes, cooldowns and bans are durable database rows instead
(``bot.strikes``): they must survive a restart without Redis.

Memory storage by default; Redis (``redis://...``) when several bot processes must share the counts.
Every key carries a namespace so tests and deployments sharing one Redis don't collide.
A refusal always says how many seconds until the user may try again.

When Redis stops answering, limits degrade instead of failing requests: each process counts in its own memory
(the same limits, per process rather than shared; strikes and cooldowns too), says so in one warning, tries Redis
again every ``retry_s`` seconds (calls in between do not wait on it), and says when the shared counts are back.
Counts made meanwhile stay in the process's memory; Redis's own counts resume where Redis left them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

log = logging.getLogger(__name__)
T = TypeVar("T")
REDIS_TIMEOUT_S = 2.0  # connect and read timeouts: a Redis that hangs must not hold admission longer than this


@dataclass(frozen=True)
class LimitPolicy:
    """Limits for one guild (GuildSettings may override the defaults). Strings use the ``limits`` notation."""

    user: str = "2 per 10 seconds; 20 per hour"
    guild: str = "60 per minute"
    daily_quota: int | None = 100  # requests per user per rolling day; None = unlimited

    def items(self) -> tuple[list[RateLimitItem], list[RateLimitItem], list[RateLimitItem]]:
        try:
            user = parse_many(self.user) if self.user else []
            guild = parse_many(self.guild) if self.guild else []
        except ValueError as exc:
            raise ValueError(f"invalid rate limit string: {exc}") from exc
        daily = parse_many(f"{self.daily_quota} per day") if self.daily_quota else []
        return user, guild, daily


@dataclass(frozen=True)
class StrikePolicy:
    """Filter offences: the first ``free`` strikes only warn, then the cooldown doubles with each strike."""

    free: int = 1
    base_s: float = 60.0
    factor: float = 2.0
    max_s: float = 24 * 3600.0
    memory_s: int = 24 * 3600  # strikes are forgotten this long after the first one

    def cooldown_for(self, strikes: int) -> float:
        if strikes <= self.free:
            return 0.0
        return min(self.base_s * self.factor ** (strikes - self.free - 1), self.max_s)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    scope: str | None = None  # user / guild / daily / cooldown
    retry_after: float = 0.0  # seconds

    @property
    def message(self) -> str:
        if self.allowed:
            return ""
        wait = human_duration(self.retry_after)
        return {
            "user": f"You're sending requests too fast. Try again in {wait}.",
            "guild": f"This server is sending too many requests. Try again in {wait}.",
            "daily": f"You've used today's quota. Try again in {wait}.",
            "cooldown": f"You're on a cooldown after blocked prompts. Try again in {wait}.",
        }.get(self.scope or "", f"Try again in {wait}.")


def human_duration(seconds: float) -> str:
    """A wait as a user reads it: seconds up to 2 minutes, then minutes up to 2 hours, then hours (rounded up)."""
    s = max(1, math.ceil(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{math.ceil(s / 60)} min"
    return f"{math.ceil(s / 3600)} h"


class RateLimiter:
    """Admission by rate. ``hit`` consumes one request only when every window has room."""

    def __init__(
        self, storage_uri: str | None = None, namespace: str = "dalle", policy: LimitPolicy | None = None,
        strikes: StrikePolicy | None = None, retry_s: float = 5.0,
    ) -> None:
        uri = storage_uri or "memory://"
        if not uri.startswith("async+"):
            uri = "async+" + uri
        shared = "redis" in uri.split("://", 1)[0]
        options: dict[str, object] = (
            {"implementation": "redispy", "socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}
            if shared else {})
        self.storage: Storage = storage_from_string(uri, **options)
        self.window = MovingWindowRateLimiter(self.storage)
        # the degraded mode (module doc): this process's memory while the shared storage does not answer
        self._local: tuple[Storage, MovingWindowRateLimiter] | None = None
        self._storage_errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        if shared:
            from redis.exceptions import RedisError  # only here: memory-only limits never import redis

            self._storage_errors = (RedisError, OSError, TimeoutError)
            local = storage_from_string("async+memory://")
            self._local = (local, MovingWindowRateLimiter(local))
        self.retry_s = retry_s
        self.degraded = False
        self._retry_at = 0.0
        self.ns = namespace
        self.policy = policy or LimitPolicy()
        self.strikes = strikes or StrikePolicy()
        self.policy.items()  # validate early

    @classmethod
    def from_redis_url(cls, redis_url: str | None, **kw) -> RateLimiter:
        return cls(storage_uri=redis_url or None, **kw)

    async def check(self, user_id: int, guild_id: int | None, policy: LimitPolicy | None = None) -> RateDecision:
        """Would a request be admitted now? Consumes nothing."""
        return await self._run(user_id, guild_id, policy, consume=False)

    async def hit(self, user_id: int, guild_id: int | None, policy: LimitPolicy | None = None) -> RateDecision:
        """Admit and count one request, or refuse with the wait until it would be admitted."""
        return await self._run(user_id, guild_id, policy, consume=True)

    async def _use(self, op: Callable[[Storage, MovingWindowRateLimiter], Awaitable[T]]) -> T:
        """Run ``op`` on the shared storage, or on this process's memory while that does not answer."""
        if self._local is None:
            return await op(self.storage, self.window)
        if not self.degraded or time.monotonic() >= self._retry_at:
            try:
                result = await op(self.storage, self.window)
            except self._storage_errors as exc:
                self._retry_at = time.monotonic() + self.retry_s
                if not self.degraded:
                    self.degraded = True
                    log.warning("rate limit storage does not answer (%s): counting in this process's memory until "
                                "it does (limits are per process meanwhile)", type(exc).__name__)
            else:
                if self.degraded:
                    self.degraded = False
                    log.info("rate limit storage answers again: limits are shared again")
                return result
        return await op(*self._local)

    async def _run(self, user_id: int, guild_id: int | None, policy: LimitPolicy | None, consume: bool) -> RateDecision:
        return await self._use(lambda storage, window: self._decide(storage, window, user_id, guild_id, policy,
                                                                     consume))

    async def _decide(self, storage: Storage, window: MovingWindowRateLimiter, user_id: int, guild_id: int | None,
                      policy: LimitPolicy | None, consume: bool) -> RateDecision:
        cooldown = await self._cooldown(storage, user_id)
        if cooldown > 0:
            return RateDecision(False, "cooldown", cooldown)
        user_items, guild_items, daily_items = (policy or self.policy).items()
        checks: list[tuple[str, RateLimitItem, str]] = [("user", it, f"{self.ns}:u:{user_id}") for it in user_items]
        checks += [("daily", it, f"{self.ns}:d:{user_id}") for it in daily_items]
        if guild_id is not None:
            checks += [("guild", it, f"{self.ns}:g:{guild_id}") for it in guild_items]
        worst: RateDecision | None = None
        for scope, item, key in checks:
            if not await window.test(item, key) and await storage.get(self._credit_key(item, key)) <= 0:
                stats = await window.get_window_stats(item, key)
                wait = max(stats.reset_time - time.time(), 0.001)
                if worst is None or wait > worst.retry_after:
                    worst = RateDecision(False, scope, wait)
        if worst is not None:
            return worst
        if consume:
            for scope, item, key in checks:
                if await window.hit(item, key) or await self._use_credit(storage, item, key):
                    continue
                stats = await window.get_window_stats(item, key)  # lost a race with another process
                return RateDecision(False, scope, max(stats.reset_time - time.time(), 0.001))
        return RateDecision(True)

    # -- given back: a cancelled request's slot --------------------------------------------------------
    # A moving window cannot forget one hit, so a cancelled request leaves a credit per window instead: a full
    # window with a credit still admits one request, which uses the credit up. The credit lasts as long as the
    # cancelled hit would have counted, so the user ends up exactly where they would be without it.

    def _credit_key(self, item: RateLimitItem, key: str) -> str:
        return f"{self.ns}:credit:{item.key_for(key)}"

    async def _use_credit(self, storage: Storage, item: RateLimitItem, key: str) -> bool:
        credit = self._credit_key(item, key)
        if await storage.get(credit) <= 0:
            return False
        if await storage.incr(credit, item.get_expiry(), -1) >= 0:
            return True
        await storage.incr(credit, item.get_expiry(), 1)  # another process took the last credit first
        return False

    async def give_back(self, user_id: int, guild_id: int | None, policy: LimitPolicy | None = None, *,
                        hit_at: float | None = None) -> None:
        """Return the request counted at ``hit_at`` (epoch seconds; now if None) to each window it still counts
        in: the user's, the daily quota and the guild's. Used when a queued job is cancelled."""
        await self._use(lambda storage, _: self._give_back(storage, user_id, guild_id, policy, hit_at))

    async def _give_back(self, storage: Storage, user_id: int, guild_id: int | None, policy: LimitPolicy | None,
                         hit_at: float | None) -> None:
        user_items, guild_items, daily_items = (policy or self.policy).items()
        checks = [(it, f"{self.ns}:u:{user_id}") for it in user_items]
        checks += [(it, f"{self.ns}:d:{user_id}") for it in daily_items]
        if guild_id is not None:
            checks += [(it, f"{self.ns}:g:{guild_id}") for it in guild_items]
        now = time.time()
        for item, key in checks:
            left = (hit_at if hit_at is not None else now) + item.get_expiry() - now
            if left >= 1:  # still counting in this window
                await storage.incr(self._credit_key(item, key), int(left))

    # -- filter strikes ------------------------------------------------------------------------------

    async def strike(self, user_id: int) -> tuple[int, float]:
        """Record a filter offence; returns (strikes so far, cooldown now imposed in seconds)."""
        return await self._use(lambda storage, _: self._strike(storage, user_id))

    async def _strike(self, storage: Storage, user_id: int) -> tuple[int, float]:
        strikes = await storage.incr(f"{self.ns}:strikes:{user_id}", self.strikes.memory_s)
        cooldown = self.strikes.cooldown_for(strikes)
        if cooldown > 0:
            key = f"{self.ns}:cool:{user_id}"
            await storage.clear(key)
            await storage.incr(key, max(1, math.ceil(cooldown)))
        return strikes, cooldown

    async def cooldown_remaining(self, user_id: int) -> float:
        return await self._use(lambda storage, _: self._cooldown(storage, user_id))

    async def _cooldown(self, storage: Storage, user_id: int) -> float:
        key = f"{self.ns}:cool:{user_id}"
        if await storage.get(key) <= 0:
            return 0.0
        return max(await storage.get_expiry(key) - time.time(), 0.0)

    async def reset_user(self, user_id: int) -> None:
        """Clear a user's strikes and cooldown (moderator action), in this process's memory too."""
        await self._use(lambda storage, _: self._reset(storage, user_id))
        if self._local is not None:
            await self._reset(self._local[0], user_id)

    async def _reset(self, storage: Storage, user_id: int) -> None:
        await storage.clear(f"{self.ns}:strikes:{user_id}")
        await storage.clear(f"{self.ns}:cool:{user_id}")
