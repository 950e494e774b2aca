"""Calibrating the safety concepts' thresholds on a labelled image set (``python -m engine calibrate-safety``).

A concept is text (``prompts``), embedded by the checkpoint's own CLIP text tower; what a threshold means depends on
that CLIP, so thresholds are measured, not copied: for each concept, the threshold is the lowest cosine similarity
that flags at most ``max_false_positives`` of the images labelled ``ok``, and the report gives the recall it reaches
on the images labelled with that concept. The labelled set is a folder::

    labelled/ok/*.png              images that must pass (ordinary pictures, the hard ones included)
    labelled/<concept name>/*.png  images of that concept

The concepts file is ``safety.json``'s format without the thresholds (``engine/assets/safety/concepts.json`` is the
list for the published CLIP). The output is a complete ``safety.json`` to put in the checkpoint directory, with the
calibration figures recorded next to each threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine.safety import SEVERITIES, SafetyConfigError

log = logging.getLogger(__name__)

OK_LABEL = "ok"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ConceptCalibration:
    name: str
    threshold: float
    false_positive_rate: float  # on the ok images
    recall: float | None  # on the concept's own images (None: the set has none)
    positives: int


def concept_embedding(prompts: Sequence[str], embed_texts: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """The mean of the prompts' text embeddings, re-normalised (as :class:`engine.safety.SafetyChecker` does)."""
    emb = np.asarray(embed_texts(list(prompts)), np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    mean = emb.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def threshold_for(ok_scores: np.ndarray, max_false_positives: float) -> float:
    """The lowest threshold (a score must be *above* it to flag) with at most ``max_false_positives`` of the ok
    scores above it."""
    scores = np.sort(np.asarray(ok_scores, np.float64))[::-1]  # highest first
    allowed = int(np.floor(max_false_positives * len(scores)))
    return float(scores[allowed]) if allowed < len(scores) else float(scores[-1]) - 1e-6


def calibrate(concepts: Sequence[dict[str, Any]], ok_embeds: np.ndarray, positives: dict[str, np.ndarray],
              embed_texts: Callable[[list[str]], np.ndarray], max_false_positives: float
              ) -> tuple[dict[str, Any], list[ConceptCalibration]]:
    """Thresholds for ``concepts`` from image embeddings: ``ok_embeds`` (N, D) must pass, ``positives[name]`` are
    that concept's images. Returns the ``safety.json`` content and one :class:`ConceptCalibration` per concept."""
    if not 0.0 <= max_false_positives < 1.0:
        raise ValueError("max_false_positives must be in [0, 1)")
    if len(ok_embeds) == 0:
        raise ValueError("the labelled set has no 'ok' images: a threshold needs images that must pass")
    out, report = [], []
    for concept in concepts:
        name, prompts = concept.get("name"), concept.get("prompts")
        if not isinstance(name, str) or not prompts:
            raise SafetyConfigError(f"concept {concept!r} needs a 'name' and 'prompts'")
        severity = concept.get("severity", "mild")
        if severity not in SEVERITIES:
            raise SafetyConfigError(f"{name}: severity must be one of {', '.join(SEVERITIES)}")
        direction = concept_embedding(prompts, embed_texts)
        ok_scores = ok_embeds @ direction
        threshold = threshold_for(ok_scores, max_false_positives)
        pos = positives.get(name)
        recall = float(np.mean(pos @ direction > threshold)) if pos is not None and len(pos) else None
        fpr = float(np.mean(ok_scores > threshold))
        report.append(ConceptCalibration(name, threshold, fpr, recall, 0 if pos is None else len(pos)))
        out.append({"name": name, "prompts": list(prompts), "severity": severity, "threshold": threshold,
                    "calibration": {"ok_images": int(len(ok_embeds)), "concept_images": report[-1].positives,
                                    "false_positive_rate": round(fpr, 4),
                                    "recall": None if recall is None else round(recall, 4)}})
    config = {"note": f"Thresholds calibrated by `python -m engine calibrate-safety` on "
                      f"{datetime.now(UTC).strftime('%Y-%m-%d')} (at most {max_false_positives:.1%} false positives "
                      "on the ok images).",
              "concepts": out, "adjustment": 0.0}
    return config, report


def read_labelled(root: str | Path, image_size: int) -> dict[str, np.ndarray]:
    """``root/<label>/*.png`` → label → (N, S, S, 3) float images in [0, 1], resized to ``image_size``."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory of labelled image folders")
    sets: dict[str, np.ndarray] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images = []
        for path in files:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB").resize((image_size, image_size)), np.float32) / 255.0)
        if images:
            sets[folder.name] = np.stack(images)
    return sets


def embed_in_batches(embed_images: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int = 16
                     ) -> np.ndarray:
    return np.concatenate([embed_images(images[i: i + batch]) for i in range(0, len(images), batch)])


def cmd_calibrate(args: argparse.Namespace) -> int:
    from engine.pipeline import load_pipeline

    concepts = json.loads(Path(args.concepts).read_text())["concepts"]
    pipeline = load_pipeline(args.checkpoint)
    if pipeline.clip_config is None:
        print(f"error: {args.checkpoint} has no clip/ part to calibrate with")
        return 2
    sets = read_labelled(args.images, pipeline.clip_config.vision_config.image_size)
    if OK_LABEL not in sets:
        print(f"error: {args.images} has no '{OK_LABEL}' folder of images that must pass")
        return 2
    known = {c["name"] for c in concepts}
    unknown = sorted(set(sets) - known - {OK_LABEL})
    if unknown:
        print(f"error: folders {unknown} name no concept of {args.concepts}")
        return 2
    embeds = {label: embed_in_batches(pipeline.embed_images, images) for label, images in sets.items()}
    ok = embeds.pop(OK_LABEL)
    config, report = calibrate(concepts, ok, embeds, pipeline.embed_texts, args.max_false_positives)
    Path(args.out).write_text(json.dumps(config, indent=2) + "\n")
    print(f"{'concept':28} {'threshold':>9} {'false pos':>9} {'recall':>7} {'images':>6}")
    for c in report:
        recall = "-" if c.recall is None else f"{c.recall:.1%}"
        print(f"{c.name:28} {c.threshold:9.4f} {c.false_positive_rate:9.1%} {recall:>7} {c.positives:6d}")
    print(f"wrote {args.out} ({len(ok)} ok images)")
    return 0


def add_calibrate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "calibrate-safety",
        help="set the safety concepts' thresholds on a labelled image set",
        description="Embed the concepts with the checkpoint's CLIP text tower and the labelled images with its image "
                    "tower; each threshold flags at most --max-false-positives of the ok images. Writes safety.json.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (its clip/ part is used)")
    p.add_argument("--concepts", type=Path, required=True,
                   help="concepts without thresholds (e.g. engine/assets/safety/concepts.json)")
    p.add_argument("--images", type=Path, required=True, help="labelled folders: ok/ and one per concept name")
    p.add_argument("--max-false-positives", type=float, default=0.01,
                   help="share of ok images a concept may flag (default 0.01)")
    p.add_argument("--out", type=Path, required=True, help="where to write safety.json")
    p.set_defaults(func=cmd_calibrate)
