"""Training metrics as JSON lines: one object per logged step, appended and flushed as it happens.

A run that is killed and resumed from its last checkpoint replays the steps after that checkpoint; on
resume :meth:`MetricsLog.rewind` drops the lines of those steps (and a torn last line, if the kill hit a
write) so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    """Python scalars for numpy / jax scalars; NaN and inf as strings (strict JSON has neither)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only JSONL metrics file (``path=None``: keep records in memory only)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one record (must contain ``step``); returns the record as written."""
        if "step" not in record:
            raise ValueError("a metrics record needs a 'step' key")
        clean = {str(k): _jsonable(v) for k, v in record.items()}
        if self.path is not None:
            line = json.dumps(clean, sort_keys=False)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
        return clean

    def rewind(self, step: int) -> int:
        """Keep only well-formed records with ``step <= step``; returns how many lines were dropped."""
        if self.path is None or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and int(rec.get("step", -1)) <= step:
                kept.append(line)
            else:
                dropped += 1
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        return dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL metrics file; a malformed line is an error naming its line number."""
    return list(_iter(Path(path)))


def _iter(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{no}: not a JSON line ({exc})") from exc
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{no}: expected a JSON object")
            yield rec
