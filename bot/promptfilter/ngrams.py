"""The character n-gram layer: a softmax regression over hashed character n-grams of the texts the encoder reads.

The sentence encoder reads meaning, and misreads ordinary scenes near a harmful topic ("a funeral procession",
"dying of laughter") as that topic. Character n-grams read the words themselves: the misspellings, slang and other
languages' words of the labelled prompts, and the ordinary words around them. The two err on different prompts, so
the filter multiplies their probabilities (``semantic.SemanticClassifier``). The n-grams are hashed (scikit-learn's
``HashingVectorizer``: 3–5 characters inside word boundaries, 2**18 buckets), so no vocabulary ships; the weights do,
as ``bot/assets/promptfilter/ngrams.npz``, trained with the head by ``python -m bot.promptfilter.train``.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

NGRAMS_FILE = "ngrams.npz"
NGRAM_RANGE = (3, 5)
BUCKET_BITS = 18


@functools.cache
def _vectorizer(low: int, high: int, bits: int):  # noqa: ANN202 - scikit-learn has no type hints
    from sklearn.feature_extraction.text import HashingVectorizer  # only needed when the semantic layer runs

    return HashingVectorizer(analyzer="char_wb", ngram_range=(low, high), n_features=2 ** bits,
                             alternate_sign=False, norm="l2", lowercase=True, dtype=np.float32)


@dataclass(frozen=True)
class NgramModel:
    """``probs = softmax(x @ weights + bias)``, x the texts' L2-normalised n-gram counts.

    Shapes: x ``(n, 2**bits)`` (sparse), weights ``(2**bits, classes)``, bias ``(classes,)``."""

    weights: np.ndarray  # (2**bits, classes)
    bias: np.ndarray  # (classes,)
    classes: tuple[str, ...]
    ngram_range: tuple[int, int] = NGRAM_RANGE
    bits: int = BUCKET_BITS

    def features(self, texts: Sequence[str]):  # noqa: ANN201 - a scipy sparse matrix
        return _vectorizer(*self.ngram_range, self.bits).transform(list(texts))

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), classes)`` probabilities."""
        z = np.asarray(self.features(texts) @ self.weights) + self.bias
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def to_bytes(self) -> bytes:
        """Only the buckets some training n-gram fell into are stored (the others' weights are 0)."""
        used = np.flatnonzero(np.abs(self.weights).max(axis=1) > 0).astype(np.int32)
        buf = io.BytesIO()
        np.savez_compressed(buf, rows=used, weights=self.weights[used].astype(np.float16),
                            bias=self.bias.astype(np.float32), classes=np.array(self.classes),
                            ngram_range=np.array(self.ngram_range, dtype=np.int32), bits=np.int32(self.bits))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> NgramModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            bits = int(z["bits"])
            weights = np.zeros((2 ** bits, len(z["classes"])), dtype=np.float32)
            weights[z["rows"]] = z["weights"].astype(np.float32)
            low, high = (int(v) for v in z["ngram_range"])
            return cls(weights, z["bias"], tuple(str(c) for c in z["classes"]), (low, high), bits)

    @classmethod
    @functools.cache
    def default(cls) -> NgramModel:
        return cls.from_bytes(resources.files("bot.assets.promptfilter").joinpath(NGRAMS_FILE).read_bytes())


def train_ngrams(texts: Sequence[str], labels: Sequence[str], classes: Sequence[str],
                 sample_weight: np.ndarray | None = None, c: float = 1.0, max_iter: int = 300,
                 ngram_range: tuple[int, int] = NGRAM_RANGE) -> NgramModel:
    """Multinomial logistic regression (L-BFGS, inverse L2 strength ``c``), each example weighted by
    ``sample_weight`` (the head's class-balanced weights, ``semantic.balanced_weights``; None: all 1). Deterministic.

    The defaults (3–5 characters, ``c`` 1) refused the fewest plain prompts of common words ("a tiled dog"), at about
    a point of recall less than 2–5 characters or ``c`` 10, which read "-led" as violence and "make it" as abuse
    (leave-one-bank-out, fresh7 and fresh8; bench/RESULTS.md)."""
    from sklearn.linear_model import LogisticRegression

    index = {name: i for i, name in enumerate(classes)}
    y = np.array([index[label] for label in labels])
    model = NgramModel(np.zeros((2 ** BUCKET_BITS, len(classes)), np.float32), np.zeros(len(classes), np.float32),
                       tuple(classes), ngram_range)
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(model.features(texts), y, sample_weight=sample_weight)
    weights = np.zeros((2 ** BUCKET_BITS, len(classes)), np.float32)
    bias = np.zeros(len(classes), np.float32)
    if clf.coef_.shape[0] == 1:  # scikit-learn's binary case: one logit, for the second class, the first's at 0
        weights[:, clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:  # a class with no example keeps weight 0
        weights[:, clf.classes_] = clf.coef_.T
        bias[clf.classes_] = clf.intercept_
    return NgramModel(weights, bias, tuple(classes), ngram_range)
