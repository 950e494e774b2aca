"""The first prompt filter (bot/filters.py until the layered filter in bot/promptfilter/ replaced it), kept as
the baseline ``bench filter`` measures in the same run. Its block list is ``filter_v1_blocklist.txt`` beside it; its
classifier trains on ``tests/bot/data/filter_eval/legacy_abuse.tsv`` (read as a file).

Prompt policy, applied before anything is queued.

Three layers, cheapest first:

1. ``normalise``: Unicode NFKC + case folding, zero-width/control characters dropped, Cyrillic/Greek
   look-alikes mapped to Latin, leetspeak digits/symbols mapped to letters, punctuation inside words
   dropped. Bypass tricks ("ｆ.u.c.k", "fцck", "f\u200buck", "5ex", "s e x") all collapse to the plain word.
2. Block lists: the packaged default list (``bot/assets/blocklist.txt``) plus a guild's own terms; a
   guild allow list suppresses its false positives ("dick" in "moby dick" for a book club).
3. ``AbuseClassifier``: an offline logistic regression over hashed character n-grams, trained on
   ``bot/assets/abuse_train.tsv`` when first used (deterministic, milliseconds). It catches harassment and
   threats that contain no listed word.

``PromptFilter.check`` returns a ``FilterDecision`` with a reason category the bot shows and records.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_PROMPT_CHARS = 1000

# Cyrillic and Greek letters that render like Latin ones (lower case; input is case-folded first).
HOMOGLYPHS: dict[str, str] = {
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j",
    "к": "k", "ӏ": "l", "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s", "т": "t",
    "ц": "u", "у": "y", "х": "x", "ѡ": "w", "ԝ": "w", "ь": "b", "з": "3", "п": "n", "и": "u", "л": "n",
    # Greek
    "α": "a", "β": "b", "ϲ": "c", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "γ": "y", "μ": "u", "σ": "o", "ς": "s", "ζ": "z", "δ": "d",
    "θ": "o", "λ": "a", "π": "n", "ψ": "w", "φ": "o",
    # Latin look-alikes NFKC leaves alone
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ß": "ss", "æ": "ae", "œ": "oe",
}

# Leetspeak: digits and symbols standing for letters.
LEET: dict[str, str] = {
    "0": "o", "1": "i", "2": "z", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g",
    "@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e", "£": "l", "¥": "y", "(": "c", "<": "c",
}

_WORD_SPLIT = re.compile(r"\s+")


def _strip_invisible(text: str) -> str:
    """Drop format (Cf: zero-width joiners, bidi marks...), control and combining-mark characters."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cf", "Cc", "Co", "Cs", "Mn", "Me"):
            if ch in "\t\n\r":
                out.append(" ")
            continue
        out.append(ch)
    return "".join(out)


def _fold_char(ch: str) -> str:
    ch = HOMOGLYPHS.get(ch, ch)
    if ch.isascii():
        return ch
    # Accented Latin letters: decompose and keep the base letter ("é" → "e").
    base = unicodedata.normalize("NFKD", ch)
    base = "".join(c for c in base if unicodedata.category(c) != "Mn")
    return base if base.isascii() and base else ch


def normalise(text: str, aggressive: bool = False) -> str:
    """Return the comparison form of ``text``: lower-case ASCII-ish words separated by single spaces.

    Punctuation between letters of one word is removed ("b.a.d" → "bad"), punctuation between words
    becomes a space, leetspeak is mapped only inside words that contain a letter ("h3ll0" → "hello"; a
    bare "4" stays "4"). ``aggressive`` also reads trailing "!" and "$" as leetspeak ("henta!"); the block
    lists are checked against both forms.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _strip_invisible(text)
    text = "".join(_fold_char(c) for c in text)
    raws = [w for w in _WORD_SPLIT.split(text) if w]
    words = []
    for k, raw in enumerate(raws):
        if len(raw) > 1 and not aggressive:
            raw = raw.rstrip(".,!?;:") or raw  # sentence punctuation, not leetspeak ("world!")
        has_letter = any(c.isalpha() for c in raw)
        # A lone symbol is leetspeak only inside a spaced-out run of single characters ("g o r 3").
        spaced = len(raw) == 1 and aggressive or len(raw) == 1 and any(
            0 <= j < len(raws) and len(raws[j]) <= 3 and any(c.isalnum() or c in LEET for c in raws[j])
            for j in (k - 1, k + 1)
        )
        multi_digit = len(raw) > 1 and any(c.isdigit() for c in raw)
        mapped = "".join(LEET.get(c, c) for c in raw) if has_letter or multi_digit or spaced else raw
        # Strip punctuation, keeping letters/digits; punctuation inside a word joins its pieces.
        cleaned = "".join(c for c in mapped if c.isalnum())
        if cleaned:
            words.append(cleaned)
    return " ".join(words)


@functools.lru_cache(maxsize=8192)
def _collapse_repeats(word: str) -> str:
    """"baaaad" → "bad": repeated letters are a common bypass."""
    return re.sub(r"(.)\1+", r"\1", word)


@dataclass(frozen=True)
class BlockTerm:
    """One block-list entry; multi-word terms match consecutive words."""

    category: str
    words: tuple[str, ...]  # normalised
    prefix: bool  # trailing * in the list: the last word may continue
    text: str  # as written in the list

    @classmethod
    def parse(cls, category: str, term: str) -> BlockTerm:
        prefix = term.endswith("*")
        body = normalise(term.rstrip("*"))
        if not body:
            raise ValueError(f"empty block-list term: {term!r}")
        return cls(category=category, words=tuple(body.split(" ")), prefix=prefix, text=term)

    @functools.cached_property
    def collapsed(self) -> BlockTerm:
        return BlockTerm(self.category, tuple(_collapse_repeats(w) for w in self.words), self.prefix, self.text)

    def matches(self, tokens: Sequence[str]) -> bool:
        """Match the text as written, and with repeated letters collapsed on both sides ("fuuuck")."""
        tokens = tuple(tokens)  # hashable once: the candidate sets below are cached per (tokens, length)
        if self._matches(tokens):
            return True
        # Terms that are mostly repeats ("xxx", "kkk") would collapse to one letter: match those only as written.
        if min(len(w) for w in self.collapsed.words) < 3:
            return False
        return self.collapsed._matches(tuple(_collapse_repeats(t) for t in tokens))

    def _matches(self, tokens: tuple[str, ...]) -> bool:
        n = len(self.words)
        if n == 1:
            return self._any_candidate(tokens, self.words[0])
        for i in range(len(tokens) - n + 1):
            window = tokens[i : i + n]
            if all(window[k] == self.words[k] for k in range(n - 1)) and self._word_ok(window[-1], self.words[-1]):
                return True
        # Multi-word terms written without spaces ("childporn") or spaced out letter by letter.
        joined = "".join(self.words)
        return self._any_candidate(tokens, joined)

    def _any_candidate(self, tokens: tuple[str, ...], word: str) -> bool:
        if not self.prefix:
            return word in _candidate_words(tokens, len(word))
        return word in _candidate_prefixes(tokens, len(word))

    def _word_ok(self, token: str, word: str) -> bool:
        return token.startswith(word) if self.prefix else token == word


@functools.lru_cache(maxsize=64)
def _candidate_words(tokens: tuple[str, ...], target_len: int) -> frozenset[str]:
    """Every token, plus concatenations of adjacent tokens up to ``target_len`` characters.

    Concatenation catches spaced-out words ("s e x", "fu ck") without matching inside longer words
    (so "assistant" never matches "ass"). Cached: every block-list term of a similar length asks for the same set
    (a long prompt of single letters would otherwise be re-joined once per term).
    """
    return frozenset(_iter_candidates(tokens, target_len))


@functools.lru_cache(maxsize=64)
def _candidate_prefixes(tokens: tuple[str, ...], length: int) -> frozenset[str]:
    """The first ``length`` characters of every candidate at least that long: prefix terms become set lookups."""
    return frozenset(t[:length] for t in _candidate_words(tokens, length) if len(t) >= length)


def _iter_candidates(tokens: Sequence[str], target_len: int) -> Iterable[str]:
    for i, tok in enumerate(tokens):
        yield tok
        acc = tok
        for j in range(i + 1, len(tokens)):
            acc += tokens[j]
            if len(acc) > target_len + 8:
                break
            yield acc


def load_blocklist(lines: Iterable[str]) -> list[BlockTerm]:
    """Parse ``category<TAB>term`` lines (``#`` comments and blank lines ignored)."""
    terms = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"block list line {lineno}: expected 'category<TAB>term', got {line!r}")
        category, term = (p.strip() for p in line.split("\t", 1))
        terms.append(BlockTerm.parse(category, term))
    return terms


@functools.cache
def default_blocklist() -> tuple[BlockTerm, ...]:
    text = (Path(__file__).parent / "filter_v1_blocklist.txt").read_text(encoding="utf-8")
    return tuple(load_blocklist(text.splitlines()))


# --------------------------------------------------------------------------------------------------
# The offline classifier


def _features(text: str, dim: int) -> np.ndarray:
    """Hashed bag of word unigrams/bigrams and character 3–5-grams of the normalised text, L2-normalised."""
    norm = normalise(text)
    words = [_collapse_repeats(w) for w in norm.split(" ") if w]
    grams: list[str] = [f"w:{w}" for w in words]
    grams += [f"b:{a}_{b}" for a, b in zip(words, words[1:], strict=False)]
    padded = f" {' '.join(words)} "
    for n in (3, 4, 5):
        grams += [f"c{n}:{padded[i:i + n]}" for i in range(len(padded) - n + 1)]
    vec = np.zeros(dim, dtype=np.float32)
    for g in grams:
        h = int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
        vec[h % dim] += 1.0 if (h >> 63) & 1 == 0 else -1.0
    norm2 = float(np.linalg.norm(vec))
    return vec / norm2 if norm2 > 0 else vec


@dataclass
class AbuseClassifier:
    """Logistic regression on hashed n-grams; ``score`` is P(abusive)."""

    weights: np.ndarray
    bias: float
    dim: int

    @classmethod
    def train(
        cls, texts: Sequence[str], labels: Sequence[int], dim: int = 1 << 14, epochs: int = 300,
        lr: float = 2.0, l2: float = 1e-4,
    ) -> AbuseClassifier:
        """Full-batch gradient descent on the log loss (deterministic: zero init, fixed order)."""
        if len(texts) != len(labels) or not texts:
            raise ValueError("need as many labels as texts, and at least one example")
        x = np.stack([_features(t, dim) for t in texts])
        y = np.asarray(labels, dtype=np.float32)
        pos = max(float(y.sum()), 1.0)
        neg = max(float(len(y) - y.sum()), 1.0)
        sample_w = np.where(y > 0, len(y) / (2 * pos), len(y) / (2 * neg)).astype(np.float32)
        w = np.zeros(dim, dtype=np.float32)
        b = 0.0
        for _ in range(epochs):
            p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
            g = (p - y) * sample_w / len(y)
            w -= lr * (x.T @ g + l2 * w)
            b -= lr * float(g.sum())
        return cls(weights=w, bias=b, dim=dim)

    def score(self, text: str) -> float:
        z = float(_features(text, self.dim) @ self.weights + self.bias)
        return float(1.0 / (1.0 + np.exp(-z)))


def read_labelled(lines: Iterable[str]) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in ("0", "1"):
            raise ValueError(f"training line {lineno}: expected '0|1<TAB>text', got {line!r}")
        texts.append(text)
        labels.append(int(label))
    return texts, labels


@functools.cache
def default_classifier() -> AbuseClassifier:
    path = Path(__file__).resolve().parents[2] / "tests" / "bot" / "data" / "filter_eval" / "legacy_abuse.tsv"
    text = path.read_text(encoding="utf-8")
    texts, labels = read_labelled(text.splitlines())
    return AbuseClassifier.train(texts, labels)


# --------------------------------------------------------------------------------------------------
# The policy


@dataclass(frozen=True)
class FilterDecision:
    allowed: bool
    category: str | None = None  # sexual / minors / violence / self_harm / hate / profanity / abuse / invalid
    reason: str = ""  # short text safe to show the user
    matched: str | None = None  # the list term or classifier score that decided it (for logs and moderators)
    score: float = 0.0  # classifier P(abusive)
    normalised: str = ""


# categories a guild's allow list cannot unlock: a guild may allow "nude" for its life-drawing channel, never
# sexual content involving minors or hate
CRITICAL_CATEGORIES = frozenset({"minors", "hate"})


@dataclass
class GuildPolicy:
    """Per-guild additions (GuildSettings): extra blocked terms and allow-listed terms. Allowed terms never
    suppress a built-in term of a critical category (:data:`CRITICAL_CATEGORIES`)."""

    block: Sequence[str] = ()
    allow: Sequence[str] = ()
    classifier_threshold: float | None = None


@dataclass
class PromptFilter:
    blocklist: Sequence[BlockTerm] = field(default_factory=default_blocklist)
    classifier: AbuseClassifier | None = field(default_factory=default_classifier)
    threshold: float = 0.8
    max_chars: int = MAX_PROMPT_CHARS

    def check(self, prompt: str, policy: GuildPolicy | None = None) -> FilterDecision:
        policy = policy or GuildPolicy()
        if not prompt or not prompt.strip():
            return FilterDecision(False, "invalid", "The prompt is empty.")
        if len(prompt) > self.max_chars:
            return FilterDecision(False, "invalid", f"The prompt is longer than {self.max_chars} characters.")
        norm = normalise(prompt)
        if not norm:
            return FilterDecision(False, "invalid", "The prompt has no letters or digits.", normalised=norm)
        allow = [BlockTerm.parse("allow", a) for a in policy.allow if normalise(a.rstrip("*"))]
        allowed_tokens = _remove_allowed(norm.split(" "), allow)
        aggressive = normalise(prompt, aggressive=True)
        variants = [tuple(allowed_tokens)]  # tuples: every term below reuses the cached candidate sets
        if aggressive != norm:
            variants.append(tuple(_remove_allowed(aggressive.split(" "), allow)))
        guild_terms = [BlockTerm.parse("guild", t) for t in policy.block if normalise(t.rstrip("*"))]
        # the critical categories see the prompt as it is, before the guild's allow list removed anything
        unallowed = variants if not allow else [tuple(norm.split(" ")), tuple(aggressive.split(" "))]
        for term in [*guild_terms, *self.blocklist]:
            seen = unallowed if term.category in CRITICAL_CATEGORIES else variants
            if any(term.matches(v) for v in seen):
                return FilterDecision(
                    False, term.category, f"The prompt contains a blocked term ({term.category.replace('_', ' ')}).",
                    matched=term.text, normalised=norm,
                )
        score = 0.0
        if self.classifier is not None and allowed_tokens:
            score = self.classifier.score(" ".join(allowed_tokens))
            threshold = policy.classifier_threshold if policy.classifier_threshold is not None else self.threshold
            if score >= threshold:
                return FilterDecision(
                    False, "abuse", "The prompt looks abusive or threatening.", matched=f"classifier {score:.2f}",
                    score=score, normalised=norm,
                )
        return FilterDecision(True, None, "", score=score, normalised=norm)


def _remove_allowed(tokens: list[str], allow: Sequence[BlockTerm]) -> list[str]:
    """Drop token runs that an allow-list term matches exactly, so they cannot trigger a block."""
    if not allow:
        return tokens
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for term in allow:
            n = len(term.words)
            if tokens[i : i + n] and len(tokens[i : i + n]) == n and all(
                term._word_ok(tokens[i + k], term.words[k]) if k == n - 1 else tokens[i + k] == term.words[k]
                for k in range(n)
            ):
                i += n
                break
        else:
            out.append(tokens[i])
            i += 1
    return out
