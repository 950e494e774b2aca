"""The feedback dataset: what users and moderators said about generated images, as preference data for
fine-tuning on the exact image tokens the model sampled.

Source: ``store`` (:meth:`store.repository.Repository.dataset_source`), which already leaves out everything by or
about users who opted out (``/dalle-privacy optout``). Each judged image becomes an example:

- an image a moderator **removed** is *undesirable* with weight ``REMOVED_WEIGHT``, whatever its votes;
- otherwise its score is 👍 − 👎 − reports, where reports do not count once a moderator approved or dismissed the
  image's case (they were judged unfounded); above 0 it is *desirable*, below 0 *undesirable*, with weight
  ``min(|score|, MAX_WEIGHT)``; at 0 it says nothing and is left out (counted as ``unlabelled``).

Images with the same prompt (normalised) and the same tokens are one example (their votes, reports and decisions
added up): a seed repeated, or a result posted twice, must not count twice. Every example lands in the ``train``
or the ``eval`` split by a hash of its normalised prompt, so a prompt is never in both and the split of a prompt
never changes between exports.

Written to ``--out``:

- ``unpaired.parquet`` (KTO): ``example_id, prompt, normalized_prompt, tokens (list<int16>), label
  ("desirable"/"undesirable"), desirable, weight, up, down, reports, report_reasons, down_reasons (the reasons
  given with 👎 votes, e.g. ``bias``), removed, image_ids, checkpoint_ids, split``;
- ``pairs.parquet`` (DPO): each desirable example of a prompt against each undesirable one of the same prompt
  (at most ``max_pairs_per_prompt``, strongest first): ``prompt, normalized_prompt, chosen_example_id,
  rejected_example_id, chosen_tokens, rejected_tokens, chosen_checkpoint_ids, rejected_checkpoint_ids,
  same_checkpoint, weight (the smaller of the two), split``;
- ``manifest.json``: counts, split sizes, the source database (password masked), the model ids the examples came
  from, when it was made, and a SHA-256 of the rows' content (the same data gives the same hash).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from store.models import CaseStatus
from store.repository import DatasetSource, JudgedImage

FORMAT_VERSION = 1
REMOVED_WEIGHT = 3.0
MAX_WEIGHT = 3.0
DEFAULT_HOLDOUT = 0.1
DEFAULT_MAX_PAIRS = 32
DESIRABLE, UNDESIRABLE = "desirable", "undesirable"
#: decisions after which the image's reports no longer count against it
CLEARED = frozenset({CaseStatus.APPROVED.value, CaseStatus.DISMISSED.value})


def split_of(normalized_prompt: str, holdout: float = DEFAULT_HOLDOUT) -> str:
    """``"eval"`` for about ``holdout`` of all prompts, ``"train"`` for the rest: a pure function of the prompt."""
    digest = hashlib.sha256(normalized_prompt.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < holdout else "train"


def label_of(up: int, down: int, reports: int, decisions: tuple[str, ...] | list[str]) -> tuple[str | None, float]:
    """(label, weight) of an image's judgements (see the module's note); label None: no preference either way."""
    if CaseStatus.REMOVED.value in decisions:
        return UNDESIRABLE, REMOVED_WEIGHT
    score = up - down - (0 if CLEARED & set(decisions) else reports)
    if score == 0:
        return None, 0.0
    return (DESIRABLE if score > 0 else UNDESIRABLE), float(min(abs(score), MAX_WEIGHT))


@dataclass
class Example:
    """One deduplicated judged image."""

    example_id: str
    prompt: str
    normalized_prompt: str
    tokens: np.ndarray
    image_ids: list[int] = field(default_factory=list)
    checkpoint_ids: list[str] = field(default_factory=list)
    up: int = 0
    down: int = 0
    report_reasons: list[str] = field(default_factory=list)
    down_reasons: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    label: str | None = None
    weight: float = 0.0
    split: str = "train"

    def add(self, image: JudgedImage) -> None:
        self.image_ids.append(image.image_id)
        if image.checkpoint_id is not None and image.checkpoint_id not in self.checkpoint_ids:
            self.checkpoint_ids.append(image.checkpoint_id)
        self.up += image.up
        self.down += image.down
        self.report_reasons += image.report_reasons
        self.down_reasons += image.down_reasons
        self.decisions += image.decisions


@dataclass
class FeedbackDataset:
    unpaired: list[Example]  # labelled examples, by split, prompt, first image id
    pairs: list[tuple[Example, Example, float]]  # (chosen, rejected, weight)
    counts: dict[str, int]
    holdout: float


def _key(image: JudgedImage) -> str:
    h = hashlib.sha256(image.normalized_prompt.encode("utf-8") + b"\0")
    h.update(np.asarray(image.tokens, dtype="<i2").tobytes())
    return h.hexdigest()[:24]


def build_dataset(source: DatasetSource, *, holdout: float = DEFAULT_HOLDOUT,
                  max_pairs_per_prompt: int = DEFAULT_MAX_PAIRS) -> FeedbackDataset:
    """Label, deduplicate, split and pair the judged images (pure: no database, no files)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1); got {holdout}")
    if max_pairs_per_prompt < 0:
        raise ValueError(f"max_pairs_per_prompt must be >= 0; got {max_pairs_per_prompt}")
    merged: dict[str, Example] = {}
    for image in sorted(source.images, key=lambda i: i.image_id):
        key = _key(image)
        if key not in merged:
            merged[key] = Example(key, image.prompt, image.normalized_prompt, np.asarray(image.tokens, np.int16))
        merged[key].add(image)
    labelled = []
    for ex in merged.values():
        ex.label, ex.weight = label_of(ex.up, ex.down, len(ex.report_reasons), ex.decisions)
        ex.split = split_of(ex.normalized_prompt, holdout)
        if ex.label is not None:
            labelled.append(ex)
    labelled.sort(key=lambda e: (e.split, e.normalized_prompt, e.image_ids[0]))

    pairs = []
    by_prompt: dict[str, list[Example]] = defaultdict(list)
    for ex in labelled:
        by_prompt[ex.normalized_prompt].append(ex)
    for examples in by_prompt.values():
        strongest = sorted(examples, key=lambda e: (-e.weight, e.image_ids[0]))
        chosen = [e for e in strongest if e.label == DESIRABLE]
        rejected = [e for e in strongest if e.label == UNDESIRABLE]
        for c, r in itertools.islice(itertools.product(chosen, rejected), max_pairs_per_prompt):
            pairs.append((c, r, min(c.weight, r.weight)))

    counts = {
        "judged_images": len(source.images),
        "duplicates_merged": len(source.images) - len(merged),
        "examples": len(labelled),
        "desirable": sum(e.label == DESIRABLE for e in labelled),
        "undesirable": sum(e.label == UNDESIRABLE for e in labelled),
        "removed_negatives": sum(CaseStatus.REMOVED.value in e.decisions for e in labelled),
        "unlabelled": len(merged) - len(labelled),
        "pairs": len(pairs),
        "opted_out_images": source.opted_out_images,
        "opted_out_feedback": source.opted_out_feedback,
    }
    return FeedbackDataset(labelled, pairs, counts, holdout)


def unpaired_rows(ds: FeedbackDataset) -> list[dict[str, Any]]:
    return [{"example_id": e.example_id, "prompt": e.prompt, "normalized_prompt": e.normalized_prompt,
             "tokens": e.tokens.tolist(), "label": e.label, "desirable": e.label == DESIRABLE, "weight": e.weight,
             "up": e.up, "down": e.down, "reports": len(e.report_reasons), "report_reasons": list(e.report_reasons),
             "down_reasons": list(e.down_reasons), "removed": CaseStatus.REMOVED.value in e.decisions,
             "image_ids": list(e.image_ids), "checkpoint_ids": list(e.checkpoint_ids), "split": e.split}
            for e in ds.unpaired]


def pair_rows(ds: FeedbackDataset) -> list[dict[str, Any]]:
    return [{"prompt": c.prompt, "normalized_prompt": c.normalized_prompt, "chosen_example_id": c.example_id,
             "rejected_example_id": r.example_id, "chosen_tokens": c.tokens.tolist(),
             "rejected_tokens": r.tokens.tolist(), "chosen_checkpoint_ids": list(c.checkpoint_ids),
             "rejected_checkpoint_ids": list(r.checkpoint_ids),
             "same_checkpoint": bool(set(c.checkpoint_ids) & set(r.checkpoint_ids)), "weight": w, "split": c.split}
            for c, r, w in ds.pairs]


def _schemas() -> tuple[Any, Any]:
    import pyarrow as pa

    tokens = pa.list_(pa.int16())
    unpaired = pa.schema([
        ("example_id", pa.string()), ("prompt", pa.string()), ("normalized_prompt", pa.string()), ("tokens", tokens),
        ("label", pa.string()), ("desirable", pa.bool_()), ("weight", pa.float32()), ("up", pa.int32()),
        ("down", pa.int32()), ("reports", pa.int32()), ("report_reasons", pa.list_(pa.string())),
        ("down_reasons", pa.list_(pa.string())), ("removed", pa.bool_()), ("image_ids", pa.list_(pa.int64())),
        ("checkpoint_ids", pa.list_(pa.string())), ("split", pa.string())])
    pairs = pa.schema([
        ("prompt", pa.string()), ("normalized_prompt", pa.string()), ("chosen_example_id", pa.string()),
        ("rejected_example_id", pa.string()), ("chosen_tokens", tokens), ("rejected_tokens", tokens),
        ("chosen_checkpoint_ids", pa.list_(pa.string())), ("rejected_checkpoint_ids", pa.list_(pa.string())),
        ("same_checkpoint", pa.bool_()), ("weight", pa.float32()), ("split", pa.string())])
    return unpaired, pairs


def content_hash(unpaired: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> str:
    """SHA-256 of the rows as canonical JSON: independent of Parquet's encoding and of when it was made."""
    h = hashlib.sha256()
    for name, rows in (("unpaired", unpaired), ("pairs", pairs)):
        h.update(name.encode())
        for row in rows:
            h.update(json.dumps(row, sort_keys=True, separators=(",", ":")).encode("utf-8") + b"\n")
    return h.hexdigest()


def write_dataset(ds: FeedbackDataset, out: Path, *, source: str, created_at: datetime | None = None) -> dict:
    """Write the Parquet files and ``manifest.json`` into ``out`` (each file replaced whole, the manifest last, so
    a reader never sees a manifest describing other files). ``source``: the database URL, password masked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    unpaired, pairs = unpaired_rows(ds), pair_rows(ds)
    schemas = _schemas()
    for name, rows, schema in (("unpaired.parquet", unpaired, schemas[0]), ("pairs.parquet", pairs, schemas[1])):
        tmp = out / f".{name}.partial"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        os.replace(tmp, out / name)
    checkpoints = Counter(c for e in ds.unpaired for c in (e.checkpoint_ids or ["unknown"]))
    manifest = {
        "format": "dalle-bot feedback dataset",
        "version": FORMAT_VERSION,
        "created_at": (created_at or datetime.now(UTC)).isoformat(timespec="seconds"),
        "source": source,
        "files": {"unpaired": "unpaired.parquet", "pairs": "pairs.parquet"},
        "counts": ds.counts,
        "splits": {
            "by": "sha256 of the normalised prompt", "holdout": ds.holdout,
            "unpaired": {s: sum(r["split"] == s for r in unpaired) for s in ("train", "eval")},
            "pairs": {s: sum(r["split"] == s for r in pairs) for s in ("train", "eval")},
        },
        "checkpoint_ids": dict(sorted(checkpoints.items())),
        "labels": {"removed_weight": REMOVED_WEIGHT, "max_weight": MAX_WEIGHT},
        "content_sha256": content_hash(unpaired, pairs),
    }
    tmp = out / ".manifest.json.partial"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


async def export_feedback(repo: Any, out: Path, *, source: str, holdout: float = DEFAULT_HOLDOUT,
                          max_pairs_per_prompt: int = DEFAULT_MAX_PAIRS) -> dict:
    """Read the store through ``repo`` (a ``store.repository.Repository``), build and write the dataset; returns
    the manifest."""
    import asyncio

    ds = build_dataset(await repo.dataset_source(), holdout=holdout, max_pairs_per_prompt=max_pairs_per_prompt)
    return await asyncio.to_thread(write_dataset, ds, out, source=source)


def export_from_url(database_url: str, out: Path, *, holdout: float = DEFAULT_HOLDOUT,
                    max_pairs_per_prompt: int = DEFAULT_MAX_PAIRS) -> dict:
    """The CLI's entry: the database must be at the code's schema (it is only read, never migrated here)."""
    import asyncio

    from store.db import DatabaseUnavailable, MigrationRequired, ensure_migrated, parse_url, redact_url
    from store.repository import Repository

    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1); got {holdout}")
    parsed = parse_url(database_url)  # DatabaseURLError is a ValueError
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).is_file():  # opening it would create an empty one
        raise ValueError(f"no database file at {parsed.database}")
    try:
        ensure_migrated(database_url, auto=False)
    except (MigrationRequired, DatabaseUnavailable) as exc:
        raise ValueError(str(exc)) from None

    async def run() -> dict:
        repo = Repository.from_url(database_url)
        try:
            return await export_feedback(repo, out, source=redact_url(database_url), holdout=holdout,
                                         max_pairs_per_prompt=max_pairs_per_prompt)
        finally:
            await repo.close()

    return asyncio.run(run())
