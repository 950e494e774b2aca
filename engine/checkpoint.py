"""What the engine reads of a checkpoint directory besides the weights: where it is, its id, its sampling defaults.

A checkpoint is a directory with one sub-directory per model in its published layout (``dallebart/``, ``vqgan/``,
optionally ``clip/``; see :mod:`engine.pipeline`) and an optional ``checkpoint.json``::

    {"id": "...", "sampling": {"condition_scale": 3, "top_k": 8, ...}, ...}

The id names the checkpoint in every result (``GenerationResult.checkpoint_id``) and in the store; without a
``checkpoint.json`` it is the directory's name. ``sampling`` is the checkpoint's recommended sampling params,
used for every field a request leaves unset.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.api import BadRequest, SamplingParams
from engine.config import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "demo"
REQUIRED_PARTS = ("dallebart", "vqgan")


class CheckpointMissing(FileNotFoundError):
    """The checkpoint directory (or one of its parts) does not exist."""


def check_directory(directory: Path) -> None:
    """Raise :class:`CheckpointMissing`, with a hint, unless ``directory`` holds the required model parts."""
    if not directory.is_dir():
        hint = (
            "the shipped demo model is missing from this checkout (restore it with `git checkout -- "
            "engine/assets/demo`), or set CHECKPOINT_DIR / --checkpoint to a checkpoint directory (README: "
            "'Using the published weights'), or train one with "
            "`python -m training demo --out DIR --install engine/assets/demo`"
            if directory.resolve() == DEFAULT_CHECKPOINT.resolve()
            else "no such directory"
        )
        raise CheckpointMissing(f"no checkpoint at {directory}: {hint}")
    for part in REQUIRED_PARTS:
        if not (directory / part / "config.json").is_file():
            raise CheckpointMissing(f"{directory}: no {part}/config.json (is this a checkpoint directory?)")


def checkpoint_meta(directory: Path) -> dict[str, Any]:
    """The directory's ``checkpoint.json`` as a dict ({} if it is missing, or not a JSON object: logged)."""
    meta = directory / "checkpoint.json"
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("%s is not valid JSON; ignoring it", meta)
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_id_of(directory: Path) -> str:
    """The checkpoint's id: ``checkpoint.json``'s ``id``, else the directory's name."""
    value = checkpoint_meta(directory).get("id")
    return str(value) if value else directory.resolve().name


def sampling_defaults_of(directory: Path) -> SamplingParams:
    """The checkpoint's recommended sampling params (``checkpoint.json`` → ``sampling``), resolved."""
    try:
        return SamplingParams.from_json(checkpoint_meta(directory).get("sampling"), what="sampling").resolve()
    except BadRequest as exc:
        raise ConfigError(f"{directory / 'checkpoint.json'}: sampling: {exc}") from None
