"""Train the small tokenizers the demo checkpoint ships (DalleBart byte-level BPE and CLIP BPE).

Both write files in the published layouts, so :class:`engine.text.DalleBartTokenizer` and
:class:`engine.text.CLIPTokenizer` load them exactly as they load real checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.text import CLIP_BOS, CLIP_EOS, build_clip_tokenizer, read_merges

BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, as in BART


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP use for bytes, in CLIP's vocab order (printable bytes first)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, min_frequency: int = 2,
              normalizer: Callable[[str], str] | None = None) -> Path:
    """Train a byte-level BPE (specials ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4).

    ``normalizer`` (e.g. :class:`engine.text.TextNormalizer`) is applied to each text first, which is what the
    model will see when its config has ``normalize_text``. Writes ``tokenizer.json``, ``vocab.json``,
    ``merges.txt``; returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    if vocab_size < len(BART_SPECIALS) + 256:
        raise ValueError(f"vocab_size must be at least {len(BART_SPECIALS) + 256} (specials + 256 bytes)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BART_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stream = (normalizer(t) if normalizer is not None else t for t in texts)
    tok.train_from_iterator(stream, trainer=trainer)
    for i, name in enumerate(BART_SPECIALS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    # BART's framing for tools that use tokenizer.json directly (DalleBartTokenizer frames by itself)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=False,
                                                      add_prefix_space=False)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))
    return out


def train_clip_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, min_frequency: int = 2) -> Path:
    """Train a CLIP-style BPE and write HF-format ``vocab.json`` + ``merges.txt`` + ``tokenizer.json``.

    The vocabulary is laid out as CLIP's: 256 byte symbols, the same 256 with ``</w>``, one entry per merge,
    then ``<|startoftext|>`` and ``<|endoftext|>`` (the last two ids). Returns ``out_dir``.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from engine.text import CLIP_SPLIT_PATTERN, CLIPTokenizer

    base = 512 + 2
    if vocab_size < base:
        raise ValueError(f"vocab_size must be at least {base} (512 byte symbols + 2 specials)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 1024,  # the trainer's own alphabet differs from CLIP's; trim merges below
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator((CLIPTokenizer.clean(t) for t in texts), trainer=trainer)
    tmp = out / ".trained"
    tmp.mkdir(exist_ok=True)
    tok.model.save(str(tmp))
    trained = read_merges(tmp / "merges.txt")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()

    symbols = _bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    known = set(vocab_list)
    merges: list[tuple[str, str]] = []
    for a, b in trained:
        if len(vocab_list) >= vocab_size - 2:
            break
        if a not in known or b not in known or a + b in known:
            continue
        merges.append((a, b))
        vocab_list.append(a + b)
        known.add(a + b)
    vocab_list += [CLIP_BOS, CLIP_EOS]
    vocab = {s: i for i, s in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf8")
    build_clip_tokenizer(vocab, merges).save(str(out / "tokenizer.json"))
    return out
