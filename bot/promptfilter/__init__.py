"""The layered, multilingual prompt filter: normalise (two views), lists (per category and language, word
boundaries, allow phrases), semantic (a sentence encoder's trained head times a character n-gram model, ngrams),
filter (the combination the bot calls)."""

from bot.promptfilter.filter import (
    CRITICAL_CATEGORIES,
    MAX_PROMPT_CHARS,
    FilterDecision,
    GuildPolicy,
    PromptFilter,
    critical_category,
)

__all__ = ["CRITICAL_CATEGORIES", "MAX_PROMPT_CHARS", "FilterDecision", "GuildPolicy", "PromptFilter",
           "critical_category"]
