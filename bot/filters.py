"""Prompt policy, applied before anything is queued: the layered, multilingual filter of :mod:`bot.promptfilter`
(normalisation into two views, per-language lists with word boundaries and allow phrases, a sentence encoder with a
trained head), re-exported where the bot has always imported it."""

from bot.promptfilter import (
    CRITICAL_CATEGORIES,
    MAX_PROMPT_CHARS,
    FilterDecision,
    GuildPolicy,
    PromptFilter,
    critical_category,
)
from bot.promptfilter.normalise import skeleton as normalise

__all__ = ["CRITICAL_CATEGORIES", "MAX_PROMPT_CHARS", "FilterDecision", "GuildPolicy", "PromptFilter",
           "critical_category", "normalise"]
