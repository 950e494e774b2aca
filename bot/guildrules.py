"""What a guild's own settings (``/dalle-admin``) decide at admission, Discord-independent: where ``/dalle`` may be
used, whether private results are allowed, how many images a request gets, and how members are told outcomes.
Also what an admin's filter terms may be: the allow list can never unlock the critical categories."""

from __future__ import annotations

from typing import Any

from bot.filters import critical_category as filter_critical_category
from bot.filters import normalise
from store.models import NotifyMode

MAX_TERM_CHARS = 60  # as Discord's AutoMod keywords: a term is a word or a short phrase
MAX_TERMS = 200  # per list and guild: every prompt is checked against all of them


def channel_refusal(gs: Any, channel_id: int | None) -> str | None:
    """Why ``/dalle`` may not be used in ``channel_id`` (None: it may). An empty channel list means anywhere."""
    allowed = [int(c) for c in (getattr(gs, "channel_ids", None) or [])]
    if not allowed or channel_id is None or int(channel_id) in allowed:
        return None
    where = ", ".join(f"<#{c}>" for c in allowed[:10]) + (" …" if len(allowed) > 10 else "")
    return f"Image generation isn't available in this channel. Use it in {where}."


def private_refusal(gs: Any, private: bool) -> str | None:
    if private and getattr(gs, "private_results", None) is False:
        return "Private results are turned off in this server: ask again without `private`."
    return None


def capped_images(gs: Any, n: int) -> int:
    """``n``, at most the guild's ``max_images``."""
    cap = getattr(gs, "max_images", None)
    return min(n, int(cap)) if cap else n


def notify_privately(gs: Any) -> bool:
    """Whether a member may be told an outcome on their own interaction (ephemeral) rather than by DM."""
    return (getattr(gs, "notify_mode", None) or NotifyMode.EPHEMERAL.value) == NotifyMode.EPHEMERAL.value


def clean_term(term: str) -> str:
    """A block or allow term as stored: stripped, checked for length and for letters or digits (ValueError)."""
    term = " ".join((term or "").split())
    if not term:
        raise ValueError("the term is empty")
    if len(term) > MAX_TERM_CHARS:
        raise ValueError(f"a term is at most {MAX_TERM_CHARS} characters")
    if not normalise(term.rstrip("*")):
        raise ValueError("the term has no letters or digits")
    return term


def same_term(a: str, b: str) -> bool:
    """Two spellings of one term (case, spacing, look-alike letters)."""
    return a.endswith("*") == b.endswith("*") and normalise(a.rstrip("*")) == normalise(b.rstrip("*"))


def critical_category(term: str) -> str | None:
    """The critical category (minors, hate) an allow-list ``term`` would touch, or None. The filter already checks
    those categories before the allow list applies; refusing the entry says so to the admin instead of storing a
    term that silently does nothing."""
    return filter_critical_category(term)
