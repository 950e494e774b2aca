"""Request, progress and result types shared by the pipeline, the batcher, the server, the clients and the bot.

They are plain dataclasses with ``to_json``/``from_json`` helpers so the same objects cross the HTTP boundary
(engine service ⇄ ``HttpEngine``) and the in-process boundary (``InProcessEngine``) unchanged.

Reproducibility contract: candidate ``i`` of a request with seed ``s`` is sampled from a random stream
derived from ``(s, i)`` alone, so a request gives the same images whether it was sampled alone, batched
with other requests, or spread over several devices.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

GRID_IMAGES = 9  # candidates a request asks for unless it says otherwise: a 3x3 grid
MAX_IMAGES_PER_REQUEST = 16
MAX_PROMPT_CHARS = 1000
SEED_LIMIT = 2**63  # seeds are 0 <= seed < SEED_LIMIT (the sampler's 64-bit random key)
# bounds of an image-token prefix any model could take (the published VQGAN's codebook and Mega's 256 tokens, with
# room); the pipeline checks the model's own, smaller ones (:func:`check_image_prefix`)
MAX_IMAGE_CODES = 16384
MAX_IMAGE_PREFIX = 4096


# Batch sizes (candidates per sampling pass) that get a compiled program; a pass is padded up to the next one. 9:
# a /dalle asks for 9 images by default, and padding it to 16 rows cost the demo grid 1.5-1.8x on the CPU and Mega
# 10% of its sampling time on a GPU (bench/RESULTS.md, "Grid options measured on a CPU"). 8 is a bucket too, so 5-8
# images and --max-batch 8 run as 8 rows, not 9.
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 9, 16, 32)


def bucket_for(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= n; ValueError if n < 1 or n exceeds the largest bucket."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(f"batch size {n} exceeds the largest batch bucket {max(buckets)}")


class EngineError(RuntimeError):
    """The engine failed to produce a result for a request (message is safe to show to a user)."""


class BadRequest(EngineError):
    """The request itself is invalid (empty prompt, n out of range, unknown parameter...)."""


class RequestCancelled(EngineError):
    """The request was cancelled before it finished."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs. A field left ``None`` takes the checkpoint's recommended value (the ``sampling`` block
    of its ``checkpoint.json``), else the reference's (:data:`REFERENCE_SAMPLING`: scale 10, top-k 50, T 1,
    no top-p). A small model such as the demo samples best with a lower scale and top-k than the published
    ones, so the checkpoint, not the client, owns those defaults."""

    condition_scale: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None

    def validate(self) -> None:
        if self.condition_scale is not None and not (0.0 <= self.condition_scale <= 100.0):
            raise BadRequest("condition_scale must be between 0 and 100")
        if self.top_k is not None and not (0 <= self.top_k <= 16384):
            raise BadRequest("top_k must be between 0 (off) and 16384")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise BadRequest("top_p must be in (0, 1]")
        if self.temperature is not None and not (0.01 <= self.temperature <= 10.0):
            raise BadRequest("temperature must be between 0.01 and 10")

    def resolve(self, defaults: SamplingParams | None = None) -> SamplingParams:
        """Every ``None`` field filled from ``defaults`` (itself completed from :data:`REFERENCE_SAMPLING`)."""
        base = REFERENCE_SAMPLING if defaults is None else defaults.resolve()
        return SamplingParams(**{f.name: getattr(base, f.name) if getattr(self, f.name) is None
                                 else getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_json(cls, data: Any, *, what: str = "params") -> SamplingParams:
        """Validated params from a JSON object (unknown names and bad values raise :class:`BadRequest`)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise BadRequest(f"{what} must be an object")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise BadRequest(f"unknown sampling parameter(s) in {what}: {', '.join(sorted(unknown))}")
        for name, value in data.items():
            if value is None:  # null: the checkpoint's recommendation
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"{what}.{name} must be a number")
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an integer too large for a float
                finite = False
            if not finite:
                raise BadRequest(f"{what}.{name} must be a number (finite and in range)")
            if name == "top_k" and not isinstance(value, int):
                raise BadRequest(f"{what}.{name} must be an integer")
        params = cls(**data)
        params.validate()
        return params


REFERENCE_SAMPLING = SamplingParams(condition_scale=10.0, top_k=50, top_p=1.0, temperature=1.0)


@dataclass(frozen=True)
class GenerationRequest:
    """One user's request: ``n`` candidates for ``prompt``; candidate i uses the stream (seed, i)."""

    prompt: str
    n: int = GRID_IMAGES
    seed: int = 0
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    preview_every: int = 0  # emit a partially decoded preview every k tokens (0 = never)
    # candidates are first_index .. first_index+n-1; the batcher sets it when it splits a request larger
    # than the biggest batch bucket, so every part keeps its (seed, index) streams.
    first_index: int = 0
    # image tokens every candidate starts with (row-major codes, the first k positions of the image); the model
    # samples the rest. A variation keeps a prefix of the chosen image's tokens (its top rows) and so its layout.
    image_prefix: tuple[int, ...] = ()

    def validate(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadRequest("prompt must be a non-empty string")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        try:  # JSON can carry a lone surrogate; the tokenizer cannot (and would fail the whole batch)
            self.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("prompt is not valid Unicode text (it holds a lone surrogate)") from None
        if not (1 <= int(self.n) <= MAX_IMAGES_PER_REQUEST):
            raise BadRequest(f"n must be between 1 and {MAX_IMAGES_PER_REQUEST}")
        if not (0 <= int(self.seed) < SEED_LIMIT):
            raise BadRequest(f"seed must be between 0 and {SEED_LIMIT - 1}")
        if self.preview_every < 0:
            raise BadRequest("preview_every must be >= 0")
        if not (0 <= int(self.first_index) < 2**31):
            raise BadRequest("first_index must be between 0 and 2**31-1")
        check_image_prefix(self.image_prefix, MAX_IMAGE_PREFIX + 1, MAX_IMAGE_CODES)
        self.params.validate()

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.image_prefix:  # numpy ints too (tokens read from the store)
            out["image_prefix"] = [int(t) for t in self.image_prefix]
        else:  # left out: a request without one reads as before to a service that predates the field
            del out["image_prefix"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationRequest:
        data = dict(data)
        params = SamplingParams.from_json(data.pop("params", None))
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        if "image_prefix" in data:
            prefix = data["image_prefix"]
            if not isinstance(prefix, list | tuple):
                raise BadRequest("image_prefix must be a list of image token ids")
            data["image_prefix"] = tuple(prefix)
        try:
            req = cls(params=params, **data)
        except TypeError as exc:
            raise BadRequest(str(exc)) from exc
        return req


def check_image_prefix(prefix: Any, image_length: int, codebook: int) -> None:
    """Raise :class:`BadRequest` unless ``prefix`` is a sequence of fewer than ``image_length`` token ids, each in
    ``[0, codebook)``: a forced prefix as long as the image would leave nothing to sample."""
    if not isinstance(prefix, list | tuple):
        raise BadRequest("image_prefix must be a list of image token ids")
    if len(prefix) >= image_length:
        raise BadRequest(f"image_prefix has {len(prefix)} tokens; it must be shorter than the image "
                         f"({image_length} tokens)")
    for position, token in enumerate(prefix):
        if isinstance(token, bool) or not isinstance(token, int | np.integer) or not 0 <= int(token) < codebook:
            raise BadRequest(f"image_prefix[{position}] = {token!r} is not a token id between 0 and {codebook - 1}")


@dataclass
class GeneratedImage:
    """One candidate image with its scores. ``tokens`` are the exact image codes sampled (int16)."""

    index: int  # candidate index within the request: the (seed, index) stream that made it
    rank: int  # 0 = best CLIP score among the request's candidates
    png: bytes
    tokens: np.ndarray
    clip_score: float
    safety: dict[str, float]
    flagged: bool
    critical: bool = False  # flagged for a critical concept: withheld whatever the guild's flagged mode

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "rank": self.rank,
            "png": base64.b64encode(self.png).decode("ascii"),
            "tokens": np.asarray(self.tokens, dtype=np.int16).tolist(),
            "clip_score": float(self.clip_score),
            "safety": {k: float(v) for k, v in self.safety.items()},
            "flagged": bool(self.flagged),
            "critical": bool(self.critical),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GeneratedImage:
        return cls(
            index=int(data["index"]),
            rank=int(data["rank"]),
            png=base64.b64decode(data["png"]),
            tokens=np.asarray(data["tokens"], dtype=np.int16),
            clip_score=float(data["clip_score"]),
            safety={k: float(v) for k, v in data["safety"].items()},
            flagged=bool(data["flagged"]),
            critical=bool(data.get("critical", False)),  # an engine that predates severities: none is critical
        )


@dataclass
class GenerationResult:
    """Every candidate of one request, and what produced them: the checkpoint, and the decode attention backend
    (``"xla"`` or ``"native"``, :mod:`engine.attention`; None where no model ran, or from an engine that predates
    the field), since the same seed gives the same image only with the same backend (README: "Same seed, same
    image")."""

    request_id: str
    prompt: str
    seed: int
    images: list[GeneratedImage]  # ordered by rank (best first)
    checkpoint_id: str
    timings: dict[str, float] = field(default_factory=dict)
    attention: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "seed": self.seed,
            "images": [im.to_json() for im in self.images],
            "checkpoint_id": self.checkpoint_id,
            "timings": dict(self.timings),
            "attention": self.attention,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationResult:
        return cls(
            request_id=data["request_id"],
            prompt=data["prompt"],
            seed=int(data["seed"]),
            images=[GeneratedImage.from_json(d) for d in data["images"]],
            checkpoint_id=data["checkpoint_id"],
            timings={k: float(v) for k, v in data.get("timings", {}).items()},
            attention=data.get("attention"),
        )


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves now: the active checkpoint's id (the id every result's ``checkpoint_id`` carries), the
    decode attention backend's name and DalleBart's dtype (None where unknown, e.g. a fake pipeline)."""

    checkpoint_id: str
    attention: str | None = None
    dtype: str | None = None

    @property
    def model_id(self) -> str:
        """The active checkpoint's id (what the model registry calls a checkpoint)."""
        return self.checkpoint_id

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineInfo:
        return cls(checkpoint_id=str(data["checkpoint_id"]), attention=data.get("attention"), dtype=data.get("dtype"))


State = Literal["queued", "running", "done", "failed", "cancelled"]


@dataclass
class Progress:
    """A progress event for one request (queue position while queued, tokens while running)."""

    request_id: str
    state: State
    queue_position: int | None = None
    tokens_done: int = 0
    tokens_total: int = 0
    preview_png: bytes | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["preview_png"] = base64.b64encode(self.preview_png).decode("ascii") if self.preview_png else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        data = dict(data)
        if data.get("preview_png"):
            data["preview_png"] = base64.b64decode(data["preview_png"])
        return cls(**data)


class Engine(Protocol):
    """What the bot needs from a model backend; implemented in-process and over HTTP (engine.client)."""

    async def submit(self, request: GenerationRequest) -> str:
        """Queue a request; returns its id at once. Raises BadRequest for invalid input."""

    def events(self, request_id: str) -> AsyncIterator[Progress]:
        """Progress events until the request reaches done, failed or cancelled."""

    async def result(self, request_id: str, timeout: float | None = None) -> GenerationResult:
        """Wait for the result. Raises RequestCancelled or EngineError."""

    async def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; False if it was unknown or already finished."""

    async def info(self) -> EngineInfo:
        """What the engine serves now: the active checkpoint's id, the attention backend, the dtype."""

    async def reload(self, checkpoint_dir: str) -> EngineInfo:
        """Load the checkpoint at ``checkpoint_dir`` (a path where the engine runs) with the same options and swap it
        in between two sampling passes, at a moment when no request is half done (a request's candidates all come
        from one checkpoint); requests queued meanwhile wait, none is lost. Returns the new :meth:`info`. Raises
        :class:`BadRequest` when the checkpoint cannot be loaded (the old one keeps serving)."""

    async def close(self) -> None: ...


class Pipeline(Protocol):
    """The model side of the engine: one call samples every candidate of several requests in one pass.

    ``generate`` is synchronous and CPU/accelerator bound: callers run it in an executor or a worker
    process, never on the event loop. The total candidate count (sum of ``n``) is padded up to the
    smallest of ``batch_buckets`` that fits, so nothing recompiles at run time; callers never pass more
    than ``max(batch_buckets)`` candidates. ``on_progress(request_id, tokens_done, tokens_total,
    preview_png_or_None)`` is called from the sampling thread; ``should_cancel(request_id)`` is polled
    between chunks of tokens and a cancelled request is dropped from the returned list.

    Optional, for :meth:`Engine.reload`: ``with_checkpoint(directory) -> Pipeline`` loads another checkpoint with
    this pipeline's options, and ``close()`` frees what the pipeline holds besides memory (its threads).
    """

    checkpoint_id: str
    batch_buckets: tuple[int, ...]
    attention: str | None  # the decode attention backend's name ("xla", "native"); None where no model runs

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: Callable[[str, int, int, bytes | None], None] | None = None,
        should_cancel: Callable[[str], bool] | None = None,
    ) -> list[GenerationResult]: ...
