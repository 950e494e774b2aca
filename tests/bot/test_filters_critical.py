"""A guild's allow list unlocks the ordinary categories (a life-drawing server may allow "nude"), never the
critical ones: sexual content involving minors and hate are refused whatever the guild allows."""

from __future__ import annotations

import pytest

from bot.filters import CRITICAL_CATEGORIES, GuildPolicy, PromptFilter

FILTER = PromptFilter(classifier=None)
EVERYTHING_ALLOWED = GuildPolicy(allow=["loli", "shota", "child porn", "nazi*", "swastika", "white power",
                                        "heil hitler", "nude", "gore"])


@pytest.mark.parametrize("prompt,category", [
    ("loli art", "minors"),
    ("a shota character", "minors"),
    ("child porn", "minors"),
    ("a nazi parade", "hate"),
    ("a swastika flag", "hate"),
    ("white power rally", "hate"),
    ("N A Z I banner", "hate"),  # the aggressive view too
])
def test_critical_categories_ignore_the_guild_allow_list(prompt, category):
    assert category in CRITICAL_CATEGORIES
    decision = FILTER.check(prompt, EVERYTHING_ALLOWED)
    assert not decision.allowed and decision.category == category, decision


@pytest.mark.parametrize("prompt,category", [("a nude figure drawing", "sexual"), ("a gore movie poster", "violence")])
def test_other_categories_are_still_the_guilds_to_allow(prompt, category):
    assert FILTER.check(prompt).category == category  # refused by default
    assert FILTER.check(prompt, EVERYTHING_ALLOWED).allowed  # allowed where the guild says so
