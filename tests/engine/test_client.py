"""Engine clients: in-process, HTTP (retries, 4xx, SSE reconnects) and several services behind one client."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time

import pytest
from aiohttp import web

from engine.api import BadRequest, EngineError, EngineInfo, GenerationRequest, RequestCancelled
from engine.batching import DuplicateRequest, UnknownRequest
from engine.client import EngineUnavailable, HttpEngine, InProcessEngine, MultiEngine, SseParser
from engine.fake import FakePipeline
from engine.server import ServerSettings, start_server

TOKEN = "tok"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_raw(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


# -- in-process ---------------------------------------------------------------------------------------------


async def test_in_process_engine_implements_the_protocol():
    fake = FakePipeline(fixed_latency=0.05, chunk_tokens=64)
    engine = InProcessEngine(fake, window_ms=5)
    req = GenerationRequest("in process", n=2, seed=3)
    rid = await engine.submit(req)
    states = [ev.state async for ev in engine.events(rid)]
    assert states[-1] == "done" and "running" in states
    res = await engine.result(rid, timeout=5)
    [ref] = FakePipeline().generate([req])
    assert [im.png for im in res.images] == [im.png for im in ref.images]
    with pytest.raises(BadRequest):
        await engine.submit(GenerationRequest("", n=1))
    slow = InProcessEngine(FakePipeline(fixed_latency=1.0, chunk_tokens=16), window_ms=0)
    r1 = await slow.submit(GenerationRequest("a"))
    r2 = await slow.submit(GenerationRequest("b"))
    assert await slow.cancel(r2) is True and await slow.cancel(r2) is False
    with pytest.raises(RequestCancelled):
        await slow.result(r2)
    await slow.close()  # cancels r1 and waits for the model thread
    with pytest.raises(RequestCancelled, match="shutting down"):
        await slow.result(r1)
    await engine.close()


# -- SSE parsing --------------------------------------------------------------------------------------------


def test_sse_parser_handles_multiline_comments_crlf_and_ids():
    parser = SseParser()
    lines = [": keep-alive\r\n", "\r\n", "id: 7\r\n", "event: progress\r\n", 'data: {"a":\r\n', "data: 1}\r\n", "\r\n"]
    lines += ["data:no-space\n", "\n", "retry: 10\n", "\n"]
    events = [ev for ev in map(parser.feed_line, lines) if ev is not None]
    assert len(events) == 2
    assert events[0].id == "7" and events[0].event == "progress" and json.loads(events[0].data) == {"a": 1}
    assert events[1].event == "message" and events[1].data == "no-space"
    # the same stream as bytes cut at awkward places (inside a CRLF, inside a multi-byte character)
    raw = "".join(lines).replace("no-space", "nö-späce").encode()
    chunked = SseParser()
    got = [ev for i in range(0, len(raw), 3) for ev in chunked.feed(raw[i : i + 3])]
    assert [(ev.event, ev.data) for ev in got] == [("progress", '{"a":\n1}'), ("message", "nö-späce")]


# -- HTTP client against scripted servers --------------------------------------------------------------------


async def test_http_retries_5xx_and_recognises_its_own_resubmit():
    calls = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(body["request_id"])
        if len(calls) == 1:
            return web.json_response({"error": "bad gateway"}, status=502)  # ...but the job did arrive
        if len(calls) == 2:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"error": "already in use", "id": body["request_id"]}, status=409)

    app = web.Application()
    app.router.add_post("/v1/generations", handler)
    runner, url = await start_raw(app)
    engine = HttpEngine(url, TOKEN, timeout=5, retries=3, backoff=0.01)
    try:
        req = GenerationRequest("retry me")
        assert await engine.submit(req) == req.request_id
        assert calls == [req.request_id] * 3
        with pytest.raises(DuplicateRequest):  # a 409 on the first attempt is a real conflict
            await engine.submit(req)
    finally:
        await engine.close()
        await runner.cleanup()


async def test_http_never_retries_4xx_and_gives_up_after_retries():
    hits = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        hits["n"] += 1
        return web.json_response({"error": "prompt is not allowed here"}, status=422)

    async def always_500(request: web.Request) -> web.Response:
        hits["n"] += 1
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_post("/v1/generations", handler)
    app.router.add_get("/v1/status", always_500)
    runner, url = await start_raw(app)
    engine = HttpEngine(url, None, timeout=5, retries=2, backoff=0.01)
    try:
        with pytest.raises(BadRequest, match="prompt is not allowed here"):
            await engine.submit(GenerationRequest("x"))
        assert hits["n"] == 1
        hits["n"] = 0
        with pytest.raises(EngineUnavailable, match="HTTP 500: boom"):
            await engine.status()
        assert hits["n"] == 3
    finally:
        await engine.close()
        await runner.cleanup()
    dead = HttpEngine(f"http://127.0.0.1:{free_port()}", timeout=2, retries=2, backoff=0.01)
    with pytest.raises(EngineUnavailable, match="ClientConnectorError"):
        await dead.submit(GenerationRequest("nobody home"))
    await dead.close()


async def test_http_events_reconnect_after_a_dropped_stream():
    connections = {"n": 0}

    def frame(state: str, **extra) -> bytes:
        data = {"request_id": "r1", "state": state, "queue_position": None, "tokens_done": 0, "tokens_total": 0}
        data.update(extra)
        return f"event: progress\ndata: {json.dumps(data)}\n\n".encode()

    async def events(request: web.Request) -> web.StreamResponse:
        connections["n"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if connections["n"] == 1:
            await resp.write(frame("queued", queue_position=2))
            return resp  # stream ends without a final state
        await resp.write(b": keep-alive\n\n")
        big = base64.b64encode(bytes(300_000)).decode()  # one data line far beyond aiohttp's readline limit
        await resp.write(frame("running", tokens_done=128, tokens_total=256, preview_png=big))
        await resp.write(frame("done", tokens_done=256, tokens_total=256))
        await resp.write(frame("done"))  # never read: the client stops at the first final state
        return resp

    app = web.Application()
    app.router.add_get("/v1/generations/{id}/events", events)
    runner, url = await start_raw(app)
    engine = HttpEngine(url, timeout=5, retries=2, backoff=0.01)
    try:
        seen = [ev async for ev in engine.events("r1")]
        assert [(ev.state, ev.queue_position, ev.tokens_done) for ev in seen] == [
            ("queued", 2, 0),
            ("running", None, 128),
            ("done", None, 256),
        ]
        assert seen[1].preview_png == bytes(300_000)
        assert connections["n"] == 2
    finally:
        await engine.close()
        await runner.cleanup()


async def test_http_events_ride_out_an_outage_shorter_than_the_timeout():
    """The event stream fails for ~0.5 s (a proxy reload: 503s), far more attempts than ``retries``: the client
    keeps reconnecting within ``timeout`` and gets the final state instead of failing the job."""
    connections = {"n": 0}

    async def events(request: web.Request) -> web.StreamResponse:
        connections["n"] += 1
        if connections["n"] <= 8:
            return web.json_response({"error": "reloading"}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        data = {"request_id": "r1", "state": "done", "queue_position": None, "tokens_done": 1, "tokens_total": 1}
        await resp.write(f"event: progress\ndata: {json.dumps(data)}\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_get("/v1/generations/{id}/events", events)
    runner, url = await start_raw(app)
    engine = HttpEngine(url, timeout=5, retries=2, backoff=0.05, max_backoff=0.1)
    try:
        assert [ev.state async for ev in engine.events("r1")] == ["done"]
        assert connections["n"] == 9
    finally:
        await engine.close()
        await runner.cleanup()
    gone = HttpEngine(f"http://127.0.0.1:{free_port()}", timeout=0.5, retries=2, backoff=0.05, max_backoff=0.1)
    try:  # a service that stays away: given up after the timeout
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(_drain(gone.events("r1")), 5)
    finally:
        await gone.close()


async def _drain(events) -> list:
    return [ev async for ev in events]


# -- HTTP client against the real service ------------------------------------------------------------------


async def test_http_engine_against_the_service():
    fake = FakePipeline(fixed_latency=0.3, chunk_tokens=16, batch_buckets=(1, 2, 4), fail_prompts={"kaboom"})
    server = await start_server(fake, ServerSettings(port=0, token=TOKEN, window_ms=0))
    engine = HttpEngine(server.url, TOKEN, timeout=5, retries=1, backoff=0.01)
    try:
        req = GenerationRequest("over http", n=6, seed=11, preview_every=64)  # split 4 + 2
        rid = await engine.submit(req)
        events = [ev async for ev in engine.events(rid)]
        assert events[-1].state == "done" and any(ev.preview_png for ev in events)
        res = await engine.result(rid, timeout=10)
        [ref] = FakePipeline(batch_buckets=(8,)).generate([req])
        assert {im.index: im.png for im in res.images} == {im.index: im.png for im in ref.images}
        assert [im.rank for im in res.images] == list(range(6))

        slow = await engine.submit(GenerationRequest("to cancel", n=4))
        assert await engine.cancel(slow) is True
        assert await engine.cancel(slow) is False and await engine.cancel("unknown") is False
        with pytest.raises(RequestCancelled):
            await engine.result(slow, timeout=5)
        bad = await engine.submit(GenerationRequest("kaboom"))
        with pytest.raises(EngineError, match="kaboom"):
            await engine.result(bad, timeout=5)
        with pytest.raises(UnknownRequest):
            await engine.result("never", timeout=5)
        with pytest.raises(BadRequest, match="request_id must be"):
            await engine.submit(GenerationRequest("x", request_id="bad id!"))
        wrong = HttpEngine(server.url, "wrong", timeout=5, retries=3)
        with pytest.raises(BadRequest, match="bearer token"):
            await wrong.submit(GenerationRequest("x"))
        await wrong.close()
        status = await engine.status()
        assert status["checkpoint_id"] == "fake-0" and status["capacity"] == 4
    finally:
        await engine.close()
        await server.stop()


# -- several services ---------------------------------------------------------------------------------------


async def test_multi_engine_routes_to_least_loaded_and_skips_a_stopped_server():
    def pipeline():
        return FakePipeline(fixed_latency=0.15, chunk_tokens=64, batch_buckets=(1,))

    a = await start_server(pipeline(), ServerSettings(port=0, token=TOKEN, window_ms=0, shutdown_grace=0))
    b = await start_server(pipeline(), ServerSettings(port=0, token=TOKEN, window_ms=0, shutdown_grace=0))
    b_port = int(b.url.rsplit(":", 1)[1])
    multi = MultiEngine.from_urls([a.url, b.url], TOKEN, probe_interval=0.0, dead_retry=0.3, retries=0, timeout=3)
    direct_a = HttpEngine(a.url, TOKEN)
    b2 = None
    try:
        for i in range(3):  # make A busy behind the multi-engine's back: 24 one-candidate passes
            await direct_a.submit(GenerationRequest(f"busy {i}", n=8))
        first = await multi.submit(GenerationRequest("routed 1", n=1))
        assert multi.engine_for(first).base_url == b.url
        second = await multi.submit(GenerationRequest("routed 2", n=1))
        assert multi.engine_for(second).base_url == b.url
        states = [ev.state async for ev in multi.events(first)]
        assert states[-1] == "done"
        assert len((await multi.result(second, timeout=5)).images) == 1

        await b.stop()
        third = await multi.submit(GenerationRequest("while b is down", n=1))
        assert multi.engine_for(third).base_url == a.url
        assert multi.backends[1].dead_until > time.monotonic()  # b is skipped for a while
        assert await multi.cancel(third) is True

        b2 = await start_server(pipeline(), ServerSettings(port=b_port, token=TOKEN, window_ms=0, shutdown_grace=0))
        await asyncio.sleep(0.35)  # past dead_retry: b is probed again, in the background while a serves
        await multi.refresh()
        for _ in range(200):
            if multi.backends[1] in multi.live():
                break
            await asyncio.sleep(0.02)
        fourth = await multi.submit(GenerationRequest("b is back", n=1))
        assert multi.engine_for(fourth).base_url == b.url
        assert len((await multi.result(fourth, timeout=5)).images) == 1
        with pytest.raises(UnknownRequest):
            await multi.result("not-routed")
    finally:
        await multi.close()
        await direct_a.close()
        await a.stop()
        if b2 is not None:
            await b2.stop()


async def test_multi_engine_with_every_server_down():
    multi = MultiEngine.from_urls([f"http://127.0.0.1:{free_port()}"], retries=0, timeout=2, dead_retry=10)
    with pytest.raises(EngineUnavailable, match="no engine service"):
        await multi.submit(GenerationRequest("anyone?"))
    with pytest.raises(BadRequest):
        await multi.submit(GenerationRequest("", n=1))
    await multi.close()


async def test_multi_engine_skips_a_server_that_refuses_its_token():
    good = await start_server(FakePipeline(), ServerSettings(port=0, token=TOKEN))
    other = await start_server(FakePipeline(), ServerSettings(port=0, token="another-token"))
    multi = MultiEngine.from_urls([other.url, good.url], TOKEN, retries=0, timeout=3)
    try:
        rid = await multi.submit(GenerationRequest("routed past the refusing server"))
        assert multi.engine_for(rid).base_url == good.url
        assert len((await multi.result(rid, timeout=5)).images) == 9
    finally:
        await multi.close()
        await good.stop()
        await other.stop()


async def test_multi_engine_cancels_a_copy_that_arrived_where_it_failed_over_from(monkeypatch):
    """A stalls: the POST's reply and the "do you have it?" check both time out, so the request goes to B; when
    the job turns out to have reached A after all, it is cancelled there instead of running twice."""
    import engine.server as server_mod

    created, looked_up = server_mod.post_generation, server_mod.get_generation

    async def late_reply(request):
        response = await created(request)
        await asyncio.sleep(1.5)  # past the client's timeout
        return response

    async def stalled_lookup(request):
        await asyncio.sleep(1.5)  # past the probe timeout
        return await looked_up(request)

    monkeypatch.setattr(server_mod, "post_generation", late_reply)
    monkeypatch.setattr(server_mod, "get_generation", stalled_lookup)
    a = await start_server(FakePipeline(fixed_latency=2.0), ServerSettings(port=0, token=TOKEN))
    monkeypatch.undo()
    b = await start_server(FakePipeline(), ServerSettings(port=0, token=TOKEN))
    multi = MultiEngine.from_urls([a.url, b.url], TOKEN, retries=0, timeout=0.5, probe_timeout=0.3)
    try:
        request = GenerationRequest("only once", n=1)
        rid = await multi.submit(request)
        assert multi.engine_for(rid).base_url == b.url
        assert len((await multi.result(rid, timeout=10)).images) == 1
        for _ in range(100):
            state = a.batcher.status(rid).state  # the job did reach A
            if state in ("cancelled", "done"):
                break
            await asyncio.sleep(0.05)
        assert state == "cancelled"
    finally:
        await multi.close()
        await a.stop()
        await b.stop()


async def test_multi_engine_does_not_duplicate_a_job_whose_reply_was_lost(monkeypatch):
    """The POST reached A (the job is queued there) but the reply came too late: routing must not send the same
    request to B as well, where it would run a second time."""
    import engine.server as server_mod

    created = server_mod.post_generation

    async def late_reply(request):
        response = await created(request)
        await asyncio.sleep(1.5)  # past the client's timeout
        return response

    monkeypatch.setattr(server_mod, "post_generation", late_reply)
    a = await start_server(FakePipeline(), ServerSettings(port=0, token=TOKEN))
    monkeypatch.undo()
    b = await start_server(FakePipeline(), ServerSettings(port=0, token=TOKEN))
    multi = MultiEngine.from_urls([a.url, b.url], TOKEN, retries=0, timeout=0.5)
    try:
        request = GenerationRequest("only once", n=1)
        rid = await multi.submit(request)
        assert rid == request.request_id and multi.engine_for(rid).base_url == a.url
        assert b.batcher.load()["queued_candidates"] == 0 and b.batcher.active_ids() == []
        assert len((await multi.result(rid, timeout=10)).images) == 1
    finally:
        await multi.close()
        await a.stop()
        await b.stop()


async def test_a_hung_engine_does_not_hold_up_routing_to_the_others():
    """A service that accepts connections but never answers is probed with a short timeout once, then only in
    the background: submits to the healthy service go straight through."""
    async def never_answer(reader, writer):
        await asyncio.sleep(3600)

    hung = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    hung_url = f"http://127.0.0.1:{hung.sockets[0].getsockname()[1]}"
    good = await start_server(FakePipeline(), ServerSettings(port=0, token=TOKEN))
    multi = MultiEngine.from_urls([hung_url, good.url], TOKEN, retries=0, timeout=30, dead_retry=0.2,
                                  probe_timeout=3.0, probe_interval=0.0)
    try:
        await multi.submit(GenerationRequest("first: probes both", n=1))  # waits for the hung probe once
        for i in range(3):
            await asyncio.sleep(0.25)  # past dead_retry: the hung service is due for another probe
            start = time.monotonic()
            rid = await multi.submit(GenerationRequest(f"then straight through {i}", n=1))
            assert time.monotonic() - start < 1.5  # not the 3 s probe
            assert multi.engine_for(rid).base_url == good.url
    finally:
        await multi.close()
        await good.stop()
        hung.close()


# -- the active checkpoint: info and reload -------------------------------------------------------------------


def fake_checkpoint(directory, checkpoint_id: str):
    directory.mkdir(parents=True)
    (directory / "checkpoint.json").write_text(json.dumps({"id": checkpoint_id}))
    return str(directory)


async def test_in_process_engine_info_and_reload(tmp_path):
    engine = InProcessEngine(FakePipeline(), window_ms=0)
    try:
        assert await engine.info() == EngineInfo("fake-0", None, None)
        assert await engine.reload(fake_checkpoint(tmp_path / "b", "b-2")) == EngineInfo("b-2", None, None)
        result = await engine.result(await engine.submit(GenerationRequest("after", n=1)), timeout=5)
        assert result.checkpoint_id == "b-2" and (await engine.info()).model_id == "b-2"
        with pytest.raises(BadRequest):
            await engine.reload(str(tmp_path / "nowhere"))
    finally:
        await engine.close()


async def test_multi_engine_reloads_one_service_after_the_other_and_says_when_they_differ(tmp_path):
    a = await start_server(FakePipeline(), ServerSettings(port=0, token=TOKEN, window_ms=0))
    b = await start_server(FakePipeline(), ServerSettings(port=0, token=TOKEN, window_ms=0))
    multi = MultiEngine.from_urls([a.url, b.url], TOKEN, retries=0, timeout=3)
    direct_a = HttpEngine(a.url, TOKEN)
    nxt = fake_checkpoint(tmp_path / "next", "next-1")
    try:
        assert await multi.info() == EngineInfo("fake-0", None, None)
        await direct_a.reload(nxt)  # half way through a rollout
        assert {url: i.checkpoint_id for url, i in (await multi.infos()).items()} == {a.url: "next-1", b.url: "fake-0"}
        with pytest.raises(EngineError, match="different checkpoints"):
            await multi.info()
        assert (await multi.reload(nxt)).checkpoint_id == "next-1"
        assert await multi.info() == EngineInfo("next-1", None, None)
        await b.stop()
        assert set(await multi.infos()) == {a.url}  # a service that does not answer is left out
        with pytest.raises(EngineUnavailable):
            await multi.reload(nxt)  # the rollout stops at the first service that fails
    finally:
        await multi.close()
        await direct_a.close()
        await a.stop()


async def test_the_bots_fake_engine_speaks_info_and_reload(tmp_path):
    from tests.fakes.engine import FakeEngine

    fake = FakeEngine(steps=1, step_s=0)
    assert await fake.info() == EngineInfo("fake-ckpt")
    with pytest.raises(BadRequest):
        await fake.reload(str(tmp_path / "nowhere"))
    assert (await fake.reload(fake_checkpoint(tmp_path / "ckpt-7", "ignored"))).model_id == "ckpt-7"
    result = await fake.result(await fake.submit(GenerationRequest("x", n=1)), timeout=5)
    assert result.checkpoint_id == "ckpt-7" and result.attention is None and fake.reloads == [str(tmp_path / "ckpt-7")]
    await fake.close()
