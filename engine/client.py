"""One interface (:class:`engine.api.Engine`), three implementations for the bot.

- :class:`InProcessEngine`: the batcher and pipeline in this process (the embedded default).
- :class:`HttpEngine`: an engine service over HTTP (``engine.server``), with retries and SSE progress.
- :class:`MultiEngine`: several services behind one client, least-loaded first, dead ones skipped a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from engine.api import (
    BadRequest,
    EngineError,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    Pipeline,
    Progress,
    RequestCancelled,
)
from engine.batching import TERMINAL, Batcher, DuplicateRequest, UnknownRequest
from engine.priority import DEFAULT_MODEL_NICE

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_NICE",
    "EngineOptions",
    "EngineUnavailable",
    "HttpEngine",
    "InProcessEngine",
    "MultiEngine",
    "SseEvent",
    "SseParser",
    "connect",
]


class EngineUnavailable(EngineError):
    """The engine could not be built (:func:`connect`), or its service could not be reached (or kept answering
    5xx) after all retries. The message is one line, fit for an operator."""


class InProcessEngine:
    """The :class:`Engine` protocol over a :class:`Batcher` in this process (the model runs in its worker thread)."""

    def __init__(self, pipeline: Pipeline, window_ms: float = 10.0, **batcher_opts: Any) -> None:
        self.batcher = Batcher(pipeline, window_ms=window_ms, **batcher_opts)

    def start(self) -> None:
        """With ``warmup``: start the batcher now, so it compiles the batch sizes while idle, instead of at the
        first submit (without warm-up there is nothing to do before the first request). Needs the running loop."""
        if self.batcher.load()["cold_buckets"]:
            self.batcher.start()

    async def submit(self, request: GenerationRequest) -> str:
        return await self.batcher.submit(request)

    def events(self, request_id: str) -> AsyncIterator[Progress]:
        return self.batcher.events(request_id)

    async def result(self, request_id: str, timeout: float | None = None) -> GenerationResult:
        return await self.batcher.result(request_id, timeout)

    async def cancel(self, request_id: str) -> bool:
        return await self.batcher.cancel(request_id)

    async def status(self) -> dict[str, Any]:
        return self.batcher.load()

    async def info(self) -> EngineInfo:
        return self.batcher.info()

    async def reload(self, checkpoint_dir: str) -> EngineInfo:
        """The batcher's model thread loads ``checkpoint_dir`` and swaps it in between passes (:meth:`Batcher.reload`;
        a ``loader`` given to the constructor, else the pipeline's ``with_checkpoint``)."""
        return await self.batcher.reload(checkpoint_dir)

    async def close(self, drain_timeout: float = 0.0) -> None:
        await self.batcher.close(drain_timeout=drain_timeout)


# -- Server-Sent Events ---------------------------------------------------------------------------------------


@dataclass
class SseEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SseParser:
    """Incremental ``text/event-stream`` parser: feed it lines, it returns an event at each blank line."""

    def __init__(self, max_line: int = 64 * 1024 * 1024) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._buffer = b""
        self._max_line = max_line

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Feed raw bytes as they arrive (lines may be split anywhere, and be far longer than aiohttp's
        ``readline`` allows: a preview PNG travels base64 on one ``data:`` line)."""
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        if len(self._buffer) > self._max_line:
            raise EngineError(f"event stream line longer than {self._max_line} bytes")
        events = (self.feed_line(line.decode("utf-8")) for line in lines)
        return [ev for ev in events if ev is not None]

    def feed_line(self, line: str) -> SseEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SseEvent("\n".join(self._data), self._event or "message", self._id)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


# -- HTTP -----------------------------------------------------------------------------------------------------


_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


class HttpEngine:
    """The :class:`Engine` protocol over the engine's HTTP API.

    Connection errors, timeouts and 5xx are retried ``retries`` times with exponential back-off (jittered);
    4xx never are and raise :class:`BadRequest` (404: :class:`UnknownRequest`) with the server's message.
    Submits carry the request id, so a retried submit that had in fact arrived is recognised (409) not doubled.
    :meth:`reload` is never retried and waits up to ``reload_timeout`` seconds (loading a model takes a while).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        *,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        session: aiohttp.ClientSession | None = None,
        reload_timeout: float = 1800.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.reload_timeout = float(reload_timeout)
        self._session = session
        self._own_session = session is None

    def __repr__(self) -> str:
        return f"HttpEngine({self.base_url!r})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no pool limit: every running job holds one or two long-lived event streams, and a capped pool
            # (aiohttp's default is 100) would make submits and cancels wait behind them until they time out
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self._own_session = True
        return self._session

    async def _sleep_backoff(self, attempt: int) -> None:
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        await asyncio.sleep(delay * (0.5 + random.random() / 2))

    @staticmethod
    async def _body(resp: aiohttp.ClientResponse) -> dict[str, Any]:
        text = await resp.text()
        try:
            data = json.loads(text)
        except ValueError:
            return {"error": text[:300] or resp.reason or f"HTTP {resp.status}"}
        return data if isinstance(data, dict) else {"value": data}

    @staticmethod
    def _client_error(status: int, message: str) -> BadRequest:
        if status == 404:
            return UnknownRequest(message)
        if status == 409:
            return DuplicateRequest(message)
        return BadRequest(message)

    async def _call(
        self, method: str, path: str, *, body: Any = None, retries: int | None = None, resubmit: bool = False,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        attempts = 1 + (self.retries if retries is None else retries)
        timeout = aiohttp.ClientTimeout(total=self.timeout if timeout_s is None else timeout_s)
        last: EngineError = EngineUnavailable(f"{method} {path}: no attempt made")
        for attempt in range(attempts):
            if attempt:
                await self._sleep_backoff(attempt)
            try:
                async with self._get_session().request(
                    method, self.base_url + path, json=body, headers=self._headers(), timeout=timeout
                ) as resp:
                    data = await self._body(resp)
                    if resp.status < 400:
                        return data
                    message = str(data.get("error") or resp.reason or f"HTTP {resp.status}")
                    if resp.status == 409 and resubmit and attempt > 0:
                        return {"id": data.get("id")}  # our earlier attempt did arrive
                    if resp.status < 500:
                        raise self._client_error(resp.status, message)
                    last = EngineUnavailable(f"{method} {path}: HTTP {resp.status}: {message}")
            except _RETRYABLE as exc:
                last = EngineUnavailable(f"{method} {path} on {self.base_url}: {type(exc).__name__}: {exc}")
        raise last

    async def submit(self, request: GenerationRequest, *, retries: int | None = None) -> str:
        request.validate()
        data = await self._call("POST", "/v1/generations", body=request.to_json(), retries=retries, resubmit=True)
        return str(data.get("id") or request.request_id)

    async def get(self, request_id: str, *, retries: int | None = None) -> dict[str, Any]:
        """The raw status document of a request (state, queue position, progress, result)."""
        return await self._call("GET", f"/v1/generations/{request_id}", retries=retries)

    async def events(self, request_id: str) -> AsyncIterator[Progress]:
        """Progress events from the SSE stream; reconnects (the server resends the current state) on drops, for
        at least ``retries`` attempts and ``timeout`` seconds since the stream last delivered anything, so a
        proxy reload or a short network outage does not fail a job the service is still running."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=max(self.timeout, 60.0))
        path = f"/v1/generations/{request_id}/events"
        failures = 0
        healthy_at = time.monotonic()
        while True:
            try:
                async with self._get_session().get(
                    self.base_url + path, headers={**self._headers(), "Accept": "text/event-stream"}, timeout=timeout
                ) as resp:
                    if resp.status >= 400:
                        data = await self._body(resp)
                        message = str(data.get("error") or f"HTTP {resp.status}")
                        if resp.status < 500:
                            raise self._client_error(resp.status, message)
                        raise EngineUnavailable(f"GET {path}: HTTP {resp.status}: {message}")
                    parser = SseParser()
                    async for chunk in resp.content.iter_any():
                        failures, healthy_at = 0, time.monotonic()  # events or keep-alive comments
                        for event in parser.feed(chunk):
                            progress = Progress.from_json(json.loads(event.data))
                            yield progress
                            if progress.state in TERMINAL:
                                return
            except (*_RETRYABLE, EngineUnavailable):
                pass
            failures += 1  # stream dropped (or ended) before a final state
            if failures > self.retries and time.monotonic() - healthy_at >= self.timeout:
                raise EngineUnavailable(f"lost the event stream of {request_id} on {self.base_url}")
            await self._sleep_backoff(failures)

    async def result(self, request_id: str, timeout: float | None = None) -> GenerationResult:
        async def wait() -> GenerationResult:
            async with contextlib.aclosing(self.events(request_id)) as events:
                async for progress in events:
                    if progress.state in TERMINAL:
                        break
            return self._result_from(await self.get(request_id))

        return await asyncio.wait_for(wait(), timeout)

    @staticmethod
    def _result_from(data: dict[str, Any]) -> GenerationResult:
        state = data.get("state")
        if state == "done" and data.get("result"):
            return GenerationResult.from_json(data["result"])
        if state == "cancelled":
            raise RequestCancelled(data.get("error") or "request was cancelled")
        raise EngineError(data.get("error") or f"generation ended in state {state!r}")

    async def cancel(self, request_id: str) -> bool:
        try:
            data = await self._call("DELETE", f"/v1/generations/{request_id}")
        except UnknownRequest:
            return False
        return bool(data.get("cancelled"))

    async def status(self, *, retries: int | None = None) -> dict[str, Any]:
        """The service's load summary (``GET /v1/status``)."""
        return await self._call("GET", "/v1/status", retries=retries)

    async def info(self, *, retries: int | None = None) -> EngineInfo:
        """What the service serves now (``GET /v1/info``)."""
        return EngineInfo.from_json(await self._call("GET", "/v1/info", retries=retries))

    async def reload(self, checkpoint_dir: str) -> EngineInfo:
        """``POST /admin/reload``: the service loads ``checkpoint_dir`` (a path on its machine) and swaps it in
        between passes. Needs the service's token. Not retried: a retry could queue a second reload."""
        data = await self._call("POST", "/admin/reload", body={"checkpoint_dir": str(checkpoint_dir)}, retries=0,
                                timeout_s=self.reload_timeout)
        return EngineInfo.from_json(data)

    async def close(self) -> None:
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()


# -- several services -----------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Backend:
    engine: HttpEngine
    load: float = 0.0  # candidates queued + running at the last probe
    pending: float = 0.0  # candidates we sent since that probe
    probed_at: float = float("-inf")
    dead_until: float = float("-inf")

    @property
    def score(self) -> float:
        return self.load + self.pending


class MultiEngine:
    """Several :class:`HttpEngine` s behind one :class:`Engine`: each submit goes to the least-loaded live one.

    Load is the service's queued + running candidates (``GET /v1/status``, probed at most every
    ``probe_interval`` seconds) plus what this client sent since. A service that cannot be reached is
    skipped for ``dead_retry`` seconds, then probed again. Later calls for a request go where it was sent.

    Fail-over: when the service a request was sent to stops answering before its result is in (killed, its
    machine gone), :meth:`result` sends the same request (same id and seed, so the same images) to another live
    service and waits for it there; each request moves at most once per service.
    """

    def __init__(
        self,
        engines: Sequence[HttpEngine],
        *,
        probe_interval: float = 1.0,
        dead_retry: float = 5.0,
        probe_timeout: float = 2.0,
        max_tracked: int = 100_000,
    ) -> None:
        if not engines:
            raise ValueError("MultiEngine needs at least one engine")
        self.backends = [_Backend(e) for e in engines]
        self.probe_interval = float(probe_interval)
        self.dead_retry = float(dead_retry)
        self.probe_timeout = float(probe_timeout)
        self.max_tracked = int(max_tracked)
        self._background: set[asyncio.Task] = set()
        self._routes: OrderedDict[str, _Backend] = OrderedDict()
        self._requests: dict[str, GenerationRequest] = {}  # what each routed request was, for fail-over
        self._probe_lock = asyncio.Lock()

    @classmethod
    def from_urls(cls, urls: Sequence[str], token: str | None = None, **opts: Any) -> MultiEngine:
        http_keys = {"timeout", "retries", "backoff", "max_backoff"}
        http = {k: v for k, v in opts.items() if k in http_keys}
        rest = {k: v for k, v in opts.items() if k not in http_keys}
        return cls([HttpEngine(u, token, **http) for u in urls], **rest)

    def _mark_dead(self, backend: _Backend) -> None:
        backend.dead_until = time.monotonic() + self.dead_retry

    async def _probe(self, backend: _Backend) -> None:
        try:  # a service that accepts connections but never answers must not hold routing up for long
            status = await asyncio.wait_for(backend.engine.status(retries=0), self.probe_timeout)
        except TimeoutError:
            log.warning("engine %s did not answer the status probe within %.1fs", backend.engine.base_url,
                        self.probe_timeout)
            self._mark_dead(backend)
            return
        except EngineError as exc:  # unreachable, or refusing us (e.g. a wrong token): skip it for a while
            if not isinstance(exc, EngineUnavailable):
                log.warning("engine %s refused the status probe: %s", backend.engine.base_url, exc)
            self._mark_dead(backend)
            return
        backend.load = float(status.get("queued_candidates", 0)) + float(status.get("running_candidates", 0))
        backend.pending = 0.0
        backend.probed_at = time.monotonic()
        backend.dead_until = float("-inf")

    async def refresh(self, force: bool = False) -> None:
        """Probe every live backend whose figures are stale; dead ones whose retry time has come are probed in
        the background while a live one is left (inline, with ``force`` or when none is), so a hung service
        does not delay submits to the healthy ones."""
        async with self._probe_lock:
            now = time.monotonic()
            never_dead = float("-inf")
            due = [b for b in self.backends if now >= b.dead_until]
            stale = [b for b in due
                     if b.dead_until == never_dead and (force or now - b.probed_at >= self.probe_interval)]
            revive = [b for b in due if b.dead_until != never_dead]
            if revive and not force and self.live():
                for b in revive:
                    b.dead_until = now + self.dead_retry  # one background probe at a time per backend
                    self._in_background(self._probe(b))
                revive = []
            await asyncio.gather(*(self._probe(b) for b in stale + revive))

    def live(self) -> list[_Backend]:
        now = time.monotonic()
        return [b for b in self.backends if now >= b.dead_until and b.probed_at > float("-inf")]

    async def submit(self, request: GenerationRequest) -> str:
        request.validate()
        await self.refresh()
        for backend in sorted(self.live(), key=lambda b: b.score):
            try:
                rid = await backend.engine.submit(request, retries=0)
            except EngineUnavailable:
                # a timeout or a lost reply does not say the job was not created: ask before failing over,
                # or the request would run twice
                holds = await self._holds(backend, request.request_id)
                if holds:
                    rid = request.request_id
                else:
                    self._mark_dead(backend)
                    if holds is None:  # no answer either: if the job reached it after all, cancel it there
                        self._in_background(self._cancel_stray(backend, request.request_id))
                    continue
            backend.pending += request.n
            self._routes[rid] = backend
            self._requests[rid] = request
            while len(self._routes) > self.max_tracked:
                old, _ = self._routes.popitem(last=False)
                self._requests.pop(old, None)
            return rid
        raise EngineUnavailable("no engine service is reachable")

    async def _holds(self, backend: _Backend, request_id: str) -> bool | None:
        """Whether ``backend`` has the request: True, False (it said so), or None (it did not answer)."""
        try:
            await asyncio.wait_for(backend.engine.get(request_id, retries=0), self.probe_timeout)
        except UnknownRequest:
            return False
        except (EngineError, TimeoutError):
            return None
        return True

    async def _cancel_stray(self, backend: _Backend, request_id: str) -> None:
        """Cancel a request that may have reached ``backend`` after it was sent elsewhere (best effort: the
        engine's own retries; a service that stays down has lost the job anyway)."""
        try:
            if await backend.engine.cancel(request_id):
                log.warning("cancelled request %s on %s: it arrived there after it was sent elsewhere",
                            request_id, backend.engine.base_url)
        except EngineError as exc:
            log.info("could not cancel a possible stray copy of %s on %s: %s", request_id,
                     backend.engine.base_url, exc)

    def _in_background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _route(self, request_id: str) -> HttpEngine:
        backend = self._routes.get(request_id)
        if backend is None:
            raise UnknownRequest(f"unknown request id {request_id!r}")
        return backend.engine

    def events(self, request_id: str) -> AsyncIterator[Progress]:
        return self._route(request_id).events(request_id)

    async def result(self, request_id: str, timeout: float | None = None) -> GenerationResult:
        async def wait() -> GenerationResult:
            tried: set[int] = set()
            while True:
                backend = self._routes.get(request_id)
                if backend is None:
                    raise UnknownRequest(f"unknown request id {request_id!r}")
                tried.add(id(backend))
                try:
                    return await backend.engine.result(request_id)
                except EngineUnavailable:
                    if not await self._fail_over(request_id, backend, tried):
                        raise

        return await asyncio.wait_for(wait(), timeout)

    async def _fail_over(self, request_id: str, lost: _Backend, tried: set[int]) -> bool:
        """Send a request whose service stopped answering to another live one; False when none takes it."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._mark_dead(lost)
        await self.refresh()
        for backend in sorted(self.live(), key=lambda b: b.score):
            if id(backend) in tried:
                continue
            try:
                await backend.engine.submit(request, retries=0)
            except DuplicateRequest:  # it arrived there before (a retried fail-over): wait for it there
                pass
            except EngineError as exc:
                log.warning("fail-over of %s to %s failed: %s", request_id, backend.engine.base_url, exc)
                self._mark_dead(backend)
                continue
            log.warning("engine %s stopped answering; request %s sent again to %s", lost.engine.base_url,
                        request_id, backend.engine.base_url)
            backend.pending += request.n
            self._routes[request_id] = backend
            return True
        return False

    async def cancel(self, request_id: str) -> bool:
        try:
            engine = self._route(request_id)
        except UnknownRequest:
            return False
        return await engine.cancel(request_id)

    def engine_for(self, request_id: str) -> HttpEngine:
        """Which service a request was sent to."""
        return self._route(request_id)

    async def infos(self) -> dict[str, EngineInfo]:
        """Each service's :meth:`HttpEngine.info`, by URL; a service that does not answer within ``probe_timeout``
        is left out."""

        async def one(backend: _Backend) -> EngineInfo | None:
            try:
                return await asyncio.wait_for(backend.engine.info(retries=0), self.probe_timeout)
            except (EngineError, TimeoutError) as exc:
                if not isinstance(exc, EngineUnavailable | TimeoutError):
                    log.warning("engine %s refused the info request: %s", backend.engine.base_url, exc)
                return None

        found = await asyncio.gather(*(one(b) for b in self.backends))
        return {b.engine.base_url: info for b, info in zip(self.backends, found, strict=True) if info is not None}

    async def info(self) -> EngineInfo:
        """What the services serve: their common info. Raises :class:`EngineError` naming them when they differ (a
        :meth:`reload` under way), :class:`EngineUnavailable` when none answers."""
        infos = await self.infos()
        if not infos:
            raise EngineUnavailable("no engine service is reachable")
        if len(set(infos.values())) > 1:
            serving = ", ".join(f"{url}: {i.checkpoint_id} ({i.attention})" for url, i in infos.items())
            raise EngineError(f"the engine services serve different checkpoints or backends: {serving}")
        return next(iter(infos.values()))

    async def reload(self, checkpoint_dir: str) -> EngineInfo:
        """Reload every service, one after the other, so the others keep serving while one loads. The first failure
        stops the rollout and is raised: the services before it serve the new checkpoint, the rest the old one
        (:meth:`infos` tells which). Returns the last service's info."""
        info: EngineInfo | None = None
        for backend in self.backends:
            info = await backend.engine.reload(checkpoint_dir)
        assert info is not None
        return info

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(b.engine.close() for b in self.backends))


# -- building one ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """Which engine :func:`connect` builds: engine services over HTTP (``mode="http"``: ``urls``, ``token``) or the
    model in this process from ``checkpoint_dir`` (``mode="inprocess"``).

    In-process only: ``dtype`` of DalleBart's weights and activations (bfloat16 halves the memory; logits stay
    float32); ``warmup`` compiles every batch size while idle (without it each pass compiles only what it needs:
    one request at a time, as at a terminal); ``native_attention`` None lets the sampler decide; ``model_nice``
    is the model threads' CPU priority below the event loop (``engine.priority``); ``xla_cache_dir`` is XLA's
    persistent compile cache (``engine.compile_cache``: None is its default directory, "off" none)."""

    mode: str = "inprocess"
    urls: tuple[str, ...] = ()
    token: str | None = None
    checkpoint_dir: str | None = None
    dtype: str = "float32"
    warmup: bool = True
    native_attention: bool | None = None
    model_nice: int = DEFAULT_MODEL_NICE
    xla_cache_dir: str | None = None


def connect(options: EngineOptions) -> InProcessEngine | HttpEngine | MultiEngine:
    """The engine ``options`` ask for: one :class:`HttpEngine` for one URL, a :class:`MultiEngine` for several, or
    an :class:`InProcessEngine` over the checkpoint's pipeline. The model's modules (JAX) are imported only for the
    in-process engine. Raises :class:`EngineUnavailable` with a one-line message when it cannot be built."""
    try:
        if options.mode == "http":
            if not options.urls:
                raise EngineUnavailable("the HTTP engine needs at least one engine service URL")
            if len(options.urls) == 1:
                return HttpEngine(options.urls[0], options.token)
            return MultiEngine.from_urls(options.urls, options.token)
        from engine.compile_cache import configure
        from engine.pipeline import load_pipeline

        configure(options.xla_cache_dir)  # before the first compile: reuse last run's programs
        pipeline = load_pipeline(options.checkpoint_dir, dtype=options.dtype, eager_text_programs=options.warmup,
                                 native_attention=options.native_attention)
        return InProcessEngine(pipeline, warmup=options.warmup, model_nice=options.model_nice)
    except EngineUnavailable:
        raise
    except ImportError as exc:
        raise EngineUnavailable(f"the model engine is not available in this installation ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise EngineUnavailable(f"could not load the model from {options.checkpoint_dir}: {first}") from exc
