"""Dynamic batching: many concurrent requests, one sampling pass, one model thread.

Requests are cut into *units* of at most the biggest batch bucket (a larger request is split; each part keeps
its candidate indices through ``GenerationRequest.first_index``, so its (seed, index) streams are unchanged).
Units wait in a FIFO queue; the scheduler waits at most ``window`` after the oldest unit arrived for
company, then packs units first-fit into one pass of at most ``max_batch`` candidates. The pipeline pads the
pass to one of its ``batch_buckets``, so nothing recompiles at run time.

The model runs in ONE worker thread; the event loop only schedules, so status, health and metrics answer
while a pass samples. If a pass with several units raises, each unit is retried alone so one bad request
cannot fail its batch-mates. Cancelling a queued request removes its units; cancelling a running one asks
the pipeline (``should_cancel``) to drop it at the next chunk of tokens. Finished jobs are kept for a TTL
(and at most ``max_finished`` of them) so memory stays bounded.

:meth:`Batcher.reload` swaps the pipeline for another checkpoint's: the model thread loads it between two passes,
when no request is half done (so a request split over several passes gets all its candidates from one checkpoint),
and the queue waits meanwhile. The old and the new model are both in memory while the new one loads.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from engine.api import (
    MAX_IMAGES_PER_REQUEST,
    BadRequest,
    EngineError,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    Pipeline,
    Progress,
    RequestCancelled,
    bucket_for,
)
from engine.metrics import EngineMetrics
from engine.priority import DEFAULT_MODEL_NICE, lower_model_threads

log = logging.getLogger(__name__)

TERMINAL = frozenset({"done", "failed", "cancelled"})


class UnknownRequest(BadRequest):
    """No such request id (never submitted, or its result outlived the TTL)."""


class DuplicateRequest(BadRequest):
    """A request with this id is already known (a retried submit that did arrive, or an id collision)."""


class QueueFull(EngineError):
    """The engine's queue is at capacity; try again later."""


class ShuttingDown(EngineError):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False)
class _Unit:
    """A slice of one job's candidates: the thing the scheduler packs into passes."""

    job: _Job
    first_index: int
    n: int
    enqueued_at: float
    tokens_done: int = 0
    tokens_total: int = 0

    @property
    def part_id(self) -> str:
        return f"{self.job.id}@{self.first_index}"


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    created_at: float
    state: str = "queued"
    queue_position: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    units: list[_Unit] = field(default_factory=list)
    parts: list[GenerationResult] = field(default_factory=list)
    result: GenerationResult | None = None
    error: str | None = None
    error_kind: str | None = None
    cancel_requested: bool = False  # read by the model thread through should_cancel
    preview_png: bytes | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: set[Subscription] = field(default_factory=set)

    @property
    def id(self) -> str:
        return self.request.request_id

    def tokens(self) -> tuple[int, int]:
        """Tokens done/total over all parts (a part not yet started counts with the others' total)."""
        per_part = max((u.tokens_total for u in self.units), default=0)
        return sum(u.tokens_done for u in self.units), per_part * len(self.units)

    def progress(self, *, preview: bytes | None = None) -> Progress:
        done, total = self.tokens()
        if self.state == "done":
            done = total
        return Progress(self.id, self.state, self.queue_position, done, total, preview, self.error)  # type: ignore[arg-type]


class Subscription:
    """One listener's stream of progress events for a job; bounded, dropping the oldest non-final events."""

    def __init__(self, maxsize: int = 64) -> None:
        self._items: collections.deque[Progress] = collections.deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()

    def put(self, event: Progress) -> None:
        if len(self._items) >= self._maxsize:
            self._items.popleft()
        self._items.append(event)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> Progress | None:
        """The next event, or None if ``timeout`` passed first."""
        if not self._items:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        return self._items.popleft()


def _held_size(job: _Job) -> int:
    """Bytes a finished job keeps alive: its images' PNGs and tokens (its result's, or its parts' when it did not
    finish), and its last preview."""
    images = job.result.images if job.result is not None else [im for part in job.parts for im in part.images]
    return len(job.preview_png or b"") + sum(len(im.png) + int(im.tokens.nbytes) for im in images)


def pass_sizes(candidates: int) -> list[int]:
    """Request sizes (each at most MAX_IMAGES_PER_REQUEST) that fill a pass of ``candidates``, as the batcher
    fills a bucket larger than one request may ask for."""
    sizes = [MAX_IMAGES_PER_REQUEST] * (candidates // MAX_IMAGES_PER_REQUEST)
    if candidates % MAX_IMAGES_PER_REQUEST:
        sizes.append(candidates % MAX_IMAGES_PER_REQUEST)
    return sizes


class Batcher:
    """Queue, batch and run :class:`GenerationRequest` s on a :class:`Pipeline` (see module docstring)."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        window_ms: float = 10.0,
        max_batch: int | None = None,
        max_queue: int = 1024,
        result_ttl: float = 600.0,
        max_finished: int = 4096,
        max_result_bytes: int = 512 * 2**20,
        metrics: EngineMetrics | None = None,
        warmup: bool = False,
        model_nice: int = DEFAULT_MODEL_NICE,
        loader: Callable[[str], Pipeline] | None = None,
    ) -> None:
        buckets = sorted(int(b) for b in pipeline.batch_buckets)
        if not buckets or buckets[0] < 1:
            raise ValueError("pipeline.batch_buckets must hold positive sizes")
        usable = [b for b in buckets if max_batch is None or b <= max_batch]
        self.pipeline = pipeline
        self.capacity = usable[-1] if usable else buckets[0]  # candidates per pass
        # warmup: buckets not compiled yet, each compiled by a throw-away pass while the queue is empty, so a
        # pass of a size first seen under load does not stall every queued request for a compile
        self._buckets = buckets
        self._warmup = bool(warmup)
        self._cold = [b for b in buckets if b <= self.capacity] if warmup else []
        # reload(directory) -> the pipeline for that checkpoint (default: the current pipeline's with_checkpoint)
        self._loader = loader
        self._reloads: collections.deque[tuple[str, asyncio.Future[EngineInfo]]] = collections.deque()
        self.window = max(0.0, float(window_ms)) / 1000.0
        # the model thread and XLA's pool run at this nice value, below the event loop (engine.priority)
        self.model_nice = int(model_nice)
        self.max_queue = int(max_queue)
        self.result_ttl = float(result_ttl)
        self.max_finished = int(max_finished)
        # finished results held (PNGs, tokens, previews) are bounded in bytes too: the oldest go first, never the
        # newest one (a client must be able to fetch what it just got)
        self.max_result_bytes = int(max_result_bytes)
        self._result_bytes: dict[str, int] = {}
        self.held_bytes = 0
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self._jobs: dict[str, _Job] = {}
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._queue: collections.deque[_Unit] = collections.deque()
        self._running: list[_Unit] = []
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed = False

    # -- public API -----------------------------------------------------------------------------------------

    @property
    def checkpoint_id(self) -> str:
        return str(getattr(self.pipeline, "checkpoint_id", "unknown"))

    def info(self) -> EngineInfo:
        """What the pipeline serves now: checkpoint id, attention backend, dtype (None where it does not say)."""
        options = getattr(self.pipeline, "options", None)
        return EngineInfo(self.checkpoint_id, getattr(self.pipeline, "attention", None),
                          getattr(options, "dtype", None))

    async def reload(self, checkpoint_dir: str) -> EngineInfo:
        """Load the checkpoint at ``checkpoint_dir`` on the model thread and swap it in between two passes, when no
        request is half done; returns the new :meth:`info`. Reloads run one at a time, in the order asked. Raises
        :class:`BadRequest` when it cannot be loaded (the old pipeline keeps serving), :class:`ShuttingDown` when
        the batcher closes first."""
        self.start()
        if self._closing:
            raise ShuttingDown("engine is shutting down")
        if self._loader is None and not callable(getattr(self.pipeline, "with_checkpoint", None)):
            raise EngineError("this engine's pipeline cannot load another checkpoint")
        assert self._loop is not None and self._wakeup is not None
        done: asyncio.Future[EngineInfo] = self._loop.create_future()
        self._reloads.append((str(checkpoint_dir), done))
        self._wakeup.set()
        return await done

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        """Start the scheduler on the running loop (idempotent; ``submit`` calls it)."""
        if self._task is not None:
            return
        if self._closed:
            raise ShuttingDown("engine is closed")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-model")
        self._task = self._loop.create_task(self._schedule(), name="engine-batcher")

    async def submit(self, request: GenerationRequest) -> str:
        """Validate and queue a request; returns its id at once."""
        self.start()
        try:
            request.validate()
            check = getattr(self.pipeline, "check_request", None)  # what only the model knows (image prefix)
            if callable(check):
                check(request)
        except BadRequest:
            self.metrics.errors.labels("bad_request").inc()
            raise
        except (TypeError, ValueError) as exc:
            self.metrics.errors.labels("bad_request").inc()
            raise BadRequest(f"invalid request: {exc}") from exc
        if self._closing:
            self.metrics.errors.labels("shutting_down").inc()
            raise ShuttingDown("engine is shutting down")
        self._gc()
        if request.request_id in self._jobs:
            raise DuplicateRequest(f"request id {request.request_id!r} is already in use")
        if self.queue_depth >= self.max_queue:
            self.metrics.errors.labels("queue_full").inc()
            raise QueueFull(f"engine queue is full ({self.max_queue} requests waiting); try again later")
        now = time.monotonic()
        job = _Job(request=request, created_at=now)
        start, end = int(request.first_index), int(request.first_index) + int(request.n)
        job.units = [_Unit(job, i, min(self.capacity, end - i), now) for i in range(start, end, self.capacity)]
        self._jobs[job.id] = job
        self._queue.extend(job.units)
        assert self._idle is not None and self._wakeup is not None
        self._idle.clear()
        self._refresh_positions()
        self._update_gauges()
        self._wakeup.set()
        return job.id

    def status(self, request_id: str) -> Progress:
        """The request's current state (raises UnknownRequest)."""
        return self._job(request_id).progress()

    def request_of(self, request_id: str) -> GenerationRequest:
        return self._job(request_id).request

    def result_of(self, request_id: str) -> GenerationResult | None:
        """The result if the request is done, else None (raises UnknownRequest)."""
        return self._job(request_id).result

    def subscribe(self, request_id: str) -> tuple[Subscription, Progress]:
        """Listen to a job: returns the subscription and the current snapshot (call ``unsubscribe`` after)."""
        job = self._job(request_id)
        sub = Subscription()
        if job.state not in TERMINAL:
            job.listeners.add(sub)
        return sub, job.progress(preview=job.preview_png)

    def unsubscribe(self, request_id: str, sub: Subscription) -> None:
        job = self._jobs.get(request_id)
        if job is not None:
            job.listeners.discard(sub)

    async def events(self, request_id: str) -> AsyncIterator[Progress]:
        """Progress events until the request is done, failed or cancelled (starts with the current state)."""
        sub, snapshot = self.subscribe(request_id)
        try:
            yield snapshot
            if snapshot.state in TERMINAL:
                return
            while True:
                event = await sub.get()
                assert event is not None
                yield event
                if event.state in TERMINAL:
                    return
        finally:
            self.unsubscribe(request_id, sub)

    async def result(self, request_id: str, timeout: float | None = None) -> GenerationResult:
        """Wait for the result; raises RequestCancelled, EngineError (BadRequest) or TimeoutError."""
        job = self._job(request_id)
        await asyncio.wait_for(job.finished.wait(), timeout)
        if job.state == "done":
            assert job.result is not None
            return job.result
        if job.state == "cancelled":
            raise RequestCancelled(job.error or "request was cancelled")
        if job.error_kind == "bad_request":
            raise BadRequest(job.error or "bad request")
        raise EngineError(job.error or "generation failed")

    async def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; False if unknown or already finished."""
        job = self._jobs.get(request_id)
        if job is None or job.state in TERMINAL:
            return False
        self._cancel_job(job, "cancelled by request")
        return True

    @property
    def queue_depth(self) -> int:
        """Requests waiting that have not started any part."""
        return sum(1 for j in self._jobs.values() if j.state == "queued")

    def active_ids(self) -> list[str]:
        """Ids of the requests still queued or running."""
        return [rid for rid, job in self._jobs.items() if job.state not in TERMINAL]

    def load(self) -> dict[str, Any]:
        """A small summary used by /v1/status and least-loaded routing."""
        running_jobs = {u.job.id for u in self._running}
        return {
            "queue_depth": self.queue_depth,
            "running": sum(1 for j in self._jobs.values() if j.state == "running"),
            "queued_candidates": sum(u.n for u in self._queue),
            "running_candidates": sum(u.n for u in self._running if not u.job.cancel_requested),
            "running_requests_in_pass": len(running_jobs),
            "capacity": self.capacity,
            "window_ms": self.window * 1000.0,
            "checkpoint_id": self.checkpoint_id,
            "closing": self._closing,
            "cold_buckets": list(self._cold),
            "results_held": len(self._finished),
            "results_bytes": self.held_bytes,
        }

    async def close(self, drain_timeout: float = 0.0, worker_timeout: float = 30.0) -> None:
        """Stop taking requests; let queued/running work finish for up to ``drain_timeout`` seconds, cancel
        whatever is left, wait (up to ``worker_timeout``) for the model thread to return, free the executor."""
        if self._closed:
            return
        self._closing = True
        if self._task is None:
            self._closed = True
            return
        assert self._idle is not None and self._wakeup is not None
        if drain_timeout > 0:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except TimeoutError:
                pass
        for job in list(self._jobs.values()):
            if job.state not in TERMINAL:
                self._cancel_job(job, "engine shutting down")
        while self._reloads:
            _, done = self._reloads.popleft()
            if not done.done():
                done.set_exception(ShuttingDown("engine shut down before the reload"))
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), worker_timeout)
        except Exception:
            log.warning("model thread did not return within %.1fs of shutdown; abandoning it", worker_timeout)
            self._task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._closed = True

    # -- internals: jobs ---------------------------------------------------------------------------------------

    def _job(self, request_id: str) -> _Job:
        self._gc()
        job = self._jobs.get(request_id)
        if job is None:
            raise UnknownRequest(f"unknown request id {request_id!r}")
        return job

    def _emit(self, job: _Job, event: Progress) -> None:
        for sub in list(job.listeners):
            sub.put(event)

    def _finish(self, job: _Job, state: str, *, error: str | None = None, kind: str | None = None) -> None:
        now = time.monotonic()
        job.state, job.error, job.error_kind, job.finished_at = state, error, kind, now
        job.queue_position = None
        self._queue = collections.deque(u for u in self._queue if u.job is not job)
        self._finished[job.id] = now
        size = _held_size(job)
        self._result_bytes[job.id] = size
        self.held_bytes += size
        self.metrics.requests.labels(state).inc()
        if state == "done":
            self.metrics.latency.observe(now - job.created_at)
        self._emit(job, job.progress())
        job.listeners.clear()
        job.finished.set()
        self._refresh_positions()
        self._update_gauges()
        self._check_idle()

    def _cancel_job(self, job: _Job, reason: str) -> None:
        job.cancel_requested = True
        self._finish(job, "cancelled", error=reason, kind="cancelled")

    def _refresh_positions(self) -> None:
        """1-based position among queued jobs, in queue order; emits an event to each job whose place moved."""
        seen: set[str] = set()
        pos = 0
        for unit in self._queue:
            job = unit.job
            if job.id in seen or job.state != "queued":
                continue
            seen.add(job.id)
            pos += 1
            if job.queue_position != pos:
                job.queue_position = pos
                self._emit(job, job.progress())

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth)
        self.metrics.running.set(sum(1 for j in self._jobs.values() if j.state == "running"))

    def _check_idle(self) -> None:
        if self._idle is not None and not self._queue and not self._running:
            self._idle.set()

    def _gc(self) -> None:
        """Drop finished jobs older than the TTL, the oldest beyond ``max_finished``, and the oldest while the
        results held pass ``max_result_bytes`` (keeping the newest)."""
        now = time.monotonic()
        while self._finished:
            job_id, finished_at = next(iter(self._finished.items()))
            over_bytes = self.held_bytes > self.max_result_bytes and len(self._finished) > 1
            if now - finished_at < self.result_ttl and len(self._finished) <= self.max_finished and not over_bytes:
                break
            self._finished.popitem(last=False)
            self._jobs.pop(job_id, None)
            self.held_bytes -= self._result_bytes.pop(job_id, 0)

    # -- internals: scheduling ----------------------------------------------------------------------------

    async def _schedule(self) -> None:
        assert self._loop is not None
        while True:
            units = await self._next_batch()
            if units is None:
                return
            if not units:  # a reload is due: nothing runs meanwhile
                if self._reloads:
                    directory, done = self._reloads.popleft()
                    if not done.cancelled():  # its caller gave up before it began
                        await self._reload_now(directory, done)
                continue
            try:
                await self._run_pass(units)
            except Exception as exc:  # a bug here must not stall every later request
                log.exception("batcher pass failed")
                self._running = []
                for unit in units:
                    if unit.job.state not in TERMINAL:
                        self._finish(unit.job, "failed", error=f"internal engine error ({exc})", kind="internal")

    async def _run_pass(self, units: list[_Unit]) -> None:
        assert self._loop is not None
        self._running = units
        now = time.monotonic()
        for unit in units:
            job = unit.job
            if job.state == "queued":
                job.state, job.started_at, job.queue_position = "running", now, None
                self.metrics.queue_wait.observe(now - job.created_at)
                self._emit(job, job.progress())
        self._refresh_positions()
        self._update_gauges()
        self.metrics.batch_candidates.observe(sum(u.n for u in units))
        self.metrics.batch_requests.observe(len(units))
        t0 = time.perf_counter()
        try:
            outcomes, calls, retried = await self._loop.run_in_executor(self._executor, self._execute, units)
        except Exception as exc:  # the executor itself failed (e.g. shut down): fail the pass's jobs
            outcomes, calls, retried = {u.part_id: exc for u in units}, 0, False
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        self.metrics.pipeline_calls.inc(calls)
        self._mark_warm(sum(u.n for u in units))
        if retried:
            self.metrics.errors.labels("batch_retry").inc()
        self._running = []
        for unit in units:
            self._complete_unit(unit, outcomes.get(unit.part_id))
        self._update_gauges()
        self._check_idle()

    async def _next_batch(self) -> list[_Unit] | None:
        """Wait for work and for the batching window; None once closing with nothing left; [] when a reload is due
        (between passes, with no request half done)."""
        assert self._wakeup is not None
        while True:
            self._gc()
            if self._reloads and not self._closing and not self._half_done():
                return []
            if not self._queue:
                if self._closing:
                    return None
                if self._cold:  # idle: compile the next bucket (a request arriving now waits for one pass)
                    await self._warm(self._cold[0])
                    continue
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(1.0, min(self.result_ttl, 60.0)))
                except TimeoutError:
                    pass
                continue
            if self.window > 0 and not self._closing:
                wait = self._queue[0].enqueued_at + self.window - time.monotonic()
                if wait > 0 and sum(u.n for u in self._queue) < self.capacity:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except TimeoutError:
                        pass
                    continue
            return self._take_batch()

    def _half_done(self) -> bool:
        """Whether a request has parts done and parts still queued (between passes: one still "running")."""
        return any(job.state == "running" for job in self._jobs.values())

    async def _reload_now(self, directory: str, done: asyncio.Future[EngineInfo]) -> None:
        assert self._loop is not None
        t0 = time.perf_counter()
        try:
            await self._loop.run_in_executor(self._executor, self._swap, directory)
        except Exception as exc:  # noqa: BLE001 - reported to the caller; the old pipeline keeps serving
            if isinstance(exc, OSError | ValueError):
                exc = BadRequest(f"cannot load the checkpoint at {directory}: {exc}")
            elif not isinstance(exc, EngineError):
                log.error("reloading %s failed", directory, exc_info=exc)
                exc = EngineError(f"reloading {directory} failed ({type(exc).__name__}: {str(exc)[:200]})")
            if not done.done():
                done.set_exception(exc)
            return
        log.info("now serving %s (loaded from %s in %.1f s)", self.checkpoint_id, directory, time.perf_counter() - t0)
        if self._warmup:  # the new pipeline's programs: compile them while idle, as at start
            self._cold = [b for b in self._buckets if b <= self.capacity]
        if not done.done():
            done.set_result(self.info())

    def _swap(self, directory: str) -> None:
        """Model thread, between passes: load ``directory`` and make it the pipeline; the old one is closed."""
        lower_model_threads(self.model_nice)
        load = self._loader or self.pipeline.with_checkpoint  # type: ignore[attr-defined]
        new = load(directory)
        if sorted(int(b) for b in new.batch_buckets) != self._buckets:
            close = getattr(new, "close", None)
            if callable(close):
                close()
            raise ValueError(f"its batch buckets {sorted(new.batch_buckets)} differ from the engine's {self._buckets}")
        old, self.pipeline = self.pipeline, new
        close = getattr(old, "close", None)
        if callable(close):
            close()

    def _mark_warm(self, candidates: int) -> None:
        if self._cold and candidates <= self._buckets[-1]:
            bucket = bucket_for(candidates, self._buckets)
            self._cold = [b for b in self._cold if b != bucket]

    async def _warm(self, bucket: int) -> None:
        """One throw-away pass of ``bucket`` candidates on the model thread, through the batcher's code path."""
        assert self._loop is not None
        requests = [GenerationRequest("warm-up", n=n, request_id=f"warm-up-{bucket}-{k}")
                    for k, n in enumerate(pass_sizes(bucket))]
        t0 = time.perf_counter()

        def warm() -> None:
            lower_model_threads(self.model_nice)
            self.pipeline.generate(requests, lambda *_: None, lambda _: False)

        try:
            await self._loop.run_in_executor(self._executor, warm)
            log.info("warmed up the %d-candidate batch in %.1f s", bucket, time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - a failed warm-up leaves the bucket to compile on first use
            log.warning("warming up the %d-candidate batch failed", bucket, exc_info=True)
        self._cold = [b for b in self._cold if b != bucket]

    def _take_batch(self) -> list[_Unit]:
        """First-fit from the head: the oldest unit always goes, later ones fill the remaining capacity. While a
        reload waits, only the parts of requests already half done go, so that it comes soon."""
        batch: list[_Unit] = []
        total = 0
        finishing = bool(self._reloads)
        for unit in self._queue:
            if finishing and unit.job.state != "running":
                continue
            if total + unit.n <= self.capacity:
                batch.append(unit)
                total += unit.n
                if total == self.capacity:
                    break
        taken = set(map(id, batch))
        self._queue = collections.deque(u for u in self._queue if id(u) not in taken)
        return batch

    def _execute(self, units: list[_Unit]) -> tuple[dict[str, Any], int, bool]:
        """Model thread: one pass over ``units``; if it raises and holds several, retry each alone."""
        lower_model_threads(self.model_nice)
        by_part = {u.part_id: u for u in units}
        requests = [
            dataclasses.replace(u.job.request, n=u.n, first_index=u.first_index, request_id=u.part_id) for u in units
        ]

        def should_cancel(part_id: str) -> bool:
            unit = by_part.get(part_id)
            return unit is None or unit.job.cancel_requested

        def on_progress(part_id: str, done: int, total: int, preview: bytes | None) -> None:
            unit = by_part.get(part_id)
            if unit is not None and self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._on_progress, unit, done, total, preview)
                except RuntimeError:  # loop closed during shutdown
                    pass

        def run(batch: list[GenerationRequest]) -> dict[str, Any]:
            results = self.pipeline.generate(batch, on_progress, should_cancel)
            return {r.request_id: r for r in results}

        try:
            return run(requests), 1, False
        except Exception as exc:
            if len(requests) == 1:
                return {requests[0].request_id: exc}, 1, False
            log.warning("pass of %d requests failed (%s); retrying each alone", len(requests), exc)
        outcomes: dict[str, Any] = {}
        calls = 1
        for req in requests:
            if should_cancel(req.request_id):
                continue
            calls += 1
            try:
                outcomes.update(run([req]))
            except Exception as exc:
                outcomes[req.request_id] = exc
        return outcomes, calls, True

    def _on_progress(self, unit: _Unit, done: int, total: int, preview: bytes | None) -> None:
        job = unit.job
        if job.state != "running":
            return
        unit.tokens_done, unit.tokens_total = int(done), int(total)
        if preview is not None:
            job.preview_png = preview
        self._emit(job, job.progress(preview=preview))

    def _complete_unit(self, unit: _Unit, outcome: Any) -> None:
        job = unit.job
        if job.state in TERMINAL:
            return
        expected = list(range(unit.first_index, unit.first_index + unit.n))
        if isinstance(outcome, GenerationResult) and sorted(im.index for im in outcome.images) != expected:
            outcome = EngineError(
                f"pipeline returned candidates {sorted(im.index for im in outcome.images)} for a part that asked "
                f"for {unit.first_index}..{unit.first_index + unit.n - 1} (does it honour first_index?)"
            )
        if isinstance(outcome, GenerationResult):
            unit.tokens_done = unit.tokens_total
            job.parts.append(outcome)
            if len(job.parts) == len(job.units):
                self._deliver(job)
            return
        if outcome is None:
            error, kind = "pipeline returned no result for this request", "pipeline"
        elif isinstance(outcome, BadRequest):
            error, kind = str(outcome), "bad_request"
        elif isinstance(outcome, EngineError):
            error, kind = str(outcome) or "generation failed", "pipeline"
        else:
            log.error("pipeline error for %s", job.id, exc_info=outcome)
            error, kind = f"internal engine error ({type(outcome).__name__}: {str(outcome)[:200]})", "internal"
        self.metrics.errors.labels(kind).inc()
        job.cancel_requested = True  # drop any part still queued or running
        self._finish(job, "failed", error=error, kind=kind)

    def _deliver(self, job: _Job) -> None:
        parts = sorted(job.parts, key=lambda r: min((im.index for im in r.images), default=0))
        images = [im for part in parts for im in part.images]
        if len(parts) > 1:  # ranks were per part: rank again over the whole request
            images = sorted(images, key=lambda im: (-im.clip_score, im.index))
            images = [dataclasses.replace(im, rank=rank) for rank, im in enumerate(images)]
        timings: dict[str, float] = {}
        for part in parts:
            for key, value in part.timings.items():
                timings[key] = timings.get(key, 0.0) + float(value)
        now = time.monotonic()
        timings["queue_s"] = (job.started_at or now) - job.created_at
        timings["total_s"] = now - job.created_at
        job.result = GenerationResult(
            request_id=job.id,
            prompt=job.request.prompt,
            seed=job.request.seed,
            images=images,
            checkpoint_id=parts[0].checkpoint_id,
            timings=timings,
            attention=parts[0].attention,
        )
        self.metrics.images.inc(len(images))
        self.metrics.image_tokens.inc(sum(int(im.tokens.size) for im in images))
        self._finish(job, "done")
