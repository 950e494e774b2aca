"""Made-up words in front of training captions, so unfamiliar framing words carry nothing (both trainers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class PrefixNoise:
    """Wrap a batch source: with probability ``prob`` a captioned row gets 1..``max_words`` made-up words put in
    front of its caption (right after the start token).

    Why: the shapes captions use four framing wrappers ("a picture of …"), so a model trained on them alone
    has never seen a caption open any other way, and it draws nothing sensible for "an illustration of …" or
    "a photo of …" (evaluation: 1 prompt in 6 of the held-out templates had any right candidate). A word the
    tokenizer never saw in training falls apart into letter-sized tokens, so the made-up words (random
    letters, 2-10 long, tokenised as the tokenizer does it) look to the encoder exactly like such framing,
    while the image stays the caption's: the encoder learns that unfamiliar words in front carry nothing. No
    held-out wrapper is spelled out. Blank (unconditional) rows stay blank; a row keeps its end token (the noise
    is cut to the padding there is). The draw for batch ``k`` comes from ``(seed, k)`` (resume-safe).

    Any tokenizer whose rows are ``[start] tokens [end] padding`` with an ``attention_mask`` works: the
    DalleBart's (``<s> … </s>``) and the CLIP's (``<|startoftext|> … <|endoftext|>``; CLIP pools at the end
    token, the largest id, which made-up letters never reach). The same wording failure hits the ranker: a CLIP
    that never saw "an illustration of" scores those prompts worse than for the bare caption.
    """

    POOL = 1024  # made-up words tokenised once

    def __init__(self, source: Any, prob: float, tokenizer: Callable[[list[str]], dict[str, np.ndarray]], *,
                 max_words: int = 3, seed: int = 0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prefix noise probability must be in [0, 1], got {prob}")
        if max_words < 1:
            raise ValueError(f"prefix noise needs max_words >= 1, got {max_words}")
        rng = np.random.default_rng([seed, 0x7E57])
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, size=int(n))) for n in rng.integers(2, 11, size=self.POOL)]
        enc = tokenizer(words)
        lengths = enc["attention_mask"].sum(axis=1)
        self.pool = [row[1: int(m) - 1] for row, m in zip(enc["input_ids"], lengths, strict=True)]
        self.source, self.prob, self.max_words, self.seed = source, prob, max_words, seed

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        batch = dict(self.source[k])
        if self.prob <= 0:
            return batch
        rng = np.random.default_rng([self.seed, int(k), 0x9E1F])
        ids, mask = batch["input_ids"].copy(), batch["attention_mask"].copy()
        lengths = mask.sum(axis=1)
        chosen = rng.random(len(ids)) < self.prob
        n_words = rng.integers(1, self.max_words + 1, size=len(ids))
        for row in np.flatnonzero(chosen & (lengths > 2)):  # length 2 is <s></s>: a blank caption
            picks = rng.integers(len(self.pool), size=n_words[row])
            length = int(lengths[row])
            noise = np.concatenate([self.pool[j] for j in picks])[: ids.shape[1] - length]
            n = len(noise)
            if n == 0:
                continue
            ids[row, 1 + n: length + n] = ids[row, 1:length]
            ids[row, 1: 1 + n] = noise
            mask[row, :length + n] = 1
        batch["input_ids"], batch["attention_mask"] = ids, mask
        return batch
