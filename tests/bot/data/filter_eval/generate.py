"""Writes ``train.tsv`` (every training bank: ``bank.py``, ``heldout_bank.py``, ``heldout_bank3.py``, the measured
banks of ``FRESH`` that train the filter, and the compositional ``compose.py``), ``heldout.tsv``
(``heldout_bank3.py``) and one ``<split>.tsv`` per measured bank of ``FRESH``: text, expected, language, trick. Each
measured bank was written by someone who had not seen the filter, measured once on the finished filter of its day,
and trains the filter from the round after (issue #29); ``crossval.py`` leaves one bank out at a time instead.

Run from the repository root: ``python tests/bot/data/filter_eval/generate.py``. Deterministic (fixed seeds). Each
subject appears plainly in a frame and with evasion tricks. Every hand-written bank was written after the filter
of its day and measured once on it before its errors were read and fixed: see bench/RESULTS.md."""

from __future__ import annotations

import importlib
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compose  # noqa: E402
import heldout_bank  # noqa: E402
import heldout_bank3  # noqa: E402
from bank import ABUSE_EXTRA, FRAMES, HARM, OK, ORDINARY_PARTS  # noqa: E402

HOMOGLYPHS = {
    "a": "аɑαᴀ", "b": "ʙЬ", "c": "сᴄϲ", "d": "ԁᴅ", "e": "еᴇε", "g": "ɡɢ", "h": "һʜհ", "i": "іɪι", "j": "јᴊ",
    "k": "кᴋκ", "l": "|ӏʟ", "m": "ᴍм", "n": "ոɴη", "o": "оοօᴏ", "p": "рρᴘ", "r": "гʀ", "s": "ѕꜱ", "t": "тᴛ",
    "u": "սᴜυ", "v": "ᴠν", "w": "ԝᴡ", "x": "хχ", "y": "уʏγ", "z": "ᴢ",
}
LEET = {"a": "4@", "e": "3", "i": "1!", "o": "0", "s": "5$", "t": "7", "g": "9", "b": "8"}
ZW = ["\u200b", "\u200c", "\u200d", "\u2060", "\u00ad"]
TO_CYR = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у"}
LATIN_FOR_CYR = {v: k for k, v in TO_CYR.items()}


def _emoji_letters(word: str, rng: random.Random) -> str:
    base = rng.choice([0x1F1E6, 0x1F170, 0x24B6, 0x1F130])  # regional indicator, negative squared, circled, squared
    return "".join(chr(base + ord(c) - 97) if "a" <= c <= "z" else c for c in word.lower())


def _key(words: list[str]) -> int:
    return max(range(len(words)), key=lambda i: len(words[i]))


def trick(text: str, name: str, rng: random.Random) -> str:
    words = text.split(" ")
    k = _key(words)
    if name == "leet":
        return " ".join("".join(rng.choice(LEET[c]) if c in LEET and rng.random() < 0.6 else c for c in w)
                        if len(w) >= 4 else w for w in words)
    if name == "homoglyph":
        return " ".join("".join(rng.choice(HOMOGLYPHS[c]) if c in HOMOGLYPHS and rng.random() < 0.5 else c
                                for c in w) for w in words)
    if name == "spaced":
        sep = rng.choice([" ", ".", "-", "_", " . "])
        words[k] = sep.join(words[k])
    elif name == "emoji":
        words[k] = _emoji_letters(words[k], rng)
    elif name == "repeat":
        w = words[k]
        i = rng.randrange(len(w))
        words[k] = w[: i + 1] + w[i] * rng.randint(2, 4) + w[i + 1 :]
    elif name == "zerowidth":
        words[k] = rng.choice(ZW).join(words[k])
    elif name == "case":
        return "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    elif name == "cyrillic_mix":  # Latin look-alikes inside Cyrillic words
        return "".join(LATIN_FOR_CYR.get(c, c) if rng.random() < 0.5 else c for c in text)
    elif name == "cjk_spaced":
        return " ".join(text)
    return " ".join(words)


LATIN_TRICKS = ["leet", "homoglyph", "spaced", "emoji", "repeat", "zerowidth", "case"]


def rows_for(lang: str, expected: str, subject: str, rng: random.Random) -> list[tuple[str, str, str, str]]:
    frame = rng.choice(FRAMES[lang])
    out = [(frame.format(subject), expected, lang, "plain")]
    if lang == "ja":
        tricks = ["cjk_spaced"]
    elif lang == "ru":
        tricks = ["cyrillic_mix", "spaced"]
    elif expected in ("abuse",):
        tricks = ["case"]
    elif expected == "ok":
        tricks = rng.sample(["case", "leet", "homoglyph"], 1)
    else:
        tricks = rng.sample(LATIN_TRICKS, 3)
    for name in tricks:
        out.append((rng.choice(FRAMES[lang]).format(trick(subject, name, rng)), expected, lang, name))
    return out


def _bank_rows(bank, rng: random.Random) -> list:
    rows = []
    for lang, cats in bank.HARM.items():
        for cat, subjects in cats.items():
            for s in subjects:
                rows.extend(rows_for(lang, cat, s, rng))
    for lang, subjects in bank.OK.items():
        for s in subjects:
            rows.extend(rows_for(lang, "ok", s, rng))
    return rows


def build_banks() -> dict[str, list]:
    """Every bank's rows, by bank (the unit of leave-one-bank-out cross-validation, ``crossval.py``). The order of
    the random draws is the one the files were first made with, so ``heldout.tsv`` and ``fresh.tsv`` do not move."""
    rng = random.Random(29)
    first = []
    for lang, cats in HARM.items():
        for cat, subjects in cats.items():
            for s in subjects:
                first.extend(rows_for(lang, cat, s, rng))
    for lang, subjects in OK.items():
        for s in subjects:
            first.extend(rows_for(lang, "ok", s, rng))
    for lang, subjects in ABUSE_EXTRA.items():
        for s in subjects:
            first.extend(rows_for(lang, "abuse", s, rng))
    banks = {"bank": first, "heldout_bank": _bank_rows(heldout_bank, rng),
             "heldout_bank3": _bank_rows(heldout_bank3, rng)}
    for lang, (subjects, places, styles) in ORDINARY_PARTS.items():
        combos = [(s, p, st) for s in subjects for p in places for st in styles]
        for s, p, st in rng.sample(combos, min(len(combos), 240 if lang == "en" else 30)):
            text = f"{p}{s}" if lang == "ja" else f"{s} {p}{st}"
            first.append((text, "ok", lang, "synthetic"))
    for lang, (subjects, places, styles) in ORDINARY_PARTS.items():  # word salad: short, odd, ordinary
        words = " ".join([*subjects, *places, *styles]).replace(",", " ").split()
        words += ["red", "blue", "green", "photo", "painting", "square", "circle", "triangle", "large", "small", "the",
                  "of", "a", "on", "with", "hat", "tree", "house", "background", "bird", "boat", "sky", "cat", "dog"]
        for _ in range(500 if lang == "en" else 25):
            first.append((" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))), "ok", lang, "salad"))
    legacy = (Path(__file__).parent / "legacy_abuse.tsv").read_text(encoding="utf-8").splitlines()
    for line in legacy:  # the earlier classifier's training set: abuse and ordinary
        if line.strip() and not line.startswith("#"):
            label, text = line.split("\t", 1)
            first.append((text, "abuse" if label == "1" else "ok", "en", "legacy"))
    for split, (module, _, trains) in FRESH.items():
        if trains:
            banks[module] = build_fresh(split)
    banks["compose"] = _bank_rows(compose, random.Random(2030))  # its own seed: the others do not move
    return banks


def build() -> tuple[list, list]:
    """(training rows: every bank; ``heldout.tsv``'s rows: ``heldout_bank3``, kept as it was first measured)."""
    banks = build_banks()
    return [row for rows in banks.values() for row in rows], banks["heldout_bank3"]


# the banks written by other authors, each measured once on the finished filter of its day (bench/RESULTS.md): split
# → (module, its own seed, so the other files do not move; whether it also trains the filter: every one since the
# round after it was measured, but the latest, which nothing else may read)
FRESH = {
    "fresh": ("fresh_bank", 4, True),
    "fresh2": ("fresh_bank2", 5, True),  # training data from round 3 on
    "fresh3": ("fresh_bank3", 6, True),  # from round 4 on
    "fresh4": ("fresh_bank4", 7, True),  # from round 5 on
    "fresh5": ("fresh_bank5", 8, True),  # from round 6 on
    "fresh6": ("fresh_bank6", 9, True),  # from round 7 on
    "fresh7": ("fresh_bank7", 10, True),  # from round 8 on
    "fresh8": ("fresh_bank8", 11, True),  # from round 9 on
    "fresh9": ("fresh_bank9", 12, True),  # from round 10 on
}


def build_fresh(split: str = "fresh") -> list:
    """``<split>.tsv``'s rows: its bank framed and tricked with its own seed."""
    module, seed, _ = FRESH[split]
    return _bank_rows(importlib.import_module(module), random.Random(seed))


def write(path: Path, rows: list) -> None:
    lines = ["# text\texpected\tlanguage\ttrick  (generated by generate.py from bank.py; do not edit by hand)"]
    for text, expected, lang, name in rows:
        assert "\t" not in text and "\n" not in text
        lines.append(f"{text}\t{expected}\t{lang}\t{name}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).parent
    train, heldout = build()
    write(here / "train.tsv", train)
    write(here / "heldout.tsv", heldout)
    counts = {"train": len(train), "held-out": len(heldout)}
    for split in FRESH:
        rows = build_fresh(split)
        write(here / f"{split}.tsv", rows)
        counts[split] = len(rows)
    print(", ".join(f"{name} {n} rows" for name, n in counts.items()))
