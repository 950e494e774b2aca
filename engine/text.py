"""Text normaliser and tokenizers (DalleBart byte-level BPE, CLIP BPE) read from a checkpoint's files.

The normaliser reproduces DALL·E mini's caption cleaning step by step (reference notes §2.1), because the
published weights only understand text cleaned the same way: lowercase ASCII, punctuation turned into commas,
hashtags split into words, and a leading space so the first word carries the byte-level BPE ``Ġ`` marker.

One deliberate difference: CC12M ``<person>`` tags. The reference picks "a person" / "someone" / "somebody"
at random (weighted by Wikipedia counts); here a lone tag always becomes ``a person`` (the most frequent, i.e.
the mode of the reference distribution), so the same prompt always gives the same tokens.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WIKI_WORDS_FILENAME = "enwiki-words-frequency.txt"

# Placeholder that survives the punctuation passes (letters only, so no regex below touches it).
_MARK = "qqzmarkqq"
_DOT, _APOS, _SLASH = f"{_MARK}dot{_MARK}", f"{_MARK}apos{_MARK}", f"{_MARK}slash{_MARK}"

_RE_PERSON_GROUP = re.compile(r"<person>([,\s]*(and)*[,\s]*<person>)+")
_RE_WIKI_HEAD = re.compile(r"\A\s*\[\d+\]")
_RE_WIKI_TAIL = re.compile(r"\[\d+\]\s*\Z")
_RE_HTML_TAG = re.compile(r"<[^<]+?>")
_RE_URL = re.compile(r"http\S+")
_RE_THOUSANDS = re.compile(r"(\d),(\d{3})")
_RE_INNER_DOT = re.compile(r"(\w)\.(\w)")
_RE_CONTRACTION = re.compile(r"'(?=(?:s|t|d|m|ll|re|ve)\b)")
_RE_NUM_SLASH = re.compile(r"(\d)/(\d)")
_RE_WORD_DASH = re.compile(r"(\w)-(\w)")
_RE_SPACED_SYMBOLS = re.compile(r"([%&/$*])")
_RE_HASHTAG = re.compile(r"#(\w+)")
_RE_IGNORED = re.compile(r"[_#\\]")
_RE_QUOTES = re.compile(r"['\"`]")
_RE_PUNCT = re.compile(r"[()\[\].,|:;?!=+~\-/{}]")
_RE_REPEATS = re.compile(r"(\D)\1{3,}")
_RE_QUOTE_RUN = re.compile(r'(\s*"+\s*)+')
_RE_COMMA_RUN = re.compile(r"(\s*,+\s*)+")
_RE_SPACES = re.compile(r"\s+")
_RE_HASHTAG_PARTS = re.compile(r"[^a-zA-Z0-9']+")


class WordSplitter:
    """Splits a run of letters without spaces into words (``"redcar"`` → ``["red", "car"]``).

    Dynamic programming over a word list ranked by frequency: a word of rank r costs log(r + 1), an unknown
    substring costs infinity; the split of least total cost wins (ties: the shortest last word, as the
    reference's ``min`` over (cost, length) pairs). After the split, a trailing ``'s`` and runs of digits are
    glued back to the piece before them.
    """

    def __init__(self, words: Sequence[str]):
        if not words:
            raise ValueError("WordSplitter needs a non-empty word list")
        self._cost: dict[str, float] = {}
        for rank, word in enumerate(words):
            self._cost[word] = math.log(rank + 1.0)  # a repeated word keeps its last rank, as the reference
        self._longest = max(len(w) for w in self._cost)

    @classmethod
    def from_file(cls, path: str | Path) -> WordSplitter:
        """Read ``enwiki-words-frequency.txt`` (one ``word count`` per line, most frequent first)."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf8").splitlines()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"word-frequency list not found: {path}") from exc
        words = [line.split()[0] for line in lines if line.strip()]
        if not words:
            raise ValueError(f"word-frequency list {path} is empty")
        return cls(words)

    def __call__(self, text: str) -> str:
        pieces: list[str] = []
        for chunk in _RE_HASHTAG_PARTS.split(text):
            pieces.extend(self._split(chunk))
        return " ".join(pieces)

    def _best(self, s: str, best_cost: list[float], end: int) -> tuple[float, int]:
        """Cheapest (total cost, last-word length) for the prefix ``s[:end]``."""
        best: tuple[float, int] | None = None
        lo = max(0, end - self._longest)
        for start in range(end - 1, lo - 1, -1):
            length = end - start
            cand = (best_cost[start] + self._cost.get(s[start:end].lower(), math.inf), length)
            if best is None or cand < best:
                best = cand
        assert best is not None
        return best

    def _split(self, s: str) -> list[str]:
        best_cost = [0.0]
        for end in range(1, len(s) + 1):
            best_cost.append(self._best(s, best_cost, end)[0])
        rev: list[str] = []  # words from last to first
        end = len(s)
        while end > 0:
            _, length = self._best(s, best_cost, end)
            piece = s[end - length : end]
            glue = piece != "'" and bool(rev) and (rev[-1] == "'s" or (s[end - 1].isdigit() and rev[-1][0].isdigit()))
            if glue:
                rev[-1] = piece + rev[-1]
            else:
                rev.append(piece)
            end -= length
        return rev[::-1]


class TextNormalizer:
    """DALL·E mini's caption normaliser; ``__call__(text) -> str`` always returns text with a leading space.

    One deliberate departure from the published normaliser: the transliteration to ASCII is ``anyascii`` (ISC),
    not ``unidecode`` (GPL-2.0+, which this MIT project does not depend on). Latin letters with accents, quotes,
    dashes and fractions come out the same; some symbols and other scripts differ (``×`` → ``*`` not ``x``,
    ``£`` → ``gbp`` not ``ps``, ``Ё`` → ``e`` not ``io``, ``北京`` → ``beijing`` not ``bei jing``), so such prompts may
    tokenise differently from the published model's training captions.

    ``wiki_words_path``: the ``enwiki-words-frequency.txt`` list used to split hashtags. Without it a hashtag
    just loses its ``#`` and keeps its word unsplit (``#redcar`` → ``redcar``).
    """

    def __init__(self, wiki_words_path: Path | str | None = None):
        self.splitter = WordSplitter.from_file(wiki_words_path) if wiki_words_path is not None else None

    @classmethod
    def for_checkpoint(cls, checkpoint_dir: str | Path) -> TextNormalizer:
        """Use the checkpoint's word list when it ships one."""
        path = Path(checkpoint_dir) / WIKI_WORDS_FILENAME
        return cls(path if path.is_file() else None)

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"TextNormalizer expects str, got {type(text).__name__}")
        import emoji
        import ftfy
        from anyascii import anyascii

        t = ftfy.fix_text(text)
        t = html.unescape(html.unescape(t))
        t = emoji.demojize(t)
        t = anyascii(t).lower()
        t = self._person_tags(t)
        t = _RE_WIKI_TAIL.sub("", _RE_WIKI_HEAD.sub("", t))
        t = _RE_HTML_TAG.sub("", t)
        t = _RE_URL.sub("", t)
        t = _RE_THOUSANDS.sub(r"\1\2", _RE_THOUSANDS.sub(r"\1\2", t))
        # protect the punctuation that must survive the comma pass
        t = _RE_INNER_DOT.sub(rf"\1{_DOT}\2", t)
        t = _RE_CONTRACTION.sub(_APOS, t)
        t = _RE_NUM_SLASH.sub(rf"\1{_SLASH}\2", t)
        t = _RE_WORD_DASH.sub(r"\1 \2", t)
        t = _RE_SPACED_SYMBOLS.sub(r" \1 ", t)
        t = _RE_HASHTAG.sub(self._hashtag, t)
        t = _RE_IGNORED.sub(" ", t)
        t = _RE_QUOTES.sub(' " ', t)
        t = _RE_PUNCT.sub(",", t)
        t = t.replace(_DOT, ".").replace(_APOS, "'").replace(_SLASH, "/")
        t = _RE_REPEATS.sub(r"\1", t)
        t = _RE_QUOTE_RUN.sub(' " ', t)
        t = _RE_COMMA_RUN.sub(", ", t)
        t = _RE_SPACES.sub(" ", t).strip()
        if t.endswith(","):
            t = t[:-1]
        if t.startswith(","):
            t = t[1:]
        return " " + t.strip()

    @staticmethod
    def _person_tags(t: str) -> str:
        t = _RE_PERSON_GROUP.sub(" people ", t)
        return t.replace("<person>", " a person ")

    def _hashtag(self, m: re.Match[str]) -> str:
        word = m.group(1)
        if self.splitter is None:
            return word
        # keep protected placeholders whole (the reference splits them into letters: a known wart)
        parts = re.split(f"({_DOT}|{_APOS}|{_SLASH})", word)
        return "".join(p if p.startswith(_MARK) else self.splitter(p) for p in parts if p)


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


class TokenizerError(ValueError):
    """Tokenizer files are missing or inconsistent."""


def _pack(rows: list[list[int]], max_length: int, bos: int, eos: int, pad: int) -> dict[str, np.ndarray]:
    """Frame each row as ``bos … eos`` (truncated so eos stays), pad to ``max_length``; int32 (B, max_length)."""
    ids = np.full((len(rows), max_length), pad, dtype=np.int32)
    mask = np.zeros((len(rows), max_length), dtype=np.int32)
    for b, row in enumerate(rows):
        seq = [bos, *row[: max_length - 2], eos]
        ids[b, : len(seq)] = seq
        mask[b, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"tokenizer expects str items, got {type(t).__name__}")
    return out


class DalleBartTokenizer:
    """Byte-level BPE tokenizer of a DalleBart checkpoint (BART-style ``<s> … </s>`` framing, ``<pad>`` padding).

    ``__call__(texts)`` → ``{"input_ids", "attention_mask"}``, int32 arrays of shape (B, max_length). With
    ``normalize=True`` (the checkpoint config's ``normalize_text``) every non-empty text first goes through
    :class:`TextNormalizer`; the empty string is never normalised, so ``""`` always tokenises to the
    unconditional prompt ``<s></s>`` + pads (as the reference processor precomputes it).
    """

    def __init__(self, tokenizer, *, max_length: int = 64, normalize: bool = False,
                 normalizer: TextNormalizer | None = None):
        if max_length < 2:
            raise TokenizerError("max_length must be at least 2 (room for <s> and </s>)")
        self._tok = tokenizer
        self.max_length = max_length
        self.normalize = normalize
        self.normalizer = normalizer if normalizer is not None else (TextNormalizer() if normalize else None)
        ids = {name: tokenizer.token_to_id(name) for name in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
        for name in ("<s>", "<pad>", "</s>"):
            if ids[name] is None:
                raise TokenizerError(f"tokenizer has no {name} token")
        self.bos_token_id: int = ids["<s>"]
        self.pad_token_id: int = ids["<pad>"]
        self.eos_token_id: int = ids["</s>"]
        self.unk_token_id: int | None = ids["<unk>"]
        self.mask_token_id: int | None = ids["<mask>"]

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int = 64, *, normalize: bool = False) -> DalleBartTokenizer:
        """Load ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``, from a checkpoint directory.

        With ``normalize=True`` the normaliser uses the directory's ``enwiki-words-frequency.txt`` if present.
        """
        from tokenizers import Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        path = Path(path)
        if (path / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            model = BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
            tok = Tokenizer(model)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf8"))
            tok.add_special_tokens([s for s in ("<s>", "<pad>", "</s>", "<unk>", "<mask>") if s in vocab])
        else:
            raise TokenizerError(f"{path}: no tokenizer.json and no vocab.json + merges.txt")
        normalizer = TextNormalizer.for_checkpoint(path) if normalize else None
        return cls(tok, max_length=max_length, normalize=normalize, normalizer=normalizer)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def normalized(self, text: str) -> str:
        """The text exactly as it is tokenised (normalised when enabled; ``""`` stays empty)."""
        if text == "" or not self.normalize:
            return text
        return self.normalizer(text)  # type: ignore[misc]

    def __call__(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        items = [self.normalized(t) for t in _as_list(texts)]
        encs = self._tok.encode_batch(items, add_special_tokens=False) if items else []
        return _pack([e.ids for e in encs], self.max_length, self.bos_token_id, self.eos_token_id, self.pad_token_id)

    def unconditional(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The tokenised empty prompt (``<s></s>`` + pads, mask ``[1, 1, 0, …]``) repeated ``batch`` times."""
        return _pack([[] for _ in range(batch)], self.max_length, self.bos_token_id, self.eos_token_id,
                     self.pad_token_id)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# CLIP's pre-tokenisation pattern (contractions, letter runs, single digits, punctuation runs).
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A ``tokenizers.Tokenizer`` implementing CLIP's BPE over the given vocab/merges.

    NFC + whitespace collapse + lowercase, CLIP's split regex, byte-to-unicode mapping without a prefix space,
    BPE with the ``</w>`` end-of-word suffix; unknown pieces map to ``<|endoftext|>`` as in HF's CLIP files.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    for name in (CLIP_BOS, CLIP_EOS):
        if name not in vocab:
            raise TokenizerError(f"CLIP vocab has no {name} token")
    model = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=CLIP_EOS,
                continuing_subword_prefix="", fuse_unk=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens([CLIP_BOS, CLIP_EOS])
    return tok


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """Read a ``merges.txt`` (optional ``#version`` header, one ``a b`` pair per line)."""
    merges = []
    for n, line in enumerate(Path(path).read_text(encoding="utf8").splitlines()):
        if not line.strip() or (n == 0 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{n + 1}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    """CLIP's text tokenizer: ``<|startoftext|> … <|endoftext|>``, padded with the eot id (as HF does) to 77.

    Text is pre-cleaned in Python first (``ftfy.fix_text`` and a double ``html.unescape``, like OpenAI's
    ``basic_clean``), then lowercased, whitespace-collapsed, split with CLIP's regex and BPE-encoded.
    """

    def __init__(self, tokenizer, *, max_length: int = 77):
        if max_length < 2:
            raise TokenizerError("max_length must be at least 2")
        self._tok = tokenizer
        self.max_length = max_length
        self.bos_token_id: int = tokenizer.token_to_id(CLIP_BOS)
        self.eos_token_id: int = tokenizer.token_to_id(CLIP_EOS)
        if self.bos_token_id is None or self.eos_token_id is None:
            raise TokenizerError("CLIP tokenizer lacks <|startoftext|> / <|endoftext|>")
        self.pad_token_id = self.eos_token_id

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int = 77) -> CLIPTokenizer:
        """Load HF-format ``vocab.json`` + ``merges.txt`` (preferred: they define CLIP exactly), else
        ``tokenizer.json``."""
        from tokenizers import Tokenizer

        path = Path(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf8"))
            tok = build_clip_tokenizer(vocab, read_merges(path / "merges.txt"))
        elif (path / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            raise TokenizerError(f"{path}: no vocab.json + merges.txt and no tokenizer.json")
        return cls(tok, max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def clean(text: str) -> str:
        import ftfy

        return html.unescape(html.unescape(ftfy.fix_text(text))).strip()

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(self.clean(text), add_special_tokens=False).tokens

    def __call__(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        items = [self.clean(t) for t in _as_list(texts)]
        encs = self._tok.encode_batch(items, add_special_tokens=False) if items else []
        return _pack([e.ids for e in encs], self.max_length, self.bos_token_id, self.eos_token_id, self.pad_token_id)
