"""The combined prompt filter: lists first (cheap, explainable), then the semantic layer for what no list names.

Order of a check: the prompt's validity; the guild's own blocked terms; the packaged lists (every language, word
boundaries, allow phrases; a swastika named with a Hindu, Jain or Buddhist place or feast is the sacred symbol and
its hit is waived); the two-group rule (a minor together with anything sexual is a hard "minors" refusal,
after AI Horde), the hate rule (a group with a dehumanising word) and the self-harm rule (a verb of hurting with a
reflexive pronoun); the threat rule (a threat next to the reader's family: "I know where your kids go to school");
the targeted-person rule (a private person the prompter knows, "my ex", "mein Chef", an @handle, with their
address or phone number, or with harm done to them; or a street address with a threat); the farewell rule (a means
of ending one's life with a farewell: "pills beside a goodbye letter", "a rope, tonight is the night"); the semantic
layer (the encoder's head and the character n-grams, multiplied) over the prompt as written and its Latin skeleton,
without the known person (the rule judges them) nor a sacred swastika's name, which refuses a prompt naming such a
person as abuse at a lower probability of harm than its own thresholds. A guild's allow list suppresses list hits
and semantic verdicts of the ordinary categories, never of the critical ones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from bot.promptfilter import lists, semantic
from bot.promptfilter import normalise as nz

MAX_PROMPT_CHARS = 1000
# the semantic layer's probability of any harmful class at which a prompt that names a private person the prompter
# knows ("my ex", "mein Chef", an @handle) is refused as abuse: a picture of "my boss hanged" or of "my classmate
# beaten up" is harassment even where the layer is unsure which harm it is (bench/RESULTS.md, rounds 5 and 9)
TARGETED_THRESHOLD = 0.25

# categories a guild's allow list cannot unlock: a guild may allow "nude" for its life-drawing channel, never
# sexual content involving minors or hate
CRITICAL_CATEGORIES = frozenset({"minors", "hate"})

LABELS = {"sexual": "sexual content", "minors": "sexual content involving minors", "violence": "graphic violence",
          "self_harm": "self-harm", "hate": "hate", "profanity": "profanity", "abuse": "abuse or threats",
          "guild": "blocked by this server"}


@dataclass(frozen=True)
class FilterDecision:
    allowed: bool
    category: str | None = None  # sexual / minors / violence / self_harm / hate / profanity / abuse / guild / invalid
    reason: str = ""  # short text safe to show the user
    matched: str | None = None  # the list term, the two terms of the minors rule, or the semantic score
    score: float = 0.0  # the semantic layer's highest non-"ok" probability
    normalised: str = ""  # the Latin skeleton


@dataclass
class GuildPolicy:
    """Per-guild additions (GuildSettings): extra blocked terms and allow-listed terms. Allowed terms never
    suppress a built-in term of a critical category (:data:`CRITICAL_CATEGORIES`)."""

    block: Sequence[str] = ()
    allow: Sequence[str] = ()
    classifier_threshold: float | None = None


def _long_enough(views: nz.Views) -> bool:
    """Whether the semantic layer may judge: on one or two words the encoder's guess is noise ("background" read as
    profanity), and single words are what the lists cover."""
    if nz.has_cjk(views.native):
        return len(lists.compact(views.native)) >= 4
    words = views.native.split()
    return len(words) >= 3 and sum(len(w) >= 3 for w in words) >= 2  # not "a green a"


def _pick(hits: Sequence[lists.Hit]) -> lists.Hit:
    order = {c: i for i, c in enumerate(lists.PRIORITY)}
    return min(hits, key=lambda h: order.get(h.category, 99))


def _term(hits: Sequence[lists.Hit], category: str) -> str | None:
    """The first hit's term of ``category``, or None."""
    return next((h.term for h in hits if h.category == category), None)


def _pair(group_hits: Sequence[lists.Hit], first: str, second: str) -> str | None:
    """``"term1 + term2"`` when the prompt has a term of group ``first`` and one of group ``second``, else None."""
    a, b = _term(group_hits, first), _term(group_hits, second)
    return f"{a} + {b}" if a is not None and b is not None else None


@dataclass
class PromptFilter:
    """``check(prompt, policy)`` → :class:`FilterDecision`. Safe to share between threads."""

    lexicon: lists.Lexicon = field(default_factory=lists.Lexicon.default)
    classifier: semantic.SemanticClassifier | None = field(default_factory=semantic.SemanticClassifier.default)
    threshold: float | None = None  # the semantic layer's, for every class; None: those trained with the head
    max_chars: int = MAX_PROMPT_CHARS

    def __post_init__(self) -> None:
        self._per_class = self.threshold is None  # the head's own thresholds, one per class where it has them
        if self.threshold is None:
            self.threshold = self.classifier.threshold if self.classifier is not None else 0.5

    def warm(self) -> None:
        """Load what the first check would otherwise load (the encoder, the n-grams, the Unicode tables): call off
        the loop."""
        nz.skeleton_table()
        if self.classifier is not None:
            self.classifier.warm()

    def check(self, prompt: str, policy: GuildPolicy | None = None) -> FilterDecision:
        policy = policy or GuildPolicy()
        if not prompt or not prompt.strip():
            return FilterDecision(False, "invalid", "The prompt is empty.")
        if len(prompt) > self.max_chars:
            return FilterDecision(False, "invalid", f"The prompt is longer than {self.max_chars} characters.")
        views = nz.Views.of(prompt)
        norm = views.skeleton
        if not norm and not any(c.isalnum() for c in views.native):
            return FilterDecision(False, "invalid", "The prompt has no letters or digits.", normalised=norm)
        texts = lists.Texts.of(views)
        lex = self.lexicon
        guild_allow = lists.guild_terms(tuple(policy.allow), "allow")
        guild_block = lists.guild_terms(tuple(policy.block), "guild")
        if guild_block is not None:
            hits, _, _ = lists.find_hits(texts, guild_block, [], guild_allow, CRITICAL_CATEGORIES)
            if hits:
                return self._refuse(hits[0].category, hits[0].term, norm)
        hits, waived, allowed = lists.find_hits(texts, lex.terms, [lex.allows], guild_allow, CRITICAL_CATEGORIES)
        group_hits, _, _ = lists.find_hits(texts, lex.groups, [lex.allows], None, frozenset())
        sacred = any(h.category == "sacred" for h in group_hits)
        if sacred:  # a swastika at a Hindu temple: the sacred symbol, for the lists and the encoder
            symbols = {h.term for h in group_hits if h.category == "sacred_symbol"}
            hits = [h for h in hits if h.term not in symbols]
        minor = _term(group_hits, "minor") or lists.age_mentioned(
            views.native) or lists.age_mentioned(nz.letters_folded(views.native)) \
            or lists.grade_mentioned(views.native)  # "a 10yᴏ", "aus der 6. Klasse"
        if minor is not None:
            sexual = _term([*hits, *waived, *group_hits], "sexual")
            if sexual is not None:
                return FilterDecision(False, "minors", "The prompt puts a minor together with sexual content.",
                                      matched=f"{minor} + {sexual}", normalised=norm)
        pair = functools.partial(_pair, group_hits)
        if (matched := pair("target", "dehumanise")) is not None:
            return FilterDecision(False, "hate", "The prompt dehumanises a group of people.", matched=matched,
                                  normalised=norm)

        def guild_allowed() -> bool:  # asked only when a rule matched
            return guild_allow is not None and any(guild_allow.find(kind, text) for kind, text in texts.each())

        if (matched := pair("selfhurt", "reflexive")) is not None and not guild_allowed():
            return FilterDecision(False, "self_harm", "The prompt describes someone hurting themselves.",
                                  matched=matched, normalised=norm)
        if hits:
            hit = _pick(hits)
            return self._refuse(hit.category, hit.term, norm)
        if (matched := pair("threat", "kin")) is not None and not guild_allowed():
            return FilterDecision(False, "abuse", "The prompt threatens someone or their family.", matched=matched,
                                  normalised=norm)
        person = _term(group_hits, "person") or lists.handle_mentioned(views.native)
        address = lists.address_mentioned(views.native)
        doxx = _term(group_hits, "doxx") or address if person is not None else None
        if doxx is not None and not guild_allowed():
            return FilterDecision(False, "abuse", "The prompt targets a person with their address or phone number.",
                                  matched=f"{person} + {doxx}", normalised=norm)
        hurt = _term(group_hits, "hurt") if person is not None else None
        if hurt is not None and not guild_allowed():
            return FilterDecision(False, "abuse", "The prompt shows harm done to a person the author knows.",
                                  matched=f"{person} + {hurt}", normalised=norm)
        if address is not None and (threat := _term(group_hits, "threat")) is not None and not guild_allowed():
            return FilterDecision(False, "abuse", "The prompt threatens someone at their address.",
                                  matched=f"{address} + {threat}", normalised=norm)
        # a means, or a verb of hurting (the self-harm rule's group holds a few of the same words), with a farewell
        if (matched := pair("means", "farewell") or pair("selfhurt", "farewell")) is not None and not guild_allowed():
            return FilterDecision(False, "self_harm", "The prompt describes someone ending their life.",
                                  matched=matched, normalised=norm)
        if self.classifier is None or not _long_enough(views):
            return FilterDecision(True, normalised=norm)
        inputs = [t for t in semantic.inputs(views, texts, lex.unread_for(group_hits)) if t]
        if not inputs:
            return FilterDecision(True, normalised=norm)
        threshold = policy.classifier_threshold if policy.classifier_threshold is not None else (
            None if self._per_class else self.threshold)
        category, score = self.classifier.classify(inputs, threshold)
        if category is None and person is not None and score >= TARGETED_THRESHOLD:
            category = "abuse"  # harm aimed at someone the prompter knows
        # what the encoder read as critical stays refused whatever an allow list says, even where the label below
        # becomes "sexual" for want of a listed minor term
        waivable = category not in (None, *CRITICAL_CATEGORIES)
        if category in ("sexual", "minors"):  # the encoder alone does not know a minor: the lists' groups do
            category = "minors" if minor is not None else "sexual"
        if waivable and any(h.category == category for h in allowed):
            category = None  # a packaged allow phrase spoke for this very category ("a string sextet")
        if waivable and category is not None and guild_allow is not None and (
                waived or any(guild_allow.find(kind, text) for kind, text in texts.each())):
            category = None  # the guild allowed words of this prompt: its ordinary categories are the guild's call
        if category is None:
            return FilterDecision(True, score=score, normalised=norm)
        reason = ("The prompt looks abusive or threatening." if category == "abuse"
                  else f"The prompt looks like a request for {LABELS.get(category, category)}.")
        return FilterDecision(False, category, reason, matched=f"semantic {category} {score:.2f}", score=score,
                              normalised=norm)

    @staticmethod
    def _refuse(category: str, term: str, norm: str) -> FilterDecision:
        reason = f"The prompt contains a blocked term ({category.replace('_', ' ')})."  # as worded since the first
        return FilterDecision(False, category, reason, matched=term, normalised=norm)


def critical_category(term: str) -> str | None:
    """The critical category (minors, hate) a guild allow-list ``term`` would touch, or None: the term read as a
    prompt trips one ("loli", "child porn", "n4zi"), or it covers the whole of a critical list term ("nazi*" covers
    "nazis"). The filter never lets an allow list unlock those; refusing the entry tells the admin so."""
    lex = lists.Lexicon.default()
    texts = lists.Texts.of(nz.Views.of(term.rstrip("*")))
    hits, _, _ = lists.find_hits(texts, lex.terms, [], None, CRITICAL_CATEGORIES)
    for hit in hits:
        if hit.category in CRITICAL_CATEGORIES:
            return hit.category
    as_set = lists.guild_terms((term,), "allow")
    if as_set is None:
        return None
    for t in lex.terms.terms:
        if t.category in CRITICAL_CATEGORIES and t.kind != "substring":
            sample = t.literal.replace(lists.WILD, "")
            if any(s == 0 and e == len(sample) for s, e, _ in as_set.find(t.kind, sample)):
                return t.category
    return None
