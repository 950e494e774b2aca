"""A tiny Engine for bot tests: solid-colour PNGs derived from (seed, index), real progress events.

It implements ``engine.api.Engine`` honestly (submit returns at once, events stream until a final state,
result raises ``RequestCancelled``/``EngineError``) so the service and the Discord front end are tested
against the same protocol the real engine speaks. Prompts containing ``unsafe`` come back flagged (the first
image), ``severe`` flagged for a critical concept, and prompts containing ``explode`` fail, so tests can drive
those paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from PIL import Image

from engine.api import (
    BadRequest,
    EngineError,
    EngineInfo,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    Progress,
    RequestCancelled,
)


def colour_for(seed: int, index: int) -> tuple[int, int, int]:
    d = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=3).digest()
    return d[0], d[1], d[2]


def solid_png(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def pattern_png(seed: int, index: int, size: int = 32, cells: int = 8) -> bytes:
    """An 8x8 checker of a light and a dark shade of ``colour_for(seed, index)``, keyed by (seed, index): unlike a
    solid colour, each image has a perceptual hash of its own (solid images all hash alike), and the same seed
    draws the same image. The shades differ by half the range, so the picture survives re-encoding."""
    rgb = np.array(colour_for(seed, index), dtype=np.uint16) // 2
    digest = hashlib.blake2b(f"pattern:{seed}:{index}".encode(), digest_size=cells * cells // 8).digest()
    bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8))[: cells * cells].reshape(cells, cells).astype(bool)
    grid = np.where(bits[..., None], rgb + 128, rgb).astype(np.uint8)
    pixels = np.repeat(np.repeat(grid, size // cells, 0), size // cells, 1)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


class FakeEngine:
    """``steps`` progress events ``step_s`` apart per request; ``concurrency`` requests sampled at once.

    :meth:`reload` takes any existing directory as a checkpoint named after it; results started afterwards carry
    that id (``reloads`` lists the directories asked for)."""

    checkpoint_id = "fake-ckpt"
    attention: str | None = None  # no model, no attention backend

    def __init__(self, steps: int = 4, step_s: float = 0.01, concurrency: int = 4, tokens_total: int = 256,
                 patterned: bool = False) -> None:
        """``patterned``: images of :func:`pattern_png` rather than solid colours (the blocklist tests)."""
        self.patterned = patterned
        self.steps = steps
        self.step_s = step_s
        self.tokens_total = tokens_total
        self._sem = asyncio.Semaphore(concurrency)
        self._queues: dict[str, list[asyncio.Queue]] = {}
        self._results: dict[str, asyncio.Future] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.submitted: list[GenerationRequest] = []
        self.started_order: list[str] = []
        self.gate: asyncio.Event | None = None  # tests may hold generation until set
        self.reloads: list[str] = []

    async def submit(self, request: GenerationRequest) -> str:
        request.validate()
        if len(request.image_prefix) >= 16:  # what the model checks: its images are 16 tokens
            raise BadRequest("image_prefix must be shorter than the image (16 tokens)")
        rid = request.request_id
        if rid in self._results:
            raise EngineError(f"duplicate request id {rid}")
        self.submitted.append(request)
        self._queues[rid] = []
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        self._results[rid] = fut
        self._tasks[rid] = asyncio.create_task(self._run(request))
        return rid

    def _emit(self, rid: str, event: Progress) -> None:
        for q in self._queues.get(rid, []):
            q.put_nowait(event)

    async def _run(self, req: GenerationRequest) -> None:
        rid = req.request_id
        fut = self._results[rid]
        try:
            self._emit(rid, Progress(rid, "queued", queue_position=1))
            async with self._sem:
                if self.gate is not None:
                    await self.gate.wait()
                self.started_order.append(rid)
                for step in range(1, self.steps + 1):
                    await asyncio.sleep(self.step_s)
                    done = self.tokens_total * step // self.steps
                    self._emit(rid, Progress(rid, "running", tokens_done=done, tokens_total=self.tokens_total))
                if "explode" in req.prompt:
                    raise EngineError("the fake engine exploded")
                images = []
                for i in range(req.n):
                    rgb = colour_for(req.seed, i)
                    tokens = np.asarray([(req.seed + i + k) % 16384 for k in range(16)], dtype=np.int16)
                    tokens[: len(req.image_prefix)] = req.image_prefix  # the forced prefix, as the model does
                    images.append(GeneratedImage(
                        index=i, rank=0, png=pattern_png(req.seed, i) if self.patterned else solid_png(rgb),
                        tokens=tokens,
                        clip_score=float(sum(rgb)) / 765.0,
                        safety={"nsfw": 0.9 if "unsafe" in req.prompt else 0.01,
                                "gore": 0.95 if "severe" in req.prompt else 0.01},
                        flagged=("unsafe" in req.prompt or "severe" in req.prompt) and i == 0,
                        critical="severe" in req.prompt and i == 0,
                    ))
                images.sort(key=lambda im: -im.clip_score)
                for rank, im in enumerate(images):
                    im.rank = rank
                fut.set_result(GenerationResult(rid, req.prompt, req.seed, images, self.checkpoint_id,
                                                attention=self.attention))
                self._emit(rid, Progress(rid, "done", tokens_done=self.tokens_total, tokens_total=self.tokens_total))
        except asyncio.CancelledError:
            if not fut.done():
                fut.set_exception(RequestCancelled("cancelled"))
            self._emit(rid, Progress(rid, "cancelled"))
        except EngineError as exc:
            fut.set_exception(exc)
            self._emit(rid, Progress(rid, "failed", error=str(exc)))

    async def events(self, request_id: str) -> AsyncIterator[Progress]:
        if request_id not in self._results:
            raise EngineError(f"unknown request {request_id}")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id].append(q)
        if self._results[request_id].done():
            return
        while True:
            ev = await q.get()
            yield ev
            if ev.state in ("done", "failed", "cancelled"):
                return

    async def result(self, request_id: str, timeout: float | None = None) -> GenerationResult:
        if request_id not in self._results:
            raise EngineError(f"unknown request {request_id}")
        return await asyncio.wait_for(asyncio.shield(self._results[request_id]), timeout)

    async def cancel(self, request_id: str) -> bool:
        task = self._tasks.get(request_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def info(self) -> EngineInfo:
        return EngineInfo(self.checkpoint_id, self.attention)

    async def reload(self, checkpoint_dir: str) -> EngineInfo:
        if not Path(checkpoint_dir).is_dir():
            raise BadRequest(f"cannot load the checkpoint at {checkpoint_dir}: no such directory")
        self.reloads.append(str(checkpoint_dir))
        self.checkpoint_id = Path(checkpoint_dir).name
        return await self.info()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def slow_inprocess_fake_engine():
    """Like :func:`inprocess_fake_engine`, one candidate per pass and 0.3 s a pass: a queue that takes a while."""
    from engine.client import InProcessEngine
    from engine.fake import FakePipeline

    return InProcessEngine(FakePipeline(batch_buckets=(1,), fixed_latency=0.3))


def inprocess_fake_engine():
    """The real ``InProcessEngine`` (batcher included) over ``engine.fake.FakePipeline``: for subprocess tests
    (``DALLE_ENGINE_FACTORY=tests.fakes.engine:inprocess_fake_engine``)."""
    from engine.client import InProcessEngine
    from engine.fake import FakePipeline

    return InProcessEngine(FakePipeline(flag_prompts=("unsafe",)))
