"""The engine HTTP service on a real socket (127.0.0.1, ephemeral port) with the fake pipeline."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json

import aiohttp
import numpy as np
import pytest
from PIL import Image

from engine.api import BadRequest, EngineInfo, GeneratedImage, GenerationRequest, GenerationResult
from engine.client import HttpEngine, SseParser
from engine.fake import FakePipeline
from engine.server import BATCHER, ServerSettings, create_app, parse_generation_request, start_server

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def serving(pipeline: FakePipeline, **settings):
    server = await start_server(pipeline, ServerSettings(port=0, token=TOKEN, **settings))
    try:
        async with aiohttp.ClientSession(server.url, headers=AUTH) as http:
            yield server, http
    finally:
        await server.stop()


async def sse_events(http: aiohttp.ClientSession, rid: str) -> list[dict]:
    events = []
    parser = SseParser()
    async with http.get(f"/v1/generations/{rid}/events") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            ev = parser.feed_line(line.decode())
            if ev is not None:
                assert ev.event == "progress"
                events.append(json.loads(ev.data))
    return events


async def poll_until(http, rid, states=("done", "failed", "cancelled"), timeout=10.0) -> dict:
    async def poll():
        while True:
            async with http.get(f"/v1/generations/{rid}") as resp:
                body = await resp.json()
                assert resp.status == 200, body
            if body["state"] in states:
                return body
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(poll(), timeout)


def solo_images(req: GenerationRequest) -> dict[int, tuple[bytes, list[int]]]:
    [res] = FakePipeline(batch_buckets=(64,)).generate([req])
    return {im.index: (im.png, im.tokens.tolist()) for im in res.images}


async def test_submit_poll_result_and_stream():
    async with serving(FakePipeline(fixed_latency=0.05)) as (server, http):
        async with http.post("/v1/generations", json={"prompt": "a red square", "n": 3, "seed": 5}) as resp:
            assert resp.status == 202
            sub = await resp.json()
            assert resp.headers["Location"] == f"/v1/generations/{sub['id']}"
        rid = sub["id"]
        events = await sse_events(http, rid)
        assert events[-1]["state"] == "done" and {"queued", "running"} & {e["state"] for e in events}
        running = [e for e in events if e["state"] == "running"]
        assert running and running[-1]["tokens_total"] == 256
        body = await poll_until(http, rid)
        assert body["state"] == "done" and body["queue_position"] is None and body["error"] is None
        result = GenerationResult.from_json(body["result"])
        assert result.request_id == rid and result.seed == 5 and len(result.images) == 3
        assert [im.rank for im in result.images] == [0, 1, 2]
        ref = solo_images(GenerationRequest("a red square", n=3, seed=5))
        for wire, im in zip(body["result"]["images"], result.images, strict=True):
            assert base64.b64decode(wire["png"]) == im.png == ref[im.index][0]
            assert wire["tokens"] == ref[im.index][1]
            assert set(wire) >= {"index", "rank", "clip_score", "safety", "flagged"}
            with Image.open(io.BytesIO(im.png)) as png:  # the fake's PNGs are real images
                assert png.size == (32, 32) and png.mode == "RGB"


async def test_sixteen_concurrent_http_clients_get_their_own_images():
    fake = FakePipeline(fixed_latency=0.03, batch_buckets=(1, 2, 4, 8, 16))
    async with serving(fake, window_ms=20) as (server, _):
        reqs = [GenerationRequest(f"prompt {i % 6}", n=1 + i % 3, seed=i % 4) for i in range(20)]

        async def client(req: GenerationRequest) -> GenerationResult:
            engine = HttpEngine(server.url, TOKEN, timeout=10)
            try:
                rid = await engine.submit(req)
                return await engine.result(rid, timeout=20)
            finally:
                await engine.close()

        results = await asyncio.gather(*(client(r) for r in reqs))
        for req, res in zip(reqs, results, strict=True):
            ref = solo_images(req)
            assert res.request_id == req.request_id and sorted(im.index for im in res.images) == list(range(req.n))
            for im in res.images:
                assert im.png == ref[im.index][0] and im.tokens.tolist() == ref[im.index][1]
        assert fake.call_count < len(reqs)


async def test_auth_refuses_missing_or_wrong_token_but_healthz_is_open():
    async with serving(FakePipeline()) as (server, _):
        async with aiohttp.ClientSession(server.url) as anon:
            for path in ("/v1/status", "/metrics", "/v1/generations/x"):
                async with anon.get(path) as resp:
                    assert resp.status == 401
                    assert "token" in (await resp.json())["error"]
            async with anon.post("/v1/generations", json={"prompt": "x"}) as resp:
                assert resp.status == 401
            async with anon.post("/v1/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer no"}) as r:
                assert r.status == 401
            async with anon.get("/v1/status", headers={"Authorization": f"Basic {TOKEN}"}) as resp:
                assert resp.status == 401
        # bytes that are not UTF-8 are a wrong token (401), not a server error
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 401"), status_line
        async with aiohttp.ClientSession(server.url) as anon:
            async with anon.get("/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ok"
            async with anon.get("/v1/status", headers=AUTH) as resp:
                assert resp.status == 200


def test_no_token_only_on_loopback():
    with pytest.raises(ValueError, match="without a token"):
        create_app(FakePipeline(), ServerSettings(host="0.0.0.0"))
    create_app(FakePipeline(), ServerSettings(host="127.0.0.1"))  # allowed, with a warning
    create_app(FakePipeline(), ServerSettings(host="0.0.0.0", token="t"))
    with pytest.raises(ValueError, match="max_queue"):
        create_app(FakePipeline(), ServerSettings(max_queue=0))
    with pytest.raises(ValueError, match="model_nice"):
        create_app(FakePipeline(), ServerSettings(model_nice=20))
    assert create_app(FakePipeline(), ServerSettings(model_nice=3))[BATCHER].model_nice == 3


async def test_loopback_without_token_serves_without_auth():
    server = await start_server(FakePipeline(), ServerSettings(port=0))
    try:
        async with aiohttp.ClientSession(server.url) as http:
            async with http.post("/v1/generations", json={"prompt": "open"}) as resp:
                assert resp.status == 202
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"prompt": "x", "colour": "red"}).encode(), 400, "unknown field(s): colour"),
        (json.dumps({"prompt": "x", "params": {"guidance": 3}}).encode(), 400, "unknown sampling parameter"),
        (json.dumps({"prompt": "x", "n": 0}).encode(), 400, "n must be between 1 and 16"),
        (json.dumps({"prompt": "x", "n": 17}).encode(), 400, "n must be between 1 and 16"),
        (json.dumps({"prompt": "x", "n": "3"}).encode(), 400, "n must be an integer"),
        (json.dumps({"prompt": "x", "n": True}).encode(), 400, "n must be an integer"),
        (json.dumps({"prompt": ""}).encode(), 400, "non-empty"),
        (json.dumps({"prompt": "   "}).encode(), 400, "non-empty"),
        (json.dumps({"n": 2}).encode(), 400, "prompt is required"),
        (json.dumps({"prompt": "x", "seed": -1}).encode(), 400, "seed"),
        (json.dumps({"prompt": "x", "params": {"top_p": 0}}).encode(), 400, "top_p"),
        (json.dumps({"prompt": "x", "request_id": "../etc"}).encode(), 400, "request_id"),
        (json.dumps({"prompt": "x", "request_id": "abc\n"}).encode(), 400, "request_id"),  # header injection
        (json.dumps({"prompt": "x", "request_id": ".."}).encode(), 400, "request_id"),  # unaddressable by URL
        (b"[" * 50_000, 400, "malformed JSON"),  # nesting deeper than the parser's recursion limit
        (json.dumps({"prompt": "a\ud800b"}).encode(), 400, "lone surrogate"),  # the tokenizer would fail a batch
        (b'{"prompt": "x", "params": {"condition_scale": 1' + b"0" * 400 + b"}}", 400, "must be a number (finite"),
        (json.dumps({"prompt": "x" * 70_000}).encode(), 413, "larger than"),
    ],
)
async def test_bad_input_gets_a_clear_4xx(body, status, needle):
    async with serving(FakePipeline()) as (server, http):
        async with http.post("/v1/generations", data=body, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == status
            assert needle in (await resp.json())["error"]
        async with http.get("/metrics") as resp:
            text = await resp.text()
        kind = "too_large" if status == 413 else "bad_request"
        assert f'engine_errors_total{{kind="{kind}"}} 1.0' in text


async def test_an_unexpected_error_is_a_counted_json_500(monkeypatch):
    import engine.server

    def broken(data):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine.server, "parse_generation_request", broken)
    async with serving(FakePipeline()) as (server, http):
        async with http.post("/v1/generations", json={"prompt": "x"}) as resp:
            assert resp.status == 500 and (await resp.json())["error"] == "internal engine error"
        async with http.get("/metrics") as resp:
            assert 'engine_errors_total{kind="internal"} 1.0' in await resp.text()
        async with http.get("/healthz") as resp:
            assert resp.status == 200


async def test_unknown_ids_routes_and_duplicate_ids():
    async with serving(FakePipeline()) as (server, http):
        for method, path in (("GET", "/v1/generations/nope"), ("DELETE", "/v1/generations/nope")):
            async with http.request(method, path) as resp:
                assert resp.status == 404 and "unknown request id" in (await resp.json())["error"]
        async with http.get("/v1/generations/nope/events") as resp:
            assert resp.status == 404
        async with http.get("/no/such/route") as resp:
            assert resp.status == 404 and "error" in await resp.json()
        async with http.put("/v1/generations") as resp:
            assert resp.status == 405 and "error" in await resp.json()
        body = {"prompt": "x", "request_id": "my-id-1"}
        async with http.post("/v1/generations", json=body) as resp:
            assert resp.status == 202 and (await resp.json())["id"] == "my-id-1"
        async with http.post("/v1/generations", json=body) as resp:
            assert resp.status == 409


def test_parse_generation_request_accepts_full_body():
    req = parse_generation_request(
        {"prompt": "p", "n": 4, "seed": 9, "preview_every": 32, "params": {"condition_scale": 3, "top_k": 10}}
    )
    assert req.n == 4 and req.params.condition_scale == 3 and req.params.top_k == 10


async def test_cancel_mid_batch_over_http_leaves_others_intact():
    fake = FakePipeline(fixed_latency=0.5, chunk_tokens=16, batch_buckets=(8,))
    async with serving(fake, window_ms=100) as (server, http):
        ids = []
        for i in range(3):
            async with http.post("/v1/generations", json={"prompt": f"mate {i}", "n": 2, "seed": i}) as resp:
                ids.append((await resp.json())["id"])
        await poll_until(http, ids[1], states=("running",))
        async with http.delete(f"/v1/generations/{ids[1]}") as resp:
            assert resp.status == 200
            assert await resp.json() == {"id": ids[1], "cancelled": True, "state": "cancelled"}
        async with http.delete(f"/v1/generations/{ids[1]}") as resp:
            assert (await resp.json())["cancelled"] is False
        events = await sse_events(http, ids[1])
        assert [e["state"] for e in events] == ["cancelled"]
        for i in (0, 2):
            body = await poll_until(http, ids[i])
            assert body["state"] == "done"
            ref = solo_images(GenerationRequest(f"mate {i}", n=2, seed=i))
            for im in GenerationResult.from_json(body["result"]).images:
                assert im.png == ref[im.index][0]
        assert fake.call_count == 1


async def test_failing_request_does_not_fail_batch_mates_over_http():
    fake = FakePipeline(batch_buckets=(8,), fail_prompts={"explode"})
    async with serving(fake, window_ms=150) as (server, http):
        ids = []
        for prompt in ("ok one", "explode", "ok two"):
            async with http.post("/v1/generations", json={"prompt": prompt, "n": 1}) as resp:
                ids.append((await resp.json())["id"])
        states = [(await poll_until(http, i)) for i in ids]
        assert [s["state"] for s in states] == ["done", "failed", "done"]
        assert "explode" in states[1]["error"]


async def test_health_and_metrics_answer_while_a_batch_samples():
    fake = FakePipeline(fixed_latency=1.5, chunk_tokens=32)
    async with serving(fake) as (server, http):
        async with http.post("/v1/generations", json={"prompt": "slow", "n": 2}) as resp:
            rid = (await resp.json())["id"]
        await poll_until(http, rid, states=("running",))
        async with http.get("/healthz") as resp:
            assert resp.status == 200
        async with http.get("/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        async with http.get("/v1/status") as resp:
            status = await resp.json()
        # the loop answered while the model thread was still inside the same pass
        assert (await poll_until(http, rid, states=("running",)))["state"] == "running"
        assert status["running"] == 1 and status["running_candidates"] == 2
        assert "engine_running_requests 1.0" in text and "engine_queue_depth" in text
        await poll_until(http, rid)
        async with http.get("/metrics") as resp:
            text = await resp.text()
        for name in (
            "engine_batch_size_bucket",
            "engine_queue_wait_seconds_bucket",
            "engine_request_latency_seconds_bucket",
            'engine_requests_total{outcome="done"} 1.0',
            "engine_images_total 2.0",
            "engine_image_tokens_total 512.0",
        ):
            assert name in text


async def test_separate_apps_have_separate_registries():
    async with serving(FakePipeline()) as (a, http_a), serving(FakePipeline()) as (b, http_b):
        async with http_a.post("/v1/generations", json={"prompt": "only on a"}) as resp:
            await poll_until(http_a, (await resp.json())["id"])
        async with http_b.get("/metrics") as resp:
            assert "engine_images_total 0.0" in await resp.text()


async def test_graceful_shutdown_finishes_in_flight_work():
    fake = FakePipeline(fixed_latency=0.3, chunk_tokens=32, batch_buckets=(1, 2))
    server = await start_server(fake, ServerSettings(port=0, token=TOKEN, shutdown_grace=10.0))
    async with aiohttp.ClientSession(server.url, headers=AUTH) as http:
        ids = []
        for i in range(2):
            async with http.post("/v1/generations", json={"prompt": f"finish me {i}", "n": 2}) as resp:
                ids.append((await resp.json())["id"])
        stream = asyncio.create_task(sse_events(http, ids[1]))
        await poll_until(http, ids[0], states=("running",))
        await server.stop()
        events = await asyncio.wait_for(stream, 10)
    assert events[-1]["state"] == "done"
    assert [server.batcher.status(i).state for i in ids] == ["done", "done"]


async def test_results_finished_during_the_drain_can_still_be_fetched():
    """A client learns "done" from the event stream and then GETs the result: the socket must still answer."""
    fake = FakePipeline(fixed_latency=0.3, chunk_tokens=32, batch_buckets=(1, 2))
    server = await start_server(fake, ServerSettings(port=0, token=TOKEN, shutdown_grace=10.0, shutdown_linger=5.0))
    engine = HttpEngine(server.url, TOKEN)
    try:
        rid = await engine.submit(GenerationRequest("finish during the drain", n=2, seed=1))
        waiting = asyncio.create_task(engine.result(rid, timeout=20))
        async with aiohttp.ClientSession(server.url, headers=AUTH) as http:
            await poll_until(http, rid, states=("running",))
        stopping = asyncio.create_task(server.stop())
        result = await waiting
        assert len(result.images) == 2
        await asyncio.wait_for(stopping, 10)
    finally:
        await engine.close()


def test_result_ttl_must_be_positive():
    with pytest.raises(ValueError, match="result_ttl"):
        ServerSettings(result_ttl=0).validate()


async def test_shutdown_past_the_grace_cancels_cleanly():
    fake = FakePipeline(fixed_latency=2.0, chunk_tokens=16, batch_buckets=(1,))
    server = await start_server(fake, ServerSettings(port=0, token=TOKEN, shutdown_grace=0.2))
    async with aiohttp.ClientSession(server.url, headers=AUTH) as http:
        ids = []
        for i in range(3):
            async with http.post("/v1/generations", json={"prompt": f"too slow {i}"}) as resp:
                ids.append((await resp.json())["id"])
        stream = asyncio.create_task(sse_events(http, ids[0]))
        await poll_until(http, ids[0], states=("running",))
        await asyncio.wait_for(server.stop(), 10)
        events = await asyncio.wait_for(stream, 5)
    assert events[-1]["state"] == "cancelled" and events[-1]["error"] == "engine shutting down"
    assert {server.batcher.status(i).state for i in ids} == {"cancelled"}
    assert fake.calls[0].stopped_early and fake.call_count == 1
    np.testing.assert_equal(server.batcher.load()["queued_candidates"], 0)


async def test_info_healthz_and_admin_reload_name_the_checkpoint_and_the_backend(tmp_path):
    nxt = tmp_path / "next"
    nxt.mkdir()
    (nxt / "checkpoint.json").write_text(json.dumps({"id": "next-1"}))
    async with serving(FakePipeline()) as (server, http):
        async with http.get("/v1/info") as resp:
            assert resp.status == 200 and await resp.json() == {"checkpoint_id": "fake-0", "attention": None,
                                                                  "dtype": None}
        async with http.get("/healthz") as resp:
            body = await resp.json()
            assert body["checkpoint_id"] == "fake-0" and "attention" in body and body["attention"] is None
        async with aiohttp.ClientSession(server.url) as anonymous:
            async with anonymous.post("/admin/reload", json={"checkpoint_dir": str(nxt)}) as resp:
                assert resp.status == 401
        for body, needle in (({"checkpoint_dir": str(tmp_path / "nowhere")}, "no such directory"),
                             ({"dir": str(nxt)}, "checkpoint_dir"), ({"checkpoint_dir": 3}, "checkpoint_dir")):
            async with http.post("/admin/reload", json=body) as resp:
                assert resp.status == 400 and needle in (await resp.json())["error"]
        async with http.post("/admin/reload", json={"checkpoint_dir": str(nxt)}) as resp:
            assert resp.status == 200 and (await resp.json())["checkpoint_id"] == "next-1"
        async with http.post("/v1/generations", json={"prompt": "after the reload", "n": 2}) as resp:
            rid = (await resp.json())["id"]
        result = GenerationResult.from_json((await poll_until(http, rid))["result"])
        assert result.checkpoint_id == "next-1" and result.attention is None

        engine = HttpEngine(server.url, TOKEN, timeout=5, retries=0)
        try:
            assert await engine.info() == EngineInfo("next-1", None, None)
            with pytest.raises(BadRequest, match="no such directory"):
                await engine.reload(str(tmp_path / "nowhere"))
            (tmp_path / "third").mkdir()
            info = await engine.reload(str(tmp_path / "third"))
            assert info.checkpoint_id == "third" == info.model_id  # no checkpoint.json: the directory's name
            assert (await engine.info()).checkpoint_id == "third"
        finally:
            await engine.close()


async def test_admin_reload_is_refused_without_a_token(tmp_path):
    server = await start_server(FakePipeline(), ServerSettings(port=0))
    try:
        async with aiohttp.ClientSession(server.url) as http:
            async with http.post("/admin/reload", json={"checkpoint_dir": str(tmp_path)}) as resp:
                assert resp.status == 403 and "token" in (await resp.json())["error"]
            async with http.get("/v1/info") as resp:
                assert (await resp.json())["checkpoint_id"] == "fake-0"
    finally:
        await server.stop()


def test_a_result_records_its_attention_backend_and_reads_json_without_it():
    image = GeneratedImage(0, 0, b"png", np.arange(4, dtype=np.int16), 0.5, {"nsfw": 0.1}, False)
    result = GenerationResult("r", "a prompt", 3, [image], "ckpt", {"sample_s": 1.0}, attention="native")
    data = result.to_json()
    assert data["attention"] == "native" and GenerationResult.from_json(data).attention == "native"
    del data["attention"]  # a result from an engine that predates the field
    old = GenerationResult.from_json(data)
    assert old.attention is None and old.checkpoint_id == "ckpt" and old.images[0].tokens.tolist() == [0, 1, 2, 3]
