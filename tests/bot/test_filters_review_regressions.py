"""Two holes a review found in the layered filter: letters that draw nothing splitting a listed word, and a guild
allow list clearing what the semantic layer read as sexual content involving minors."""

from __future__ import annotations

import pytest

from bot.filters import GuildPolicy, PromptFilter


@pytest.fixture(scope="module")
def prompt_filter():
    return PromptFilter()


@pytest.mark.parametrize("filler", ["\u3164", "\uffa0", "\u115f", "\u1160", "\u2800", "\u034f"])
def test_an_invisible_letter_inside_a_word_does_not_split_it(prompt_filter, filler):
    assert prompt_filter.check(f"n{filler}ude beach party").category == "sexual"
    assert prompt_filter.check(f"a heil hit{filler}ler poster with flags").category == "hate"


class SaysMinors:
    """A stand-in for the semantic head that reads every prompt as sexual content involving minors."""

    threshold = 0.5

    def classify(self, inputs, threshold):
        return "minors", 0.99


def test_a_guild_allow_list_never_clears_what_the_semantic_layer_read_as_minors():
    prompt_filter = PromptFilter(classifier=SaysMinors())
    prompt = "a quiet portrait of a figure in soft light"  # no listed word at all
    for policy in (GuildPolicy(), GuildPolicy(allow=("figure",)), GuildPolicy(allow=("portrait", "soft light"))):
        decision = prompt_filter.check(prompt, policy)
        assert not decision.allowed, policy
