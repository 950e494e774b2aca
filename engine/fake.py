"""A deterministic stand-in for the real pipeline, for tests, benchmarks and running the bot without a model.

It implements the :class:`engine.api.Pipeline` protocol with numpy alone: candidate ``i`` of a request is
derived from ``(prompt, sampling params, seed, i)`` only, so a request gives the same tokens and PNG bytes
whether it ran alone, in a batch or split over several batches. The cost model is that of an accelerator:
a pass costs ``fixed_latency + per_candidate_latency * bucket`` (the padded batch), spread over chunks of
tokens between which progress is reported and cancellation is polled. Every call is recorded in ``calls``.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.api import (
    DEFAULT_BUCKETS,
    EngineError,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    bucket_for,
    check_image_prefix,
)
from engine.checkpoint import CheckpointMissing, checkpoint_id_of

CODEBOOK_SIZE = 16384


class FakePipelineError(EngineError):
    """The failure the fake raises for a prompt it was told to fail on (fails the whole pass, like an OOM)."""


@dataclass(frozen=True)
class FakeCall:
    """One ``generate`` call: which requests (id, first_index, n), how many candidates, the padded bucket."""

    requests: tuple[tuple[str, int, int], ...]
    candidates: int
    bucket: int
    chunks_run: int
    stopped_early: bool  # every request in the pass was cancelled, so sampling stopped
    failed: bool

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(r[0] for r in self.requests)


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as a PNG (stdlib zlib only; deterministic bytes)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


class FakePipeline:
    """Deterministic fake of the model pipeline (see module docstring).

    ``fail_prompts``: a pass containing one of these prompts raises :class:`FakePipelineError`.
    ``flag_prompts``: candidates of these prompts get a high "sexual" safety score and are flagged.
    ``critical_prompts``: candidates of these get a high "violence" score and are flagged as critical.
    """

    def __init__(
        self,
        *,
        checkpoint_id: str = "fake-0",
        batch_buckets: Sequence[int] = DEFAULT_BUCKETS,
        fixed_latency: float = 0.0,
        per_candidate_latency: float = 0.0,
        tokens_total: int = 256,
        chunk_tokens: int = 64,
        image_size: int = 32,
        fail_prompts: Collection[str] = (),
        flag_prompts: Collection[str] = (),
        flag_threshold: float = 0.8,
        critical_prompts: Collection[str] = (),
    ) -> None:
        buckets = tuple(sorted({int(b) for b in batch_buckets}))
        if not buckets or buckets[0] < 1:
            raise ValueError("batch_buckets must be a non-empty set of positive sizes")
        side = int(round(tokens_total**0.5))
        if side * side != tokens_total:
            raise ValueError("tokens_total must be a square number (a grid of image tokens)")
        if image_size % side:
            raise ValueError("image_size must be a multiple of sqrt(tokens_total)")
        self.checkpoint_id = checkpoint_id
        self.batch_buckets = buckets
        self.attention: str | None = None  # no model, no attention backend
        self.fixed_latency = float(fixed_latency)
        self.per_candidate_latency = float(per_candidate_latency)
        self.tokens_total = int(tokens_total)
        self.chunk_tokens = max(1, min(int(chunk_tokens), self.tokens_total))
        self.image_size = int(image_size)
        self.fail_prompts = set(fail_prompts)
        self.flag_prompts = set(flag_prompts)
        self.flag_threshold = float(flag_threshold)
        self.critical_prompts = set(critical_prompts)
        self.calls: list[FakeCall] = []
        self._lock = threading.Lock()
        self._side = side
        self._settings = dict(
            batch_buckets=buckets, fixed_latency=fixed_latency, per_candidate_latency=per_candidate_latency,
            tokens_total=tokens_total, chunk_tokens=chunk_tokens, image_size=image_size, fail_prompts=fail_prompts,
            flag_prompts=flag_prompts, flag_threshold=flag_threshold, critical_prompts=critical_prompts,
        )

    def with_checkpoint(self, directory: str | Path) -> FakePipeline:
        """A fake with these settings serving "the checkpoint at ``directory``": any existing directory, whose id
        (``checkpoint.json``, else its name) the new fake reports; what a reload swaps in."""
        path = Path(directory)
        if not path.is_dir():
            raise CheckpointMissing(f"no checkpoint at {path}: no such directory")
        return FakePipeline(checkpoint_id=checkpoint_id_of(path), **self._settings)

    # -- deterministic "model" ------------------------------------------------------------------------------

    def _rng(self, request: GenerationRequest, index: int) -> np.random.Generator:
        conditioning = repr((request.prompt, sorted(asdict(request.params.resolve()).items()))).encode()
        prompt_key = int.from_bytes(hashlib.sha256(conditioning).digest()[:8], "little")
        return np.random.default_rng([int(request.seed), int(index), prompt_key])

    def sample_tokens(self, request: GenerationRequest, index: int) -> np.ndarray:
        """The image tokens of candidate ``index``: a function of (prompt, params, seed, index, image prefix) only;
        they start with the request's image prefix, as the model's do."""
        return self._tokens(self._rng(request, index), request)

    def _tokens(self, rng: np.random.Generator, request: GenerationRequest) -> np.ndarray:
        tokens = rng.integers(0, CODEBOOK_SIZE, size=self.tokens_total).astype(np.int16)
        prefix = np.asarray(request.image_prefix, np.int16)
        tokens[: prefix.size] = prefix
        return tokens

    def check_request(self, request: GenerationRequest) -> None:
        """Raise ``BadRequest`` if the image prefix does not fit this fake "model" (its length and codebook)."""
        check_image_prefix(request.image_prefix, self.tokens_total, CODEBOOK_SIZE)

    def decode(self, tokens: np.ndarray) -> bytes:
        """Tokens → PNG: each token paints a block whose colour comes from its code bits."""
        codes = np.asarray(tokens, dtype=np.int64).reshape(self._side, self._side)
        rgb = np.stack([(codes * 37) % 256, (codes >> 5) % 256, (codes * 101 >> 3) % 256], axis=-1).astype(np.uint8)
        scale = self.image_size // self._side
        return encode_png(np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8)))

    def _candidate(self, request: GenerationRequest, index: int) -> GeneratedImage:
        rng = self._rng(request, index)
        tokens = self._tokens(rng, request)
        clip_score = float(0.15 + 0.2 * rng.random())
        safety = {"sexual": float(0.5 * rng.random()), "violence": float(0.5 * rng.random())}
        if request.prompt in self.flag_prompts:
            safety["sexual"] = 0.95
        if request.prompt in self.critical_prompts:
            safety["violence"] = 0.99
        flagged = max(safety.values()) >= self.flag_threshold
        critical = request.prompt in self.critical_prompts
        return GeneratedImage(index, 0, self.decode(tokens), tokens, clip_score, safety, flagged, critical)

    # -- Pipeline protocol --------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: Callable[[str, int, int, bytes | None], None] | None = None,
        should_cancel: Callable[[str], bool] | None = None,
    ) -> list[GenerationResult]:
        for r in requests:
            r.validate()
            self.check_request(r)
        candidates = sum(r.n for r in requests)
        bucket = bucket_for(candidates, self.batch_buckets)
        call = dict(
            requests=tuple((r.request_id, r.first_index, r.n) for r in requests),
            candidates=candidates,
            bucket=bucket,
        )
        failing = next((r.prompt for r in requests if r.prompt in self.fail_prompts), None)
        if failing is not None:
            self._record(FakeCall(**call, chunks_run=0, stopped_early=False, failed=True))
            raise FakePipelineError(f"fake pipeline failure for prompt {failing!r}")

        start = time.perf_counter()
        n_chunks = -(-self.tokens_total // self.chunk_tokens)
        chunk_sleep = (self.fixed_latency + self.per_candidate_latency * bucket) / n_chunks
        live = {r.request_id for r in requests}
        chunks_run = 0
        for c in range(n_chunks):
            if should_cancel is not None:
                live = {rid for rid in live if not should_cancel(rid)}
            if not live:
                break
            if chunk_sleep > 0:
                time.sleep(chunk_sleep)
            chunks_run += 1
            done = min((c + 1) * self.chunk_tokens, self.tokens_total)
            if on_progress is not None:
                for r in requests:
                    if r.request_id in live:
                        on_progress(r.request_id, done, self.tokens_total, self._preview(r, done))
        stopped_early = not live
        self._record(FakeCall(**call, chunks_run=chunks_run, stopped_early=stopped_early, failed=False))
        if should_cancel is not None:
            live = {rid for rid in live if not should_cancel(rid)}
        elapsed = time.perf_counter() - start

        results = []
        for r in requests:
            if r.request_id not in live:
                continue
            images = [self._candidate(r, r.first_index + i) for i in range(r.n)]
            images.sort(key=lambda im: (-im.clip_score, im.index))
            for rank, im in enumerate(images):
                im.rank = rank
            results.append(
                GenerationResult(r.request_id, r.prompt, r.seed, images, self.checkpoint_id, {"sample_s": elapsed})
            )
        return results

    def _preview(self, request: GenerationRequest, done: int) -> bytes | None:
        k = request.preview_every
        if k <= 0 or done >= self.tokens_total:
            return None
        if done // k == (done - self.chunk_tokens) // k:  # no multiple of k crossed in this chunk
            return None
        tokens = self.sample_tokens(request, request.first_index).copy()
        tokens[done:] = 0
        return self.decode(tokens)

    def _record(self, call: FakeCall) -> None:
        with self._lock:
            self.calls.append(call)

    @property
    def call_count(self) -> int:
        with self._lock:
            return len(self.calls)
