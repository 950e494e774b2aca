"""Two views of a prompt: its own script (for the other languages' lists and the encoder) and a Latin skeleton.

The skeleton is what the Latin-script lists match: look-alike letters from the Unicode confusables table (the
``confusable-homoglyphs`` package, MIT, which ships Unicode's ``confusables.txt`` as JSON), letters named by
Unicode (small capitals, enclosed, negative-squared, regional-indicator, mathematical), emoji as their English
names (the ``emoji`` package), accents dropped, leetspeak read inside words, punctuation inside a word dropped.
Repeated letters are collapsed into extra views by ``stretch_views`` rather than in place, so "coffee" stays a word.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources

import emoji

# Leetspeak: digits and symbols standing for letters, read only inside a word that has a letter or several digits.
LEET: dict[str, str] = {
    "0": "o", "1": "i", "2": "z", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g",
    "@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e", "£": "l", "¥": "y", "(": "c", "<": "c",
}
# Letters the confusables table maps to a digit or symbol (or not at all) that read as a letter in a prompt.
EXTRA: dict[str, str] = {
    "ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ħ": "h", "ı": "i", "з": "z", "ч": "y",
    "п": "n", "л": "n", "и": "u", "ц": "u", "г": "r", "ь": "b", "в": "b", "м": "m", "т": "t", "к": "k",
    "н": "h", "я": "r", "д": "d", "ɑ": "a", "ɡ": "g", "ɪ": "i", "ʏ": "y", "ʀ": "r", "ɴ": "n", "ʜ": "h",
    "ʟ": "l", "ʙ": "b", "ɢ": "g", "ʍ": "m", "ɯ": "w", "ɾ": "r", "ʋ": "u", "ɒ": "o", "ɔ": "c", "ə": "e",
    "ɛ": "e", "ɩ": "i", "ʃ": "s", "ʒ": "z", "θ": "o", "λ": "a", "π": "n", "ψ": "w", "φ": "o", "η": "n",
    "μ": "u", "γ": "y", "σ": "o", "ς": "s", "δ": "d", "ζ": "z", "β": "b", "χ": "x", "ω": "w", "κ": "k",
    "ν": "v", "τ": "t", "υ": "u", "ι": "i", "ρ": "p", "ο": "o", "ε": "e", "α": "a",
    "ӏ": "l", "ꞁ": "l", "׀": "l",  # drawn as an "l" (the table reads the Cyrillic palochka as "i")
}
_NAMED = re.compile(
    r"(?:LATIN|REGIONAL INDICATOR SYMBOL|SQUARED|CIRCLED|PARENTHESIZED|MATHEMATICAL|FULLWIDTH|MODIFIER)"
    r".*LETTER (?:SMALL CAPITAL |SMALL |CAPITAL |DOTLESS )?([A-Z])$"
    r"|^LATIN LETTER SMALL CAPITAL ([A-Z])$"
)
# blocks scanned for letters Unicode names plainly: Latin extensions, IPA, phonetic, letterlike, enclosed,
# fullwidth, mathematical alphanumerics, enclosed supplement (negative squared, regional indicators)
_RANGES = [(0x80, 0x24F), (0x250, 0x2AF), (0x1D00, 0x1DBF), (0x1E00, 0x1EFF), (0x2100, 0x214F),
           (0x2460, 0x24FF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF),
           (0x1F100, 0x1F1FF)]
# characters that read as "i" or as "l" depending on the word ("kill yourseӏf", "gir| cutting")
IL_LIKE = frozenset("|ӏıɪιіІΙǀ׀ⅼℓ∣ꞁ")
IL = "\x01"
_ELISION = re.compile(r"(?<=\S)['’ʼ`´]+(?=\S)|(?<=[^\W\d_]{3})[\-‐‑–—]+(?=[^\W\d_]{3})")


def _split(m: re.Match[str]) -> str:
    """"l'amour", "mole-rat": two words, as in the lists; a hyphen beside a short or stretched piece joins it
    ("fu-ck", "n-u-d-e", "f-uuu-ccc-k")."""
    if m.group(0)[0] in "'’ʼ`´":
        return " "
    before, after = m.string[m.start() - 3 : m.start()], m.string[m.end() : m.end() + 3]
    word_before = re.search(r"[^\W\d_]*$", m.string[: m.start()]).group(0)
    word_after = re.match(r"[^\W\d_]*", m.string[m.end() :]).group(0)
    if _RUN3.search(word_before) or _RUN3.search(word_after):  # a stretched piece: "nnna-ked"
        return ""
    return " " if len(set(before)) > 1 and len(set(after)) > 1 else ""
_SCRIPTS_OWN = re.compile(r"[\u0400-\u04ff\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\u0600-\u06ff]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uff66-\uff9f]")


@functools.cache
def skeleton_table() -> dict[str, str]:
    """Character → lower-case ASCII letters; built once per process (tens of milliseconds)."""
    table: dict[str, str] = {}
    path = resources.files("confusable_homoglyphs").joinpath("confusables.json")
    confusables = json.loads(path.read_text(encoding="utf-8"))
    for ch, homoglyphs in confusables.items():
        if ch.isascii() or len(ch) != 1:
            continue
        for h in homoglyphs:
            c = h["c"]
            if len(c) == 1 and c.isascii() and c.isalpha():
                table[ch] = c.lower()
                break
    for lo, hi in _RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            m = _NAMED.search(unicodedata.name(ch, ""))
            if m:
                table[ch] = (m.group(1) or m.group(2)).lower()
    for ch in list(table):  # the case-folded form of a mapped capital maps the same way (never an ASCII letter)
        folded = ch.casefold()
        if len(folded) == 1 and not folded.isascii():
            table.setdefault(folded, table[ch])
    table.update(EXTRA)
    table["|"] = "l"
    return table


# Characters that draw nothing but are letters or symbols to Unicode, so a category test keeps them: the Hangul
# fillers, the braille blank, the combining grapheme joiner, Khmer's invisible vowels, Mongolian's variation
# selectors (Unicode's Default_Ignorable_Code_Point set, less what the category test drops already). Written inside a
# word they split it ("hit\u3164ler").
INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f")


def _strip_invisible(text: str, marks: bool) -> str:
    """Drop format (zero-width, bidi), control characters, letters that draw nothing and, for the skeleton,
    combining marks."""
    drop = ("Cf", "Cc", "Co", "Cs", "Mn", "Me") if marks else ("Cf", "Cc", "Co", "Cs")
    return "".join(" " if ch in "\t\n\r" else ch for ch in text
                   if ch in "\t\n\r" or ch == IL
                   or (ch not in INVISIBLE_LETTERS and unicodedata.category(ch) not in drop))


def _demojize(text: str) -> str:
    """Emoji as their English names between spaces ("🍆" → " eggplant ")."""
    if not emoji.emoji_count(text):
        return text
    return emoji.demojize(text, delimiters=(" \x00", "\x00 ")).replace("\x00", "").replace("_", " ")


def native(text: str) -> str:
    """The prompt in its own script: NFKC, case-folded, invisible characters dropped, emoji as names, one space."""
    text = unicodedata.normalize("NFKC", _strip_invisible(text, marks=False)).casefold()
    text = _regional_to_letters(text)
    return " ".join(_demojize(text).split())


def _regional_to_letters(text: str) -> str:
    """Regional-indicator and negative-squared letters are letters, not flags or buttons ("🇳🇺🇩🇪" → "nude")."""
    if not any(0x1F100 <= ord(c) <= 0x1F1FF for c in text):
        return text
    table = skeleton_table()
    return "".join(table.get(c, c) if 0x1F100 <= ord(c) <= 0x1F1FF else c for c in text)


def _fold(ch: str, table: dict[str, str]) -> str:
    if ch.isascii():
        return ch
    mapped = table.get(ch)
    if mapped is not None:
        return mapped
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if unicodedata.category(c) != "Mn")
    return base if base.isascii() and base else ch


def skeleton(text: str, aggressive: bool = False, il: bool = False) -> str:
    """The Latin skeleton: lower-case words of letters and digits separated by single spaces.

    Punctuation between letters of one word is removed ("b.a.d" → "bad"), leetspeak is read inside words that
    have a letter or several digits ("h3ll0" → "hello"; a bare "4" stays "4") and in spaced-out runs of single
    characters ("g o r 3"). ``aggressive`` also reads trailing "!" and "$" as letters ("henta!"). ``il`` writes
    every character that could be an "i" or an "l" (``IL_LIKE``: "|", "ӏ", "ɪ", "ι"...) as ``IL``, which the lists
    read as either letter.
    """
    table = skeleton_table()
    text = _regional_to_letters(_strip_invisible(text, marks=False))
    if il:
        text = "".join(IL if c in IL_LIKE else c for c in text)
    # look-alikes first (NFKC would turn some into other look-alikes: "ϲ" → "σ"), then NFKC, then again
    text = "".join(table.get(c, c) for c in text)
    text = _demojize(unicodedata.normalize("NFKC", text).casefold())
    text = unicodedata.normalize("NFKC", _strip_invisible(text, marks=True))
    text = "".join(_fold(c, table) for c in text).casefold()
    raws = _ELISION.sub(_split, text).split()
    words = []
    for k, raw in enumerate(raws):
        if len(raw) > 1 and not aggressive:
            raw = raw.rstrip(".,!?;:") or raw  # sentence punctuation, not leetspeak ("world!")
        has_letter = any(c.isalpha() for c in raw)
        spaced = len(raw) == 1 and (aggressive or any(
            0 <= j < len(raws) and len(raws[j]) <= 3 and any(c.isalnum() or c in LEET for c in raws[j])
            for j in (k - 1, k + 1)))
        multi_digit = len(raw) > 1 and any(c.isdigit() for c in raw)
        mapped = "".join(LEET.get(c, c) for c in raw) if has_letter or multi_digit or spaced else raw
        cleaned = "".join(c for c in mapped if c.isalnum() or c == IL)
        if cleaned:
            words.append(cleaned)
    return " ".join(words)


# letters that rarely double in the languages of the lists: a doubled one is read once ("nuude" → "nude")
_RARE_DOUBLES = "ahijkquvwxy"
_RUN3 = re.compile(r"([^\W\d_])\1{2,}")
_RARE2 = re.compile(rf"([{_RARE_DOUBLES}])\1")


def stretch_views(text: str) -> list[str]:
    """``text`` plus its de-stretched forms: runs of three or more letters read once and read twice, rarely
    doubled letters read once ("pooorn" → "porn", "boooobs" → "boobs"); doubled common letters stay."""
    once = _RARE2.sub(r"\1", _RUN3.sub(r"\1", text))
    twice = _RARE2.sub(r"\1", _RUN3.sub(r"\1\1", text))
    return list(dict.fromkeys((text, once, twice)))


_V_AS_U = re.compile(r"(?<=[b-df-hj-np-tv-xz])v(?=[b-df-hj-np-tv-xz])")


def sound_swaps(text: str) -> str:
    """Letters swapped for ones that read alike: a "v" between two consonants is a "u" ("fvck", "cvnt"), "ph" is an
    "f" ("phuck", "phag"). An extra view: the text itself is matched too."""
    return _V_AS_U.sub("u", text.replace("ph", "f"))


def spaced_joins(words: list[str]) -> list[str]:
    """Words broken up with a letter on its own ("n u d e", "henta i", "hen ta i"): every join of two to eight
    consecutive pieces, 20 characters at most, that has a one-letter piece. Adjacent whole words are never joined
    ("be heading", "who returns", "a bit chilly" stay apart)."""
    out: list[str] = []
    for i in range(len(words)):
        acc = words[i]
        single = len(acc) == 1
        for j in range(i + 1, min(len(words), i + 8)):
            acc += words[j]
            single = single or len(words[j]) == 1
            if len(acc) > 20:
                break
            if single:
                out.append(acc)
    return out


def letters_folded(text: str) -> str:
    """``text`` with look-alike letters read as Latin ones and digits left as they are ("10yᴏ" → "10yo"), for ages."""
    table = skeleton_table()
    return "".join(table.get(c, c) for c in text)


# Cyrillic letters no Latin one looks like: a text with one of them is Russian, not Latin in disguise
CYRILLIC_OWN = frozenset("бёжйфшщъыэю")


def latin_in_disguise(text: str) -> bool:
    """Whether a text with Cyrillic letters is a Latin-script one written with look-alikes ("а ϲоuᴘle"): fewer than
    half its letters Cyrillic and none of them a letter only Cyrillic has (a Russian prompt with Latin look-alikes
    inside its words, "coседка", is mostly Cyrillic)."""
    letters = [c for c in text if c.isalpha()]
    cyrillic = sum("\u0400" <= c <= "\u04ff" for c in letters)
    if not cyrillic or has_cjk(text) or any(c in CYRILLIC_OWN for c in text):
        return False
    own = sum(bool(_SCRIPTS_OWN.match(c)) for c in letters)
    return own == cyrillic and cyrillic * 2 < len(letters)


def delook(text: str) -> str:
    """``text`` with look-alike letters of other scripts and Unicode's letter forms (small capitals, "ɑ", "ꜱ") read
    as Latin ones, and the Latin letters with their accents kept ("Päʀᴄʜеɴ" → "pärchen"): a homoglyph prompt as the
    encoder reads the plain one."""
    table = skeleton_table()
    out = []
    for c in text:
        base = unicodedata.normalize("NFKD", c)[:1]
        keep = c.isascii() or c in "ßæœøłđ" or (base.isascii() and base.isalpha())
        out.append(c if keep else table.get(c, c))
    return "".join(out)


def has_own_script(text: str) -> bool:
    """True when the text has letters of a non-Latin script the lists cover natively (Cyrillic, CJK, ...)."""
    return bool(_SCRIPTS_OWN.search(text))


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


@dataclass(frozen=True)
class Views:
    """Everything the layers look at, computed once per prompt."""

    native: str
    skeleton: str
    aggressive: str
    il_variants: tuple[str, ...] = ()  # the skeleton with every i/l look-alike written as IL
    plain: str = ""  # the native view with look-alike letters read as Latin ones, accents kept (``delook``)

    @classmethod
    def of(cls, prompt: str) -> Views:
        il = (skeleton(prompt, il=True),) if any(c in IL_LIKE for c in prompt) else ()
        own = native(prompt)
        plain = own if prompt.isascii() else native(delook(prompt))
        return cls(own, skeleton(prompt), skeleton(prompt, aggressive=True), il, plain)


def runs_joined_variants(words: list[str]) -> list[str]:
    """The words with every run of letters spelled out one by one joined ("heil h i t l e r" → "heil hitler"):
    the whole run, the run less its first or last piece, which may be a one-letter word ("a n u d e",
    "с т р е л ь б а в школе"), and the one-letter pieces alone. Empty when there is no such run."""
    out = []
    for trim in ("", "first", "last", "singles"):
        joined: list[str] = []
        i = 0
        found = False
        longest = 1 if trim == "singles" else 2  # "singles": one-letter pieces only ("vai t o m a r no cu")
        while i < len(words):
            j = i
            while j < len(words) and len(words[j]) <= longest:
                j += 1
            run = words[i:j]
            if len(run) >= 2 and sum(len(w) == 1 for w in run) >= 2:
                found = True
                head, body, tail = ([run[0]], run[1:], []) if trim == "first" else (
                    ([], run[:-1], [run[-1]]) if trim == "last" else ([], run, []))
                joined += [*head, "".join(body), *tail]
                i = j
            else:
                joined.append(words[i])
                i += 1
        if found:
            out.append(" ".join(joined))
    return list(dict.fromkeys(out))


def clean_words(text: str) -> list[str]:
    """Words of ``text`` with punctuation inside them dropped ("о_б_н_а" → "обна"), empty ones left out."""
    return [w for w in ("".join(c for c in raw if c.isalnum()) for raw in text.split()) if w]
