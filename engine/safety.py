"""CLIP concept-embedding safety checker.

The approach of Stable Diffusion's safety checker: every generated image's CLIP embedding is compared
(cosine similarity) with a set of *concept* embeddings; an image whose similarity to any concept exceeds
that concept's threshold is flagged. Scores for every concept are returned with every image so the bot,
the moderators and later training can see *why* something was flagged, not only *that* it was.

Concepts live in ``safety.json`` next to the CLIP checkpoint::

    {"concepts": [{"name": "gore", "prompts": ["a photo of gore", "bloody wounds"], "threshold": 0.22,
                   "severity": "critical"},
                  {"name": "weapon", "embedding": [...], "threshold": 0.25}],
     "adjustment": 0.0}

A concept gives either literal ``embedding`` values (already in CLIP's joint space) or ``prompts`` that
are embedded once at load time with the checkpoint's own text tower (their mean, re-normalised).
``adjustment`` shifts every threshold at once (negative = stricter), the knob operators turn. ``severity`` is
``mild`` (the default: the guild's flagged mode decides, spoiler or withhold) or ``critical`` (always withheld until a
moderator approves it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class SafetyConfigError(ValueError):
    """``safety.json`` is malformed."""


SEVERITIES = ("mild", "critical")


@dataclass(frozen=True)
class SafetyVerdict:
    scores: dict[str, float]  # concept name → cosine similarity
    flagged: bool
    concepts: tuple[str, ...]  # the concepts over their thresholds
    critical: bool = False  # one of them is a critical concept


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class SafetyChecker:
    """Flags images whose CLIP embedding is close to a configured concept."""

    def __init__(self, names: Sequence[str], embeddings: np.ndarray, thresholds: Sequence[float], adjustment=0.0,
                 critical: Sequence[str] = ()):
        """``critical``: the names of the critical concepts (the others are mild)."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(names) or len(thresholds) != len(names):
            raise SafetyConfigError("need one embedding and one threshold per concept")
        if set(critical) - set(names):
            raise SafetyConfigError(f"unknown critical concepts: {sorted(set(critical) - set(names))}")
        if len(set(names)) != len(names):
            raise SafetyConfigError("concept names must be unique")
        self.names = tuple(names)
        self.embeddings = _normalise(embeddings) if len(names) else embeddings
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.adjustment = float(adjustment)
        self.critical = frozenset(critical)

    @classmethod
    def disabled(cls, dim: int = 1) -> SafetyChecker:
        """A checker with no concepts: every image passes with empty scores."""
        return cls((), np.zeros((0, dim), np.float32), ())

    @classmethod
    def from_file(
        cls, path: str | Path, embed_texts: Callable[[list[str]], np.ndarray] | None = None
    ) -> SafetyChecker:
        """Read ``safety.json``; ``embed_texts`` (texts → (N, D) CLIP text embeddings) embeds prompt concepts."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SafetyConfigError(f"{path}: cannot read safety config ({exc})") from exc
        concepts = raw.get("concepts")
        if not isinstance(concepts, list):
            raise SafetyConfigError(f"{path}: 'concepts' must be a list")
        names, embeddings, thresholds, critical = [], [], [], []
        for i, concept in enumerate(concepts):
            where = f"{path}: concept #{i}"
            if not isinstance(concept, dict) or not isinstance(concept.get("name"), str):
                raise SafetyConfigError(f"{where}: needs a 'name'")
            try:
                threshold = float(concept["threshold"])
            except (KeyError, TypeError, ValueError):
                raise SafetyConfigError(f"{where} ({concept['name']}): needs a numeric 'threshold'") from None
            if "embedding" in concept:
                emb = np.asarray(concept["embedding"], dtype=np.float32)
            elif concept.get("prompts"):
                if embed_texts is None:
                    raise SafetyConfigError(f"{where} ({concept['name']}): prompt concepts need a CLIP text tower")
                emb = _normalise(np.asarray(embed_texts(list(concept["prompts"])))).mean(axis=0)
            else:
                raise SafetyConfigError(f"{where} ({concept['name']}): needs 'embedding' or 'prompts'")
            severity = concept.get("severity", "mild")
            if severity not in SEVERITIES:
                raise SafetyConfigError(f"{where} ({concept['name']}): severity must be one of {', '.join(SEVERITIES)}")
            names.append(concept["name"])
            embeddings.append(emb)
            thresholds.append(threshold)
            if severity == "critical":
                critical.append(concept["name"])
        if embeddings and len({e.shape for e in embeddings}) != 1:
            raise SafetyConfigError(f"{path}: concept embeddings have different sizes")
        matrix = np.stack(embeddings) if embeddings else np.zeros((0, 1), np.float32)
        return cls(names, matrix, thresholds, adjustment=float(raw.get("adjustment", 0.0)), critical=critical)

    def scores(self, image_embeds: np.ndarray) -> np.ndarray:
        """Cosine similarity of each image to each concept: (N, D) → (N, C)."""
        image_embeds = _normalise(image_embeds)
        if not self.names:
            return np.zeros((image_embeds.shape[0], 0), np.float32)
        if image_embeds.shape[-1] != self.embeddings.shape[-1]:
            raise SafetyConfigError(
                f"concept embeddings have size {self.embeddings.shape[-1]}, images {image_embeds.shape[-1]}"
            )
        return image_embeds @ self.embeddings.T

    def check(self, image_embeds: np.ndarray) -> list[SafetyVerdict]:
        sims = self.scores(image_embeds)
        over = sims > (self.thresholds + self.adjustment)[None, :]
        verdicts = []
        for row, hits in zip(sims, over, strict=True):
            concepts = tuple(n for n, h in zip(self.names, hits, strict=True) if h)
            verdicts.append(
                SafetyVerdict(
                    scores={n: round(float(s), 6) for n, s in zip(self.names, row, strict=True)},
                    flagged=bool(concepts),
                    concepts=concepts,
                    critical=any(n in self.critical for n in concepts),
                )
            )
        return verdicts
