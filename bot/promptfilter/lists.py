"""Per-category, per-language term lists with word boundaries and allow phrases (the ``obscenity`` library's idea).

Each list file under ``bot/assets/promptfilter/`` holds ``category<TAB>term`` and ``allow<TAB>phrase`` lines. A
term is matched in one of three ways, chosen by how it is written:

- Latin script (after the skeleton fold): on the Latin skeleton and its de-stretched and letter-by-letter views, at
  word boundaries; a trailing ``*`` lets the last word continue ("sex*" → "sexual"), so gaps between exact words
  close without matching inside other words ("Essex", "be heading", "a bit chilly");
- Cyrillic, or written with a leading ``=``: on the prompt in its own script, at word boundaries;
- Japanese/Chinese: as a substring of the prompt in its own script with spaces and punctuation removed, and with
  one character hidden by a sign ("チ○コ").

An allow phrase suppresses every hit that lies inside it ("moby dick", "naked mole rat", "suicide doors"); a guild's
allow list does the same for every category except the critical ones.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

from bot.promptfilter import normalise as nz

LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "ru", "ja")
# most serious first: a prompt that hits several categories is refused for the first
PRIORITY = ("minors", "hate", "self_harm", "violence", "sexual", "abuse", "profanity", "guild")
WILD = "\x02"  # in a literal: the word may continue here
_LATIN_CONT = "[a-z0-9\x01]"  # \x01: normalise.IL, an "i" or an "l"
_NATIVE_CONT = r"\w"
# Latin letters that stand in for Cyrillic ones inside a Cyrillic word ("пoрнo" with Latin o)
_TO_CYRILLIC = str.maketrans({"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у", "k": "к",
                              "m": "м", "t": "т", "h": "н", "b": "в", "3": "з", "0": "о", "i": "і"})
_LOOKALIKES = frozenset("aeopcxykmthb30i")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_WORD = re.compile(r"\w+")
# number words under 18 in the eight languages (their values), for "a seven-year-old", "siebenjährig", "de sept ans"
_NUMBER_WORDS = {
    "en": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen",
    "de": "ein zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn",
    "fr": "un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize dix-sept",
    "es": "un dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince dieciséis diecisiete",
    "it": "un due tre quattro cinque sei sette otto nove dieci undici dodici tredici quattordici quindici sedici "
          "diciassette",
    "pt": "um dois três quatro cinco seis sete oito nove dez onze doze treze catorze quinze dezesseis dezessete",
}
_NUMBERS = {w: i for words in _NUMBER_WORDS.values() for i, w in enumerate(words.split(), 1)}
_NUMBERS.update({"une": 1, "uno": 1, "una": 1, "uma": 1, "duas": 2, "eins": 1, "quatorze": 14, "dezasseis": 16,
                 "dezassete": 17})
_AGE = re.compile(
    r"(?<![\w-])(\d{1,2}|" + "|".join(sorted(_NUMBERS, key=len, reverse=True)) + r")\s*[- ]?\s*(?:yo|y/o|y\.o\.?|"
    r"years?[- ]old|yrs?[- ]old|years? of age|jahre alt|jährig\w*|ans|años|anni|anos|лет|года|歳|才)(?!\w)")
# a word before a number word that makes it part of a larger number
_TENS = frozenset("twenty thirty forty fifty sixty seventy eighty ninety hundred y e et und and".split())
_CJK_AGE = re.compile(r"(?<![一二三四五六七八九十\d])([一二三四五六七八九十]{1,3})(?:歳|才)")
_KANJI = {c: i for i, c in enumerate("一二三四五六七八九", 1)}


def _kanji_number(text: str) -> int:
    """一 → 1, 十 → 10, 十七 → 17, 二十 → 20 (enough for ages)."""
    if "十" not in text:
        return _KANJI.get(text, 99) if len(text) == 1 else 99
    tens, _, ones = text.partition("十")
    return (_KANJI.get(tens, 99) if tens else 1) * 10 + (_KANJI.get(ones, 99) if ones else 0)


@dataclass(frozen=True)
class Term:
    """One list entry, parsed into the literal it matches and the view it is matched on."""

    category: str
    text: str  # as written in the list
    literal: str  # the form compared against the view
    kind: str  # "latin" | "native" | "substring"
    prefix: bool

    @classmethod
    def parse(cls, category: str, raw: str) -> Term:
        """A ``*`` ends a word that may continue: the last ("sex*") or any other ("abgetrennte* kopf*"); a leading
        ``*`` lets a Latin word begin earlier, for compounds ("*nackt*" catches "splitterfasernackt")."""
        raw = raw.strip()
        body = raw.lstrip("=")
        words = body.split()
        if raw.startswith("="):
            kind, fold = "native", nz.native
        elif nz.has_cjk(nz.native(body)):
            kind, fold = "substring", lambda w: compact(nz.native(w))
        elif nz.has_own_script(nz.native(body)):
            kind, fold = "native", nz.native
        else:
            kind, fold = "latin", nz.skeleton
        parts = []
        for w in words:
            folded = fold(w.strip("*"))
            if folded:
                lead = WILD if w.startswith("*") and kind == "latin" else ""
                parts.append(lead + folded + (WILD if w.endswith("*") and kind != "substring" else ""))
        literal = ("" if kind == "substring" else " ").join(parts)
        if not literal.replace(WILD, ""):
            raise ValueError(f"empty term: {raw!r}")
        return cls(category, raw, literal, kind, WILD in literal)


def compact(text: str) -> str:
    """The substring view: letters and digits only (spaces and punctuation between CJK characters dropped)."""
    return "".join(c for c in text if c.isalnum() or unicodedata.category(c).startswith("M"))


# signs that hide one character of a Japanese word ("チ○コ", "ま●こ"): in the masked view each is MASK, and every
# substring term of three or more characters is also matched with any one of its characters masked
MASKS = frozenset("○◯●〇◎＊*×✕")
MASK = "○"


def masked(text: str) -> str | None:
    """The substring view with each masking sign kept as :data:`MASK`; None when there is none."""
    if not any(c in MASKS for c in text):
        return None
    return "".join(MASK if c in MASKS else c for c in text
                   if c in MASKS or c.isalnum() or unicodedata.category(c).startswith("M"))


def _char(ch: str, cont: str) -> str:
    if ch == WILD:
        return f"{cont}*"
    return f"[{ch}{nz.IL}]" if cont == _LATIN_CONT and ch in "il" else re.escape(ch)


def _trie_regex(literals: Iterable[str], cont: str, bounded: bool) -> re.Pattern[str] | None:
    """One regex for many literals, shaped as a trie so matching costs about one pass over the text."""
    trie: dict = {}
    for lit in literals:
        node = trie
        for ch in lit:
            node = node.setdefault(ch, {})
        node[""] = "exact"
    if not trie:
        return None

    def build(node: dict) -> str:
        alts = [_char(ch, cont) + build(child) for ch, child in sorted(node.items()) if ch]
        if "" in node:
            alts.append("")
        if len(alts) == 1:
            return alts[0]
        return "(?:" + "|".join(alts) + ")"

    body = build(trie)
    if bounded:
        return re.compile(f"(?<!{cont})(?:{body})(?!{cont})")
    return re.compile(body)


@dataclass
class TermSet:
    """Terms compiled into one trie regex per kind, and a lookup from a hit back to its term."""

    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        ordered = sorted(self.terms, key=lambda t: PRIORITY.index(t.category) if t.category in PRIORITY else 99)
        self._exact: dict[tuple[str, str], Term] = {}
        self._wild: dict[str, list[tuple[re.Pattern[str], Term]]] = {"latin": [], "native": [], "substring": []}
        self._stems: dict[str, Term] = {}  # a Latin term's literal with its wildcards matching nothing
        items: dict[str, list[str]] = {"latin": [], "native": [], "substring": []}
        for t in ordered:
            forms = [t.literal]
            if t.kind == "latin" and " " in t.literal and len(t.literal.replace(" ", "")) >= 6:
                forms.append(t.literal.replace(" ", ""))  # "childporn", "sexpistols"
            if t.kind == "latin":  # as the swapped view reads it: "cock pheasant" is "cock feasant" there
                forms += [f for f in map(nz.sound_swaps, forms) if f not in forms]
            if t.kind == "substring" and len(t.literal) >= 3:  # one character hidden: "チ○コ"
                forms += [t.literal[:i] + MASK + t.literal[i + 1 :] for i in range(len(t.literal))]
            cont = _LATIN_CONT if t.kind == "latin" else _NATIVE_CONT
            for form in forms:
                items[t.kind].append(form)
                if t.prefix:
                    self._wild[t.kind].append((re.compile("".join(_char(c, cont) for c in form)), t))
                    if t.kind == "latin":
                        self._stems.setdefault(form.replace(WILD, ""), t)
                else:
                    self._exact.setdefault((t.kind, form), t)
        self._regex = {
            "latin": _trie_regex(items["latin"], _LATIN_CONT, True),
            "native": _trie_regex(items["native"], _NATIVE_CONT, True),
            "substring": _trie_regex(items["substring"], "", False),
        }

    def term_for(self, kind: str, hit: str) -> Term | None:
        """The most serious term that matches the whole of ``hit``."""
        readings = [hit]
        if nz.IL in hit:  # each i/l look-alike as either letter (a hit is a few words: a handful of readings)
            n = min(hit.count(nz.IL), 6)
            readings = []
            for k in range(1 << n):
                reading = hit
                for b in range(n):
                    reading = reading.replace(nz.IL, "il"[(k >> b) & 1], 1)
                readings.append(reading.replace(nz.IL, "i"))
        for reading in readings:
            term = self._exact.get((kind, reading))
            if term is not None:
                return term
        for regex, term in self._wild[kind]:
            if regex.fullmatch(hit):
                return term
        return None

    def whole(self, candidate: str) -> Term | None:
        """The Latin term that ``candidate`` is exactly, with no word continuing ("hentai", "nude" for "nude*")."""
        return self._exact.get(("latin", candidate)) or self._stems.get(candidate)

    def find(self, kind: str, text: str) -> list[tuple[int, int, Term]]:
        """Every hit as (start, end, term); overlapping hits are all reported (each start position is tried)."""
        regex = self._regex[kind]
        if regex is None or not text:
            return []
        out = []
        pos = 0
        while pos <= len(text):
            m = regex.search(text, pos)
            if m is None:
                break
            term = self.term_for(kind, m.group(0))
            if term is not None:
                out.append((m.start(), m.end(), term))
            pos = m.start() + 1
        return out


def parse_lines(lines: Iterable[str], source: str = "list") -> tuple[list[Term], list[Term]]:
    """``(terms, allow phrases)`` from ``category<TAB>term`` lines; ``#`` comments and blank lines are skipped."""
    terms, allows = [], []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"{source} line {lineno}: expected 'category<TAB>term', got {line!r}")
        category, raw = (p.strip() for p in line.split("\t", 1))
        try:
            term = Term.parse(category, raw)
        except ValueError as exc:
            raise ValueError(f"{source} line {lineno}: {exc}") from None
        (allows if category == "allow" else terms).append(term)
    return terms, allows


def _asset(name: str) -> list[str]:
    return resources.files("bot.assets.promptfilter").joinpath(name).read_text(encoding="utf-8").splitlines()


@dataclass(frozen=True)
class Hit:
    category: str
    term: str  # as written in its list
    view: str  # the view it was found in, for moderators


@dataclass
class Lexicon:
    """The packaged lists: category terms, built-in allow phrases, and the two groups of the minors rule."""

    terms: TermSet
    allows: TermSet
    groups: TermSet
    #: what the sentence encoder is not given to read: the allow phrases (known-innocent words it would only
    #: misread) and the private people of the targeted-person rule ("my boss", "mein Chef"), which that rule judges;
    #: read by the encoder, they taught it that a known person in any scene is abuse
    unread: TermSet | None = None
    #: the same and the swastika's names, for a prompt that sets it in a Hindu, Jain or Buddhist place or feast
    unread_sacred: TermSet | None = None

    def unread_for(self, group_hits: Sequence[Hit]) -> TermSet:
        """What the encoder is not given to read in a prompt with these group hits."""
        sacred = any(h.category == "sacred" for h in group_hits)
        return (self.unread_sacred if sacred else self.unread) or self.allows

    @classmethod
    @functools.cache
    def default(cls) -> Lexicon:
        terms: list[Term] = []
        allows: list[Term] = []
        for lang in LANGUAGES:
            t, a = parse_lines(_asset(f"{lang}.txt"), f"{lang}.txt")
            terms += t
            allows += a
        groups, _ = parse_lines(_asset("groups.txt"), "groups.txt")
        people = tuple(t for t in groups if t.category == "person")
        symbols = tuple(t for t in groups if t.category == "sacred_symbol")
        return cls(TermSet(tuple(terms)), TermSet(tuple(allows)), TermSet(tuple(groups)),
                   TermSet(tuple(allows) + people), TermSet(tuple(allows) + people + symbols))


@dataclass
class Texts:
    """The strings each kind of term is matched against, computed once per prompt."""

    latin: list[str]
    native: list[str]
    substring: list[str]
    aligned: tuple[str, ...] = ()  # the skeleton and its i/l readings: an allow span in one holds in all
    reading: str = ""  # the prompt in its own script, spelled-out words joined, look-alikes put back: the encoder's
    joins: tuple[str, ...] = ()  # words broken up around a one-letter piece, put together: whole terms only

    @classmethod
    def of(cls, views: nz.Views) -> Texts:
        latin = list(dict.fromkeys([*nz.stretch_views(views.skeleton), *nz.stretch_views(views.aggressive)]))
        latin += [nz.sound_swaps(v) for v in latin]  # "fvck", "phuck"; the same text when nothing is swapped
        joins: list[str] = []
        for view in list(latin):  # de-stretched first: "f u ccc k" is spelled out too
            words = view.split(" ")
            latin += nz.runs_joined_variants(words)
            joins += [j for j in nz.spaced_joins(words) if len(j) >= 3]
        latin += views.il_variants
        if _MASKED_LETTER.search(views.native):  # "motherf*cker", "c*nt", "n#gger": each vowel in the hidden place
            for vowel in "aeiou":
                latin += nz.stretch_views(nz.Views.of(_MASKED_LETTER.sub(vowel, views.native)).skeleton)
        native = [views.native]
        if _CYRILLIC.search(views.native):
            native.append(cyrillic_fold(views.native))
        cleaned = nz.clean_words(native[-1])
        joined = nz.runs_joined_variants(cleaned)
        native += [" ".join(cleaned), *joined]
        reading = joined[0] if joined else " ".join(cleaned)
        aligned = tuple(v for v in (views.skeleton, *views.il_variants) if len(v) == len(views.skeleton))
        substring = []
        if nz.has_cjk(views.native):
            substring = [compact(views.native), *filter(None, [masked(views.native)])]
        return cls(list(dict.fromkeys(latin)), list(dict.fromkeys(native)), substring,
                   aligned if len(aligned) > 1 else (), reading, tuple(dict.fromkeys(joins)))

    def each(self) -> Iterable[tuple[str, str]]:
        for kind in ("latin", "native", "substring"):
            for text in getattr(self, kind):
                yield kind, text


# one to three signs standing for a letter between two letters of a Latin word ("f*ck", "sh#t", "motherf**ker")
_MASKED_LETTER = re.compile(r"(?<=[a-zA-Z])[*#%]{1,3}(?=[a-zA-Z])")


def cyrillic_fold(text: str) -> str:
    """Latin look-alikes read as Cyrillic inside Cyrillic words, and in short all-look-alike words of a mostly
    Cyrillic text ("жeнщинa xoчeт пoкончить c coбой")."""
    letters = [c for c in text if c.isalpha()]
    mostly = sum(bool(_CYRILLIC.match(c)) for c in letters) * 2 >= len(letters)

    def fold(m: re.Match[str]) -> str:
        w = m.group(0)
        if _CYRILLIC.search(w) or (mostly and all(c in _LOOKALIKES for c in w)):
            return w.translate(_TO_CYRILLIC)
        return w

    return _WORD.sub(fold, text)


def find_hits(texts: Texts, terms: TermSet, allows: Sequence[TermSet], guild_allow: TermSet | None,
              critical: frozenset[str]) -> tuple[list[Hit], list[Hit], list[Hit]]:
    """``(hits, guild_allowed, allowed)``: term hits outside every allow span, the hits only a guild's allow list
    suppressed (never of a critical category), and those a packaged allow phrase suppressed."""
    hits: list[Hit] = []
    waived: list[Hit] = []
    suppressed: list[Hit] = []
    per_view = []
    allowed_reading: dict[tuple[str, str], int] = {}  # (kind, term): most hits of it one view had, all allowed
    for kind, text in texts.each():
        found = terms.find(kind, text)
        if not found:
            continue
        group = texts.aligned if kind == "latin" and text in texts.aligned else (text,)
        spans = [(s, e) for a in allows for t in group for s, e, _ in a.find(kind, t)]
        inside = [any(s <= start and end <= e for s, e in spans) for start, end, _ in found]
        counts: dict[str, list[int]] = {}
        for (_, _, term), ok in zip(found, inside, strict=True):
            counts.setdefault(term.text, [0, 0])[ok] += 1
        for name, (outside, allowed) in counts.items():
            if not outside:
                allowed_reading[kind, name] = max(allowed_reading.get((kind, name), 0), allowed)
        per_view.append((kind, text, group, found, inside, counts))
    for kind, text, group, found, inside, counts in per_view:
        guild_spans = [(s, e) for t in group for s, e, _ in guild_allow.find(kind, t)] if guild_allow else []
        for (start, end, term), ok in zip(found, inside, strict=True):
            hit = Hit(term.category, term.text, text)
            # inside an allow phrase here, or in another reading of the prompt where every hit of this term was
            # ("nude colour" read with its "l" look-alike; "голый землекоп" with its spaced letters joined)
            if ok or sum(counts[term.text]) <= allowed_reading.get((kind, term.text), 0):
                suppressed.append(hit)
                continue
            if term.category not in critical and any(s <= start and end <= e for s, e in guild_spans):
                waived.append(hit)
            else:
                hits.append(hit)
    allowed_terms = {h.term for h in suppressed}  # a joined reading of words an allow phrase covered is that hit
    for candidate in texts.joins:
        term = terms.whole(candidate)
        if term is not None and term.text not in allowed_terms:
            (waived if term.category not in critical and guild_allow is not None and guild_allow.whole(candidate)
             else hits).append(Hit(term.category, term.text, candidate))
    return hits, waived, suppressed


# an @handle of a social network ("@dani_w", "@leonie.mx"); not an e-mail address (a word character before the @)
_HANDLE = re.compile(r"(?<![\w@])@[A-Za-z0-9_][A-Za-z0-9_.]{2,}")


# a street address: a number with a street word in the eight languages ("42 Maple Street", "Lindenstraße 12",
# "14 rue des Lilas", "calle Alcalá 45", "via Garibaldi 18", "rua das Flores 230", "ул. Ленина 15")
_STREET = (r"street|st|road|rd|avenue|ave|lane|ln|drive|dr|boulevard|blvd|court|ct|close|crescent|way|"
           r"rue|allee|allée|chemin|impasse|calle|avenida|av|paseo|plaza|carrer|via|viale|piazza|corso|vicolo|"
           r"rua|travessa|largo|estrada|alameda|ул|улица|проспект|пр|переулок|пер")
_ADDRESS = re.compile(
    rf"(?<!\w)\d{{1,4}}[a-z]?,?\s+(?:[\w'’-]+\s+){{0,3}}(?:{_STREET})\.?(?!\w)"  # 42 Maple Street, 14 rue des Lilas
    rf"|(?<!\w)(?:{_STREET})\.?\s+(?:[\w'’.-]+\s+){{0,3}}\d{{1,4}}(?!\d)"  # calle Alcalá 45, ул. Ленина 15
    r"|\w+(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm)\s+\d{1,4}(?!\d)"  # Lindenstraße 12
    r"|[都道府県市区町村]\S{0,12}\d+[-−丁]", re.IGNORECASE)


def address_mentioned(native: str) -> str | None:
    """The first street address in the prompt, or None."""
    m = _ADDRESS.search(native)
    return m.group(0) if m else None


# a word written in leetspeak ("r3@l1s7", "@nte8raço"), where an "@" is an "a" and not a handle
_LEET_WORD = re.compile(r"[^\W\d_][0-9$!@]|[0-9$!@][^\W\d_]")


def handle_mentioned(native: str) -> str | None:
    """The first @handle in the prompt, a person named the way a harasser names one, or None (also when the rest of
    the prompt is in leetspeak, whose "@" is an "a": "@v3c un cou734u")."""
    m = _HANDLE.search(native)
    if m is None or _LEET_WORD.search(native[: m.start()] + " " + native[m.end():]):
        return None
    return m.group(0)


# a school year up to the tenth, which only children are in ("6th grade", "aus der 6. Klasse", "6º ano", "en 5e",
# "в 7 классе", 小6, 中2)
_GRADE = re.compile(
    r"(?<!\d)(?:10|[1-9])(?:st|nd|rd|th)[ -]grade(?:rs?)?(?!\w)"
    r"|(?<!\d)(?:10|[3-9])\.\s?klass(?:e|en)?(?!\w)"  # not "1. Klasse", a train's first class
    r"|(?<![\w.,])(?:en|de|élève de|eleve de)\s(?:[3-6])(?:e|ème|eme)(?!\w)"
    r"|(?<!\d)(?:10|[1-9])\s?[ºª°o]\s?(?:de\s)?(?:grado|ano|año|primaria|secundaria|elementare|media|básico|basico)(?!\w)"
    r"|(?<!\d)(?:10|[1-9])\s?-?\s?(?:го\s)?класс\w*"
    r"|[小中][1-6一二三四五六](?:年生)?(?![0-9０-９年])|(?:小学|中学)[1-6一二三四五六]年生?", re.IGNORECASE)


def grade_mentioned(native: str) -> str | None:
    """The first school year up to the tenth in the prompt, or None."""
    m = _GRADE.search(native)
    return m.group(0) if m else None


def age_mentioned(native: str) -> str | None:
    """The first age under 18 written with digits, number words of the Latin-script languages ("a 12 year old",
    "siebenjährig", "de sept ans") or kanji ("七歳"); a number that is part of a larger one ("vingt-sept ans") is
    not one."""
    for m in _AGE.finditer(native):
        n = m.group(1)
        before = native[: m.start()].split()[-1:]
        if before and before[0] in _TENS:  # "twenty one years old", "treinta y dos años"
            continue
        if (int(n) if n.isdigit() else _NUMBERS[n]) < 18:
            return m.group(0)
    for m in _CJK_AGE.finditer(native):
        if _kanji_number(m.group(1)) < 18:
            return m.group(0)
    return None


@functools.lru_cache(maxsize=256)
def guild_terms(block: tuple[str, ...], category: str) -> TermSet | None:
    """A guild's own terms, compiled once per distinct list (guild lists change rarely)."""
    parsed = [Term.parse(category, t) for t in block if t.strip().lstrip("=").rstrip("*").strip()
              and _nonempty(t)]
    return TermSet(tuple(parsed)) if parsed else None


def _nonempty(raw: str) -> bool:
    try:
        Term.parse("guild", raw)
    except ValueError:
        return False
    return True
