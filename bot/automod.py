"""A guild's own Discord AutoMod keyword rules, applied to prompts too (AutoMod never checks a bot's messages, so a
term a server bans in chat would otherwise pass through ``/dalle``).

Discord-independent: a front end sets ``AutoModRules.loader`` to fetch a guild's keyword rules (the Discord cog
does it over REST, which needs Manage Server) as :class:`KeywordRule` values. Rules are cached per guild for
``ttl`` seconds and dropped at once when Discord says a rule changed (``invalidate``). Matching follows Discord's
keyword strategies: ``cat`` a whole word, ``cat*`` a word's start, ``*cat`` its end, ``*cat*`` anywhere, case
insensitive; ``regex_patterns`` (Rust syntax, mostly what the ``regex`` library reads) run with a time limit, so a
pathological pattern cannot stall admission; ``allow_list`` keywords exempt what they cover.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import regex

log = logging.getLogger(__name__)

REGEX_TIMEOUT_S = 0.05  # per pattern and prompt; a pattern that times out does not match (and is logged)


class AutoModUnavailable(Exception):
    """The rules cannot be read (``reason``: shown to admins, e.g. "missing permission")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class KeywordRule:
    """An enabled keyword-type AutoMod rule, as the front end read it."""

    name: str
    keywords: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()


def keyword_pattern(keyword: str) -> str:
    """Discord's matching strategy of one keyword, as a regex: ``*`` at either end lets the word continue there."""
    body = keyword.strip()
    start_open, end_open = body.startswith("*"), body.endswith("*")
    body = regex.escape(body.strip("*").strip())
    body = r"\s+".join(body.split(r"\ "))  # a phrase: any run of spaces between its words
    return ("" if start_open else r"(?<!\w)") + body + ("" if end_open else r"(?!\w)")


@dataclass
class CompiledRule:
    name: str
    patterns: list[tuple[str, regex.Pattern]] = field(default_factory=list)  # (as the server wrote it, compiled)
    allow: list[regex.Pattern] = field(default_factory=list)

    @classmethod
    def compile(cls, rule: KeywordRule) -> CompiledRule:
        out = cls(rule.name)
        for kw in rule.keywords:
            if kw.strip("* "):
                out.patterns.append((kw, regex.compile(keyword_pattern(kw), regex.IGNORECASE)))
        for source in rule.regexes:
            try:
                out.patterns.append((source, regex.compile(source, regex.IGNORECASE)))
            except regex.error as exc:  # Rust syntax Python's regex does not read: skipped, said once
                log.warning("AutoMod rule %r: pattern %r not usable here (%s)", rule.name, source, exc)
        out.allow = [regex.compile(keyword_pattern(a), regex.IGNORECASE) for a in rule.allow if a.strip("* ")]
        return out

    def match(self, prompt: str) -> str | None:
        """The keyword or pattern that matched (outside every allow-listed span), else None."""
        allowed = [m.span() for a in self.allow for m in a.finditer(prompt, timeout=REGEX_TIMEOUT_S)] \
            if self.allow else []
        for source, pattern in self.patterns:
            try:
                for m in pattern.finditer(prompt, timeout=REGEX_TIMEOUT_S):
                    if not any(s <= m.start() and m.end() <= e for s, e in allowed):
                        return source
            except TimeoutError:
                log.warning("AutoMod rule %r: pattern %r timed out; not applied", self.name, source)
        return None


@dataclass(frozen=True)
class AutoModHit:
    rule: str
    matched: str


class AutoModRules:
    """Per-guild AutoMod keyword rules, cached; see the module doc."""

    def __init__(self, ttl: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.loader: Callable[[int], Awaitable[Sequence[KeywordRule]]] | None = None
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[int, tuple[float, list[CompiledRule] | AutoModUnavailable]] = {}
        self._loads: dict[int, asyncio.Future] = {}
        self._epoch = 0  # bumped by invalidate: a read that started before a change is not kept

    def invalidate(self, guild_id: int | None = None) -> None:
        """A rule changed (Discord's AUTO_MODERATION_RULE_* events): read the guild's rules again next time."""
        self._epoch += 1
        if guild_id is None:
            self._cache.clear()
            self._loads.clear()
        else:
            self._cache.pop(guild_id, None)
            self._loads.pop(guild_id, None)

    async def rules(self, guild_id: int) -> list[CompiledRule] | AutoModUnavailable:
        hit = self._cache.get(guild_id)
        if hit is not None and hit[0] > self.clock():
            return hit[1]
        if self.loader is None:
            return AutoModUnavailable("not available in this front end")
        load = self._loads.get(guild_id)
        if load is None:  # concurrent prompts of one guild share one read
            load = asyncio.ensure_future(self._load(guild_id))
            self._loads[guild_id] = load
            load.add_done_callback(
                lambda f: self._loads.pop(guild_id, None) if self._loads.get(guild_id) is f else None)
        return await asyncio.shield(load)

    async def _load(self, guild_id: int) -> list[CompiledRule] | AutoModUnavailable:
        assert self.loader is not None
        epoch = self._epoch
        try:
            raw = await self.loader(guild_id)
            result: list[CompiledRule] | AutoModUnavailable = await asyncio.to_thread(
                lambda: [CompiledRule.compile(r) for r in raw])
        except AutoModUnavailable as exc:
            result, ttl = exc, self.ttl
        except Exception as exc:  # noqa: BLE001 - Discord down: prompts go on without the rules, retried soon
            log.warning("reading the AutoMod rules of guild %s failed", guild_id, exc_info=True)
            result, ttl = AutoModUnavailable(f"unreadable ({type(exc).__name__})"), min(self.ttl, 30.0)
        else:
            ttl = self.ttl
        if epoch == self._epoch:
            self._cache[guild_id] = (self.clock() + ttl, result)
        return result

    async def check(self, guild_id: int | None, prompt: str) -> AutoModHit | None:
        """The first of the guild's rules the prompt trips, or None (also when the rules cannot be read)."""
        if guild_id is None:
            return None
        rules = await self.rules(guild_id)
        if isinstance(rules, AutoModUnavailable) or not rules:
            return None

        def scan() -> AutoModHit | None:
            for rule in rules:
                matched = rule.match(prompt)
                if matched is not None:
                    return AutoModHit(rule.name, matched)
            return None

        # regexes with time limits can take milliseconds on a long prompt: off the event loop
        return await asyncio.to_thread(scan)

    async def status(self, guild_id: int, enabled: bool) -> str:
        """What ``/dalle-admin settings show`` says about AutoMod."""
        if not enabled:
            return "not applied: turned off by the `automod` setting"
        rules = await self.rules(guild_id)
        if isinstance(rules, AutoModUnavailable):
            return f"not available: {rules.reason}"
        return f"applied ({len(rules)} keyword rule{'' if len(rules) == 1 else 's'})"
