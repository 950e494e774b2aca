"""The engine service under bad or greedy clients: a malformed or oversized request is one warning line (no
traceback), and the event streams open on one job are capped."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from engine.fake import FakePipeline
from engine.server import STREAMS, ServerSettings, start_server

TOKEN = "limits-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_malformed_or_oversized_requests_are_one_warning_line_each(caplog):
    server = await start_server(FakePipeline(), ServerSettings(port=0, token=TOKEN))
    bad = [
        (b"{not json", 400, "malformed JSON"),
        (b'{"prompt": "x", "colour": "red"}', 400, "colour"),
        (b'{"prompt": "' + b"x" * 100_000 + b'"}', 413, "larger than"),
        (b'{"prompt": 5}', 400, "prompt"),
    ]
    try:
        async with aiohttp.ClientSession(server.url, headers=AUTH) as http:
            for body, status, fragment in bad:
                caplog.clear()
                with caplog.at_level(logging.DEBUG, logger="engine.server"):
                    async with http.post("/v1/generations", data=body,
                                         headers={"Content-Type": "application/json"}) as resp:
                        assert resp.status == status and fragment in (await resp.json())["error"]
                records = [r for r in caplog.records if r.name == "engine.server"]
                assert len(records) == 1, [r.getMessage() for r in records]
                [record] = records
                assert record.levelno == logging.WARNING and record.exc_info is None
                line = record.getMessage()
                assert "\n" not in line and "POST /v1/generations" in line and str(status) in line
                assert "client default" in line and "xxxxxxxxxx" not in line  # who, and never the body
                assert fragment in line or status == 413
    finally:
        await server.stop()


async def test_event_streams_per_job_are_capped():
    fake = FakePipeline(fixed_latency=1.0, chunk_tokens=8, batch_buckets=(1,))
    server = await start_server(fake, ServerSettings(port=0, token=TOKEN, max_subscribers=2))
    app = server.app
    try:
        async with aiohttp.ClientSession(server.url, headers=AUTH) as http:
            async with http.post("/v1/generations", json={"prompt": "slow", "n": 1}) as resp:
                rid = (await resp.json())["id"]
            first = await http.get(f"/v1/generations/{rid}/events")
            second = await http.get(f"/v1/generations/{rid}/events")
            assert first.status == second.status == 200
            async with http.get(f"/v1/generations/{rid}/events") as third:
                assert third.status == 429 and third.headers["Retry-After"] == "5"
                assert "too many event streams" in (await third.json())["error"]
            second.close()  # a client goes away: its place is free again
            for _ in range(100):
                async with http.get(f"/v1/generations/{rid}/events") as again:
                    if again.status == 200:
                        break
                await asyncio.sleep(0.02)
            assert again.status == 200
            first.close()
            async with http.delete(f"/v1/generations/{rid}") as resp:
                assert resp.status == 200
            for _ in range(100):  # every stream ended: nothing left counted for the job
                if not app[STREAMS]:
                    break
                await asyncio.sleep(0.02)
            assert not app[STREAMS]
    finally:
        await server.stop()


async def test_finished_results_are_bounded_in_bytes():
    """The batcher keeps finished results up to max_result_bytes: the oldest go first, never the newest, and what
    it counts is exactly what the results it still holds weigh."""
    from engine.api import GenerationRequest
    from engine.batching import Batcher, UnknownRequest

    fake = FakePipeline(batch_buckets=(2,))
    probe = Batcher(fake, window_ms=0)
    one = await probe.result(await probe.submit(GenerationRequest("size me", n=2, seed=0)), timeout=10)
    size = sum(len(im.png) + im.tokens.nbytes for im in one.images)
    assert probe.held_bytes >= size > 0
    await probe.close()

    batcher = Batcher(fake, window_ms=0, max_result_bytes=int(2.5 * size))
    ids = []
    for i in range(5):  # one after the other: each finishes before the next is submitted
        rid = await batcher.submit(GenerationRequest("keep me", n=2, seed=i))
        await batcher.result(rid, timeout=10)
        ids.append(rid)
    await batcher.submit(GenerationRequest("a later request runs the sweep", n=2, seed=9))
    held = []
    for rid in ids:
        try:
            held.append((rid, batcher.result_of(rid)))
        except UnknownRequest:
            pass
    assert [rid for rid, _ in held] == ids[-len(held):] and 1 <= len(held) <= 3  # the newest, the oldest gone
    weigh = sum(len(im.png) + im.tokens.nbytes for _, res in held for im in res.images)
    assert weigh <= 2.5 * size + size and batcher.held_bytes <= 2.5 * size + size
    assert batcher.load()["results_held"] == len(held) and batcher.load()["results_bytes"] == batcher.held_bytes
    await batcher.close()

    lone = Batcher(fake, window_ms=0, max_result_bytes=1)  # a cap below one result: the newest still stays
    rid = await lone.submit(GenerationRequest("too big to keep, kept", n=2, seed=1))
    await lone.result(rid, timeout=10)
    assert lone.result_of(rid) is not None
    await lone.close()
