"""A guild's Discord AutoMod keyword rules applied to prompts (``bot.automod``): Discord's keyword strategies,
regex patterns with a time limit, the allow list, the per-guild cache and what admins are told."""

from __future__ import annotations

import pytest

from bot.automod import AutoModRules, AutoModUnavailable, CompiledRule, KeywordRule


@pytest.mark.parametrize("keyword,prompt,hit", [
    ("cat", "a Cat on a mat", True),
    ("cat", "a catapult", False),  # a whole word only
    ("cat*", "a catapult", True),
    ("cat*", "a wildcat", False),
    ("*cat", "a wildcat", True),
    ("*cat*", "dedication", True),
    ("ice cream", "some ICE   cream please", True),  # a phrase, any spacing
    ("ice cream", "ice and cream", False),
    ("c.a.t", "c.a.t", True),  # written as is: no regex meaning
    ("c.a.t", "cxaxt", False),
])
def test_admin_automod_keyword_strategies(keyword, prompt, hit):
    rule = CompiledRule.compile(KeywordRule("r", keywords=(keyword,)))
    assert (rule.match(prompt) == keyword) is hit


def test_admin_automod_regexes_and_allow_list():
    rule = CompiledRule.compile(KeywordRule("r", keywords=("cat*",), regexes=(r"\bb[a@]d\s*word\b", "(unclosed"),
                                            allow=("catalog",)))
    assert rule.match("a B@D word") == r"\bb[a@]d\s*word\b"
    assert rule.match("the catalog") is None  # the allow list covers it
    assert rule.match("the catalog of cats") == "cat*"  # "cats" is outside the allowed span
    assert len(rule.patterns) == 2  # the unreadable pattern is skipped, not fatal
    slow = CompiledRule.compile(KeywordRule("slow", regexes=(r"(a+)+$",)))
    assert slow.match("a" * 40 + "!") is None  # catastrophic backtracking: timed out, not applied


async def test_admin_automod_cache_invalidation_and_status():
    now = [0.0]
    reads = []
    rules = AutoModRules(ttl=300, clock=lambda: now[0])
    assert await rules.check(2000, "a cat") is None  # no reader in this front end: nothing applied
    assert await rules.status(2000, True) == "not available: not available in this front end"

    current = [KeywordRule("pets", keywords=("cat",))]

    async def load(guild_id):
        reads.append(guild_id)
        if guild_id == 2001:
            raise AutoModUnavailable("missing permission")
        return current

    rules.loader = load
    hit = await rules.check(2000, "a cat")
    assert (hit.rule, hit.matched) == ("pets", "cat")
    current = [KeywordRule("pets", keywords=("dog",))]
    assert await rules.check(2000, "a cat") is not None and reads == [2000]  # cached
    rules.invalidate(2000)  # a rule changed
    assert await rules.check(2000, "a cat") is None and await rules.check(2000, "a dog") is not None
    now[0] += 301
    await rules.check(2000, "x")
    assert reads == [2000, 2000, 2000]  # refreshed after the TTL
    assert await rules.status(2000, True) == "applied (1 keyword rule)"
    assert await rules.status(2000, False) == "not applied: turned off by the `automod` setting"
    assert await rules.check(2001, "a dog") is None
    assert await rules.status(2001, True) == "not available: missing permission"
    assert await rules.check(None, "a dog") is None
