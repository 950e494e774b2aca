"""Writes ``train.tsv`` (every bank: ``bank.py``, ``heldout_bank.py``, ``heldout_bank3.py``, ``fresh_bank.py``,
``fresh_bank2.py``, ``fresh_bank3.py`` and the compositional ``compose.py``), ``heldout.tsv`` (``heldout_bank3.py``),
``fresh.tsv`` (``fresh_bank.py``), ``fresh2.tsv`` (``fresh_bank2.py``) and ``fresh3.tsv`` (``fresh_bank3.py``): text,
expected, language, trick. The last four were each measured once as held-out sets and now also train the filter
(issue #29; fresh2 since round 3, fresh3 since round 4); ``crossval.py`` leaves one bank out at a time instead.

Run from the repository root: ``python tests/bot/data/filter_eval/generate.py``. Deterministic (fixed seeds). Each
subject appears plainly in a frame and with evasion tricks. Every hand-written bank was written after the filter
of its day and measured once on it before its errors were read and fixed: see bench/RESULTS.md.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compose  # noqa: E402
import fresh_bank  # noqa: E402
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
    banks["fresh_bank"] = build_fresh()
    banks["fresh_bank2"] = build_fresh2()  # measured once (bench/RESULTS.md), training data from round 3 on
    banks["fresh_bank3"] = build_fresh3()  # measured once (bench/RESULTS.md), training data from round 4 on
    banks["fresh_bank4"] = build_fresh4()  # measured once (bench/RESULTS.md), training data from round 5 on
    banks["fresh_bank5"] = build_fresh5()  # measured once (bench/RESULTS.md), training data from round 6 on
    banks["fresh_bank6"] = build_fresh6()  # measured once (bench/RESULTS.md), training data from round 7 on
    banks["fresh_bank7"] = build_fresh7()  # measured once (bench/RESULTS.md), training data from round 8 on
    banks["compose"] = _bank_rows(compose, random.Random(2030))  # its own seed: the others do not move
    return banks


def build() -> tuple[list, list]:
    """(training rows: every bank; ``heldout.tsv``'s rows: ``heldout_bank3``, kept as it was first measured)."""
    banks = build_banks()
    return [row for rows in banks.values() for row in rows], banks["heldout_bank3"]


def build_fresh() -> list:
    """``fresh.tsv``: the fourth bank, after everything (its own seed, so the other files do not move)."""
    rng = random.Random(4)
    return _bank_rows(fresh_bank, rng)


def build_fresh2() -> list:
    """``fresh2.tsv``: the fifth bank (``fresh_bank2.py``), written by someone else while the filter was rebuilt and
    run once on the finished, committed filter (its own seed, so the other files do not move)."""
    import fresh_bank2  # noqa: PLC0415 - imported only here: nothing else may read it

    return _bank_rows(fresh_bank2, random.Random(5))


def build_fresh3() -> list:
    """``fresh3.tsv``: the sixth bank (``fresh_bank3.py``), written by someone else while the filter was reworked in
    round 3 and run once on the finished, committed filter (its own seed, so the other files do not move); training
    data from round 4 on."""
    import fresh_bank3  # noqa: PLC0415 - imported here like the other measured banks

    return _bank_rows(fresh_bank3, random.Random(6))


def build_fresh4() -> list:
    """``fresh4.tsv``: the seventh bank (``fresh_bank4.py``), written by someone else while the filter was reworked
    in round 4 and run once on the finished, committed filter (its own seed, so the other files do not move); training
    data from round 5 on."""
    import fresh_bank4  # noqa: PLC0415 - imported here like the other measured banks

    return _bank_rows(fresh_bank4, random.Random(7))


def build_fresh5() -> list:
    """``fresh5.tsv``: the eighth bank (``fresh_bank5.py``), written by someone else while the filter was reworked
    in round 5 and run once on the finished, committed filter (its own seed, so the other files do not move); training
    data from round 6 on."""
    import fresh_bank5  # noqa: PLC0415 - imported here like the other measured banks

    return _bank_rows(fresh_bank5, random.Random(8))


def build_fresh6() -> list:
    """``fresh6.tsv``: the ninth bank (``fresh_bank6.py``), written by someone else while the filter was reworked
    in round 6 and run once on the finished, committed filter (its own seed, so the other files do not move); training
    data from round 7 on."""
    import fresh_bank6  # noqa: PLC0415 - imported here like the other measured banks

    return _bank_rows(fresh_bank6, random.Random(9))


def build_fresh7() -> list:
    """``fresh7.tsv``: the tenth bank (``fresh_bank7.py``), written by someone else while the filter was reworked
    in round 7 and run once on the finished, committed filter (its own seed, so the other files do not move); training
    data from round 8 on."""
    import fresh_bank7  # noqa: PLC0415 - imported here like the other measured banks

    return _bank_rows(fresh_bank7, random.Random(10))


def build_fresh8() -> list:
    """``fresh8.tsv``: the eleventh bank (``fresh_bank8.py``), written by someone else while the filter was reworked
    in round 8 and run once on the finished, committed filter (its own seed, so the other files do not move)."""
    import fresh_bank8  # noqa: PLC0415 - imported only here: nothing else may read it

    return _bank_rows(fresh_bank8, random.Random(11))


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
    fresh = build_fresh()
    write(here / "fresh.tsv", fresh)
    fresh2 = build_fresh2()
    write(here / "fresh2.tsv", fresh2)
    fresh3 = build_fresh3()
    write(here / "fresh3.tsv", fresh3)
    fresh4 = build_fresh4()
    write(here / "fresh4.tsv", fresh4)
    fresh5 = build_fresh5()
    write(here / "fresh5.tsv", fresh5)
    fresh6 = build_fresh6()
    write(here / "fresh6.tsv", fresh6)
    fresh7 = build_fresh7()
    write(here / "fresh7.tsv", fresh7)
    fresh8 = build_fresh8()
    write(here / "fresh8.tsv", fresh8)
    print(f"train {len(train)} rows, held-out {len(heldout)} rows, fresh {len(fresh)} rows, fresh2 {len(fresh2)} rows, "
          f"fresh3 {len(fresh3)} rows, fresh4 {len(fresh4)} rows, fresh5 {len(fresh5)} rows, fresh6 {len(fresh6)} rows, "
          f"fresh7 {len(fresh7)} rows, fresh8 {len(fresh8)} rows")
