"""The engine as an HTTP service (aiohttp): generation jobs, progress events, health and metrics.

Routes (all JSON; errors are ``{"error": "..."}`` with a 4xx/5xx status):

- ``POST /v1/generations`` → 202 ``{"id": ...}`` (body: ``GenerationRequest`` fields; unknown fields refused)
- ``GET /v1/generations/{id}`` → state, queue position, progress and, once done, ``GenerationResult.to_json()``
- ``GET /v1/generations/{id}/events`` → Server-Sent Events of ``Progress.to_json()``, ending at a final state
  (at most ``max_subscribers`` streams open on one job; more get 429)
- ``DELETE /v1/generations/{id}`` → cancels a queued or running request
- ``GET /v1/status`` → load summary (queue depth, candidates waiting/running) used for least-loaded routing
- ``GET /v1/info`` → ``EngineInfo.to_json()``: the active checkpoint's id, the attention backend, the dtype
- ``POST /admin/reload`` (body ``{"checkpoint_dir": "..."}``, a path on this machine) → 200 with the new info once
  the checkpoint serves (:meth:`Batcher.reload`: loaded on the model thread, swapped in between passes); 400 when it
  cannot be loaded (the old one keeps serving). Refused (403) when the service runs without a token.
- ``GET /healthz`` (never needs the token) and ``GET /metrics`` (Prometheus text, the app's own registry)
- ``GET /openapi.json`` (never needs the token): this API as OpenAPI 3.1 (:mod:`engine.openapi`)

A malformed or oversized request is answered 400 / 413 and logged as one warning line, never with a traceback.
Every route but ``/healthz`` needs ``Authorization: Bearer <token>`` when a token is set; without one the
server only binds a loopback address. Several clients can each have their own named token (``ENGINE_TOKENS``,
:mod:`engine.auth`): a job is then read, followed and cancelled only by the client that made it (any other gets
404, as for an unknown id), and admin routes need the operator's ``ENGINE_TOKEN``. The model runs in the batcher's
worker thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from engine.api import BadRequest, EngineError, GenerationRequest, Pipeline
from engine.auth import DEFAULT_CLIENT, Clients, JobOwners
from engine.batching import TERMINAL, Batcher, DuplicateRequest, QueueFull, ShuttingDown, UnknownRequest
from engine.metrics import EngineMetrics
from engine.openapi import openapi_spec
from engine.priority import DEFAULT_MODEL_NICE

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fullmatch: no trailing newline; "." / ".." refused apart
_REQUEST_TYPES: dict[str, type] = {
    "prompt": str,
    "n": int,
    "seed": int,
    "request_id": str,
    "preview_every": int,
    "first_index": int,
    "image_prefix": list,
}


@dataclass
class ServerSettings:
    """How the service binds, authenticates, batches and bounds its memory."""

    host: str = "127.0.0.1"
    port: int = 8808
    token: str | None = None  # ENGINE_TOKEN: the operator's client ("default"), the one admin routes accept
    tokens: dict[str, str] = field(default_factory=dict, repr=False)  # ENGINE_TOKENS: {client name: its token}
    window_ms: float = 10.0
    max_batch: int | None = None  # cap candidates per pass below the pipeline's biggest bucket
    max_queue: int = 1024
    result_ttl: float = 600.0  # seconds a finished result stays retrievable
    max_result_bytes: int = 512 * 2**20  # finished results held at once, in bytes (the oldest go first)
    max_body_bytes: int = 64 * 1024
    shutdown_grace: float = 10.0  # seconds in-flight work may finish on shutdown before it is cancelled
    shutdown_linger: float = 5.0  # after that, seconds clients get to fetch what finished during the drain
    warmup: bool = False  # compile every batch bucket while idle (python -m engine serve turns it on)
    heartbeat: float = 15.0  # SSE keep-alive comment interval
    max_subscribers: int = 16  # event streams open at once on one job; more are refused (429)
    model_nice: int = DEFAULT_MODEL_NICE  # the model's threads run at this nice value, below the event loop

    def __repr__(self) -> str:  # the tokens stay out of logs and tracebacks
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                          if f.name not in ("token", "tokens"))
        return f"ServerSettings(token={'***' if self.token else None!r}, clients={sorted(self.tokens)}, {shown})"

    def validate(self) -> None:
        Clients(self.token, self.tokens)  # raises ValueError for an empty, unnamed or shared token
        if self.token is None and not self.tokens and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host!r} without a token: set --token or ENGINE_TOKEN, "
                "or bind a loopback address"
            )
        if not (0 <= self.port < 65536):
            raise ValueError("port must be between 0 and 65535")
        if self.window_ms < 0 or self.shutdown_grace < 0 or self.shutdown_linger < 0:
            raise ValueError("window_ms, shutdown_grace and shutdown_linger must be >= 0")
        if self.result_ttl <= 0 or self.max_result_bytes <= 0:
            raise ValueError("result_ttl and max_result_bytes must be > 0 (a finished result must stay retrievable)")
        if self.max_queue < 1 or self.max_body_bytes < 1024 or self.heartbeat <= 0 or self.max_subscribers < 1:
            raise ValueError("max_queue must be >= 1, max_body_bytes >= 1024, heartbeat > 0 and max_subscribers >= 1")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not 0 <= self.model_nice <= 19:
            raise ValueError("model_nice must be between 0 (off) and 19")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})  # answered without a token
BATCHER = web.AppKey("batcher", Batcher)
SETTINGS = web.AppKey("settings", ServerSettings)
CLIENTS = web.AppKey("clients", Clients)
OWNERS = web.AppKey("owners", JobOwners)
STREAMS = web.AppKey("streams", collections.Counter)  # job id -> event streams open on it now
METRICS = web.AppKey("metrics", EngineMetrics)
STARTED = web.AppKey("started", float)
# ids in flight when a drain began whose finished result no client has read yet (only filled by the drain, so it
# stays as small as the work in flight then)
UNFETCHED = web.AppKey("unfetched", set)


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def parse_generation_request(data: Any) -> GenerationRequest:
    """A JSON body → a validated GenerationRequest; raises BadRequest with a message naming the problem."""
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    known = {f.name for f in dataclasses.fields(GenerationRequest)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    for name, value in data.items():
        if name in _REQUEST_TYPES:
            _check_type(name, value, _REQUEST_TYPES[name])
    if "prompt" not in data:
        raise BadRequest("prompt is required")
    if "request_id" in data and (not _ID_RE.fullmatch(data["request_id"]) or data["request_id"] in (".", "..")):
        raise BadRequest("request_id must be 1-64 characters of letters, digits, '_', '-' or '.'")
    request = GenerationRequest.from_json(data)
    request.validate()
    return request


def _check_type(name: str, value: Any, kind: type) -> None:
    if kind is list:
        ok = isinstance(value, list)
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        what = {str: "a string", int: "an integer", list: "a list"}.get(kind, "a number")
        raise BadRequest(f"{name} must be {what}")


# -- middlewares ----------------------------------------------------------------------------------------------


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413...) as JSON like ours; an unexpected exception as a counted JSON 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return _error(exc.status, exc.reason, **headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # noqa: BLE001 - logged with its traceback; the client gets JSON, not aiohttp's text page
        log.exception("%s %s failed", request.method, request.path)
        request.app[METRICS].errors.labels("internal").inc()
        return _error(500, "internal engine error")


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """Names the request's client (``request["client"]``: None when the service has no tokens)."""
    clients = request.app[CLIENTS]
    request["client"] = None
    if not clients.required or request.path in OPEN_PATHS:
        return await handler(request)
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    # non-UTF-8 header bytes arrive as surrogates: they are simply a wrong token
    given = value.strip().encode("utf-8", "surrogateescape")
    client = clients.identify(given) if scheme.lower() == "bearer" else None
    if client is None:
        request.app[METRICS].errors.labels("unauthorized").inc()
        return _error(401, "missing or invalid bearer token", **{"WWW-Authenticate": 'Bearer realm="engine"'})
    request["client"] = client
    return await handler(request)


def _refused(request: web.Request, status: int, message: str) -> web.Response:
    """A malformed or oversized request: one warning line (who, what, why; never the body), no traceback."""
    log.warning("refused %s %s from %s (client %s): %d %s", request.method, request.path, request.remote,
                request.get("client") or "-", status, message[:200])
    return _error(status, message)


def _known(batcher: Batcher, rid: str) -> bool:
    try:
        batcher.status(rid)
    except UnknownRequest:
        return False
    return True


def _not_theirs(request: web.Request, rid: str) -> web.Response | None:
    """404 (as for an unknown id) when the job is another client's, else None."""
    if request.app[OWNERS].allows(rid, request["client"]):
        return None
    request.app[METRICS].errors.labels("not_found").inc()
    return _error(404, str(UnknownRequest(f"unknown request id {rid!r}")))


# -- handlers -------------------------------------------------------------------------------------------------


async def post_generation(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.errors.labels("too_large").inc()
        return _refused(request, 413, f"request body is larger than {app[SETTINGS].max_body_bytes} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        metrics.errors.labels("bad_request").inc()
        return _refused(request, 400, f"malformed JSON: {exc}")
    try:
        gen = parse_generation_request(data)
    except BadRequest as exc:
        metrics.errors.labels("bad_request").inc()
        return _refused(request, 400, str(exc))
    batcher = app[BATCHER]
    try:
        rid = await batcher.submit(gen)
    except DuplicateRequest as exc:
        return web.json_response({"error": str(exc), "id": gen.request_id}, status=409)
    except BadRequest as exc:
        return _refused(request, 400, str(exc))
    except QueueFull as exc:
        return _error(503, str(exc), **{"Retry-After": "5"})
    except ShuttingDown as exc:
        return _error(503, str(exc))
    app[OWNERS].record(rid, request["client"])
    status = batcher.status(rid)
    location = f"/v1/generations/{rid}"
    return web.json_response(
        {
            "id": rid,
            "state": status.state,
            "queue_position": status.queue_position,
            "links": {"self": location, "events": f"{location}/events"},
        },
        status=202,
        headers={"Location": location},
    )


def _status_json(batcher: Batcher, rid: str) -> dict[str, Any]:
    progress = batcher.status(rid)
    result = batcher.result_of(rid)
    return {
        "id": rid,
        "state": progress.state,
        "queue_position": progress.queue_position,
        "tokens_done": progress.tokens_done,
        "tokens_total": progress.tokens_total,
        "error": progress.error,
        "request": batcher.request_of(rid).to_json(),
        "result": result.to_json() if result is not None else None,
    }


async def get_generation(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if (refused := _not_theirs(request, rid)) is not None:
        return refused
    try:
        body = _status_json(request.app[BATCHER], rid)
        if body.get("state") in TERMINAL:
            request.app[UNFETCHED].discard(rid)
        return web.json_response(body)
    except UnknownRequest as exc:
        request.app[METRICS].errors.labels("not_found").inc()
        return _error(404, str(exc))


async def generation_events(request: web.Request) -> web.StreamResponse:
    batcher = request.app[BATCHER]
    rid = request.match_info["id"]
    if (refused := _not_theirs(request, rid)) is not None:
        return refused
    streams = request.app[STREAMS]
    if streams[rid] >= request.app[SETTINGS].max_subscribers:
        request.app[METRICS].errors.labels("too_many_streams").inc()
        return _error(429, f"too many event streams open on {rid!r}; poll GET /v1/generations/{rid} instead",
                      **{"Retry-After": "5"})
    try:
        sub, event = batcher.subscribe(rid)
    except UnknownRequest as exc:
        request.app[METRICS].errors.labels("not_found").inc()
        return _error(404, str(exc))
    streams[rid] += 1
    heartbeat = request.app[SETTINGS].heartbeat
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    try:
        await resp.prepare(request)
        seq = 0
        while True:
            if event is None:
                await resp.write(b": keep-alive\n\n")
            else:
                seq += 1
                data = json.dumps(event.to_json(), separators=(",", ":"))
                await resp.write(f"id: {seq}\nevent: progress\ndata: {data}\n\n".encode())
                if event.state in TERMINAL:
                    break
            event = await sub.get(timeout=heartbeat)
    except (ConnectionResetError, ConnectionError):
        log.debug("events client for %s went away", rid)
    finally:
        batcher.unsubscribe(rid, sub)
        streams[rid] -= 1
        if streams[rid] <= 0:
            del streams[rid]
    return resp


async def delete_generation(request: web.Request) -> web.Response:
    batcher = request.app[BATCHER]
    rid = request.match_info["id"]
    if (refused := _not_theirs(request, rid)) is not None:
        return refused
    try:
        batcher.status(rid)
    except UnknownRequest as exc:
        request.app[METRICS].errors.labels("not_found").inc()
        return _error(404, str(exc))
    cancelled = await batcher.cancel(rid)
    try:
        state = batcher.status(rid).state
    except UnknownRequest:  # evicted meanwhile: it was cancelled or had finished
        state = "cancelled" if cancelled else "unknown"
    return web.json_response({"id": rid, "cancelled": cancelled, "state": state})


async def get_status(request: web.Request) -> web.Response:
    load = request.app[BATCHER].load()
    load["uptime_s"] = time.monotonic() - request.app[STARTED]
    return web.json_response(load)


async def get_info(request: web.Request) -> web.Response:
    return web.json_response(request.app[BATCHER].info().to_json())


async def post_reload(request: web.Request) -> web.Response:
    """Swap in another checkpoint (see the module docstring); the reload goes on if the client goes away."""
    app = request.app
    if app[SETTINGS].token is None:
        app[METRICS].errors.labels("unauthorized").inc()
        return _error(403, "admin routes need the engine to run with a token (--token or ENGINE_TOKEN)")
    if request["client"] != DEFAULT_CLIENT:
        app[METRICS].errors.labels("unauthorized").inc()
        return _error(403, "admin routes need the operator's ENGINE_TOKEN, not a client's from ENGINE_TOKENS")
    try:
        data = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return _error(400, f"malformed JSON: {exc}")
    directory = data.get("checkpoint_dir") if isinstance(data, dict) else None
    if not isinstance(directory, str) or not directory.strip() or set(data) != {"checkpoint_dir"}:
        return _error(400, 'body must be {"checkpoint_dir": "<a checkpoint directory on the engine\'s machine>"}')
    try:
        info = await asyncio.shield(app[BATCHER].reload(directory))
    except BadRequest as exc:
        return _error(400, str(exc))
    except ShuttingDown as exc:
        return _error(503, str(exc))
    except EngineError as exc:
        return _error(500, str(exc))
    log.info("reloaded: now serving %s (%s attention)", info.checkpoint_id, info.attention)
    return web.json_response(info.to_json())


async def healthz(request: web.Request) -> web.Response:
    batcher = request.app[BATCHER]
    info = batcher.info()
    body = {
        "status": "draining" if batcher.closing else "ok",
        "checkpoint_id": info.checkpoint_id,
        "dtype": info.dtype,  # None: not a model pipeline
        "attention": info.attention,  # the decode attention backend ("xla", "native"); None: not a model pipeline
        "queue_depth": batcher.queue_depth,
        "warming_up": bool(batcher.load()["cold_buckets"]),  # still compiling batch sizes while idle
    }
    return web.json_response(body, status=503 if batcher.closing else 200)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec())


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


# -- app lifecycle --------------------------------------------------------------------------------------------


async def _on_startup(app: web.Application) -> None:
    app[BATCHER].start()
    app[STARTED] = time.monotonic()


async def drain(app: web.Application) -> None:
    """Graceful stop while the socket still serves: refuse new work (503), finish in-flight work for up to
    ``shutdown_grace`` seconds and cancel the rest, then keep answering for up to ``shutdown_linger`` seconds
    until every client has fetched what finished (a client learns "done" from the event stream and fetches the
    result with a new GET, which a closed socket would refuse)."""
    batcher, settings, unfetched = app[BATCHER], app[SETTINGS], app[UNFETCHED]
    unfetched.update(batcher.active_ids())
    await batcher.close(drain_timeout=settings.shutdown_grace)

    def waiting_for_a_client() -> bool:
        for rid in list(unfetched):
            try:
                if batcher.status(rid).state == "done":
                    return True
            except UnknownRequest:
                pass
            unfetched.discard(rid)  # cancelled, failed or evicted: nobody will fetch a result
        return False

    deadline = time.monotonic() + settings.shutdown_linger
    while waiting_for_a_client() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _on_shutdown(app: web.Application) -> None:
    """Fallback when the runner is cleaned up without :func:`drain` (no-op after it): close the batcher."""
    await app[BATCHER].close(drain_timeout=app[SETTINGS].shutdown_grace)


def create_app(pipeline: Pipeline, settings: ServerSettings | None = None, *,
               loader: Callable[[str], Pipeline] | None = None) -> web.Application:
    """The aiohttp application serving ``pipeline`` (its own batcher and metrics registry). ``loader``: how
    ``/admin/reload`` loads a checkpoint directory (default: the pipeline's ``with_checkpoint``)."""
    settings = settings or ServerSettings()
    settings.validate()
    if settings.token is None and not settings.tokens:
        log.warning("no engine token set: authentication is DISABLED (bound to loopback %s)", settings.host)
    app = web.Application(middlewares=[_json_errors, _auth], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = EngineMetrics()
    app[STARTED] = time.monotonic()
    app[UNFETCHED] = set()
    app[CLIENTS] = Clients(settings.token, settings.tokens)
    app[STREAMS] = collections.Counter()
    app[BATCHER] = Batcher(
        pipeline,
        window_ms=settings.window_ms,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        result_ttl=settings.result_ttl,
        max_result_bytes=settings.max_result_bytes,
        metrics=app[METRICS],
        warmup=settings.warmup,
        model_nice=settings.model_nice,
        loader=loader,
    )
    app[OWNERS] = JobOwners(alive=functools.partial(_known, app[BATCHER]))
    app.router.add_post("/v1/generations", post_generation)
    app.router.add_get("/v1/generations/{id}", get_generation)
    app.router.add_get("/v1/generations/{id}/events", generation_events)
    app.router.add_delete("/v1/generations/{id}", delete_generation)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/info", get_info)
    app.router.add_post("/admin/reload", post_reload)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


@dataclass
class RunningServer:
    """A started service (for tests, benchmarks and embedding): its URL, app and runner."""

    app: web.Application
    runner: web.AppRunner
    url: str

    @property
    def batcher(self) -> Batcher:
        return self.app[BATCHER]

    async def stop(self) -> None:
        """Graceful stop: drain (while still answering), then close the socket and clean up."""
        await drain(self.app)
        await self.runner.cleanup()


async def start_server(pipeline: Pipeline, settings: ServerSettings | None = None, *,
                       loader: Callable[[str], Pipeline] | None = None) -> RunningServer:
    """Start serving on the running loop (``port=0`` picks a free port); returns once it accepts requests."""
    settings = settings or ServerSettings()
    app = create_app(pipeline, settings, loader=loader)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_grace + 5.0, access_log=None)
    await runner.setup()
    sock = _bind(settings.host, settings.port)
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return RunningServer(app, runner, f"http://{host}:{port}")


def serve(pipeline: Pipeline, settings: ServerSettings) -> None:
    """Run the service until SIGINT/SIGTERM (blocking), then shut down gracefully (:meth:`RunningServer.stop`)."""
    asyncio.run(_serve_until_signalled(pipeline, settings))


async def _serve_until_signalled(pipeline: Pipeline, settings: ServerSettings) -> None:
    server = await start_server(pipeline, settings)
    log.info("engine serving %s on %s", getattr(pipeline, "checkpoint_id", "?"), server.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("engine shutting down: draining in-flight work")
        await server.stop()
