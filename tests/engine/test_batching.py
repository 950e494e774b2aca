"""Dynamic batching against the deterministic fake pipeline: merging, buckets, splits, isolation, cancellation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.api import BadRequest, EngineError, EngineInfo, GenerationRequest, RequestCancelled
from engine.batching import Batcher, QueueFull, ShuttingDown, UnknownRequest
from engine.fake import FakePipeline


def solo(request: GenerationRequest, **fake_opts):
    """The request sampled alone by a fresh fake with one big bucket (the reference output)."""
    fake = FakePipeline(batch_buckets=(64,), **fake_opts)
    [result] = fake.generate([request])
    return {im.index: im for im in result.images}


def assert_same_images(result, request: GenerationRequest, **fake_opts) -> None:
    ref = solo(request, **fake_opts)
    got = {im.index: im for im in result.images}
    assert sorted(got) == list(range(request.first_index, request.first_index + request.n))
    for index, im in got.items():
        assert im.png == ref[index].png
        np.testing.assert_array_equal(im.tokens, ref[index].tokens)
        assert im.clip_score == ref[index].clip_score
    assert sorted(im.rank for im in result.images) == list(range(request.n))
    scores = [im.clip_score for im in result.images]
    assert scores == sorted(scores, reverse=True)  # images ordered best first


async def wait_state(batcher: Batcher, request_id: str, state: str, timeout: float = 5.0) -> None:
    async def poll():
        while batcher.status(request_id).state != state:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_window_merges_staggered_requests_into_one_pass():
    fake = FakePipeline(batch_buckets=(1, 2, 4, 8, 16))
    batcher = Batcher(fake, window_ms=400)
    reqs = [GenerationRequest(f"prompt {i}", n=1, seed=i) for i in range(8)]
    ids = []
    for r in reqs:  # arrive spread over a few ms, all within the window
        ids.append(await batcher.submit(r))
        await asyncio.sleep(0.003)
    results = await asyncio.gather(*(batcher.result(i, timeout=10) for i in ids))
    assert fake.call_count == 1
    assert fake.calls[0].candidates == 8 and fake.calls[0].bucket == 8
    for r, res in zip(reqs, results, strict=True):
        assert res.request_id == r.request_id and res.prompt == r.prompt
        assert_same_images(res, r)
    await batcher.close()


async def test_bucket_one_means_one_candidate_per_pass():
    fake = FakePipeline(batch_buckets=(1, 2, 4))
    batcher = Batcher(fake, window_ms=0, max_batch=1)
    reqs = [GenerationRequest(f"p{i}", n=2, seed=i) for i in range(3)]
    ids = [await batcher.submit(r) for r in reqs]
    results = await asyncio.gather(*(batcher.result(i, timeout=10) for i in ids))
    assert fake.call_count == 6 and all(c.candidates == 1 and c.bucket == 1 for c in fake.calls)
    for r, res in zip(reqs, results, strict=True):
        assert_same_images(res, r)
    await batcher.close()


async def test_concurrent_requests_take_far_fewer_passes_and_same_images_as_alone():
    fake = FakePipeline(batch_buckets=(1, 2, 4, 8, 16), fixed_latency=0.02)
    batcher = Batcher(fake, window_ms=20)
    reqs = [GenerationRequest(f"a cat number {i % 5}", n=1 + i % 4, seed=1000 + i % 3) for i in range(24)]

    async def client(r):
        rid = await batcher.submit(r)
        return await batcher.result(rid, timeout=20)

    results = await asyncio.gather(*(client(r) for r in reqs))
    assert fake.call_count <= len(reqs) // 3
    assert all(c.candidates <= 16 and c.bucket in fake.batch_buckets for c in fake.calls)
    assert sum(c.candidates for c in fake.calls) == sum(r.n for r in reqs)
    for r, res in zip(reqs, results, strict=True):
        assert_same_images(res, r)
    assert batcher.metrics.pipeline_calls._value.get() == fake.call_count
    await batcher.close()


async def test_oversize_request_is_split_and_merged_with_indices_preserved():
    fake = FakePipeline(batch_buckets=(1, 2, 4))
    batcher = Batcher(fake, window_ms=0)
    req = GenerationRequest("a very big request", n=11, seed=7)
    res = await batcher.result(await batcher.submit(req), timeout=10)
    assert [c.requests[0][1:] for c in fake.calls] == [(0, 4), (4, 4), (8, 3)]
    assert all(c.candidates <= 4 for c in fake.calls)
    assert len(res.images) == 11
    assert_same_images(res, req)  # ranks recomputed over the whole request
    # a part keeps its own (seed, index) streams: candidate 9 equals candidate 9 of the unsplit request
    await batcher.close()


async def test_failing_request_does_not_fail_its_batch_mates():
    fake = FakePipeline(batch_buckets=(8,), fail_prompts={"boom"})
    batcher = Batcher(fake, window_ms=200)
    good = [GenerationRequest(f"fine {i}", n=2, seed=i) for i in range(3)]
    bad = GenerationRequest("boom", n=1, seed=1)
    ids = [await batcher.submit(r) for r in (good[0], bad, good[1], good[2])]
    outcomes = await asyncio.gather(*(batcher.result(i, timeout=10) for i in ids), return_exceptions=True)
    assert isinstance(outcomes[1], EngineError) and "boom" in str(outcomes[1])
    for r, res in zip(good, (outcomes[0], outcomes[2], outcomes[3]), strict=True):
        assert_same_images(res, r)
    assert fake.calls[0].failed and len(fake.calls[0].requests) == 4
    assert fake.call_count == 5  # the failed pass, then each request alone
    assert batcher.status(bad.request_id).state == "failed"
    assert batcher.metrics.errors.labels("batch_retry")._value.get() == 1
    await batcher.close()


async def test_cancel_queued_request_frees_its_slots():
    fake = FakePipeline(batch_buckets=(1, 2, 4, 8), fixed_latency=0.3, chunk_tokens=32)
    batcher = Batcher(fake, window_ms=0)
    first = GenerationRequest("runs first", n=1)
    a, b = GenerationRequest("queued a", n=4), GenerationRequest("queued b", n=4)
    id0 = await batcher.submit(first)
    await wait_state(batcher, id0, "running")
    ida, idb = await batcher.submit(a), await batcher.submit(b)
    assert batcher.status(ida).queue_position == 1 and batcher.status(idb).queue_position == 2
    assert await batcher.cancel(ida) is True
    assert batcher.status(idb).queue_position == 1
    with pytest.raises(RequestCancelled):
        await batcher.result(ida, timeout=5)
    res_b = await batcher.result(idb, timeout=5)
    assert_same_images(res_b, b)
    assert all(not rid.startswith(ida) for c in fake.calls for rid in c.request_ids)
    assert fake.calls[-1].candidates == 4  # b alone: a's four slots were freed
    assert await batcher.cancel(ida) is False  # already finished
    assert await batcher.cancel("nope") is False
    await batcher.close()


async def test_cancel_mid_batch_leaves_the_others_intact():
    fake = FakePipeline(batch_buckets=(8,), fixed_latency=0.4, chunk_tokens=16)
    batcher = Batcher(fake, window_ms=100)
    reqs = [GenerationRequest(f"batch mate {i}", n=2, seed=i) for i in range(3)]
    ids = [await batcher.submit(r) for r in reqs]
    events = batcher.events(ids[1])
    async for ev in events:  # wait until the victim is actually sampling
        if ev.state == "running" and ev.tokens_done > 0:
            break
    assert await batcher.cancel(ids[1]) is True
    ev = await anext(events)
    while ev.state == "running":
        ev = await anext(events)
    assert ev.state == "cancelled"
    outcomes = await asyncio.gather(*(batcher.result(i, timeout=10) for i in ids), return_exceptions=True)
    assert isinstance(outcomes[1], RequestCancelled)
    assert_same_images(outcomes[0], reqs[0])
    assert_same_images(outcomes[2], reqs[2])
    assert fake.call_count == 1 and len(fake.calls[0].requests) == 3
    await batcher.close()


async def test_cancelling_the_only_running_request_stops_the_pass_early():
    fake = FakePipeline(batch_buckets=(4,), fixed_latency=1.0, chunk_tokens=16)
    batcher = Batcher(fake, window_ms=0)
    rid = await batcher.submit(GenerationRequest("stop me", n=4))
    await wait_state(batcher, rid, "running")
    await batcher.cancel(rid)
    nxt = await batcher.submit(GenerationRequest("next", n=1))
    await batcher.result(nxt, timeout=10)
    assert fake.calls[0].stopped_early and fake.calls[0].chunks_run < 16
    await batcher.close()


async def test_progress_events_queue_positions_tokens_and_previews():
    fake = FakePipeline(batch_buckets=(1,), fixed_latency=0.15, chunk_tokens=64)
    batcher = Batcher(fake, window_ms=0)
    busy = await batcher.submit(GenerationRequest("busy", n=1))
    await wait_state(batcher, busy, "running")
    others = [await batcher.submit(GenerationRequest(f"waiting {i}", n=1)) for i in range(2)]
    watched = GenerationRequest("watched", n=1, preview_every=64)
    wid = await batcher.submit(watched)
    seen = [ev async for ev in batcher.events(wid)]
    positions = [ev.queue_position for ev in seen if ev.state == "queued"]
    assert positions[0] == 3 and positions == sorted(positions, reverse=True) and positions[-1] == 1
    running = [ev for ev in seen if ev.state == "running"]
    done_counts = [ev.tokens_done for ev in running]
    assert done_counts == sorted(done_counts) and done_counts[-1] == 256
    assert all(ev.tokens_total in (0, 256) for ev in running)
    previews = [ev.preview_png for ev in running if ev.preview_png]
    assert previews and all(p.startswith(b"\x89PNG") for p in previews)
    assert seen[-1].state == "done" and seen[-1].tokens_done == 256
    for i in others:
        await batcher.result(i, timeout=5)
    # a late subscriber gets the final state at once
    late = [ev async for ev in batcher.events(wid)]
    assert [ev.state for ev in late] == ["done"]
    await batcher.close()


async def test_validation_queue_limit_ttl_and_unknown_ids():
    fake = FakePipeline(batch_buckets=(1,), fixed_latency=0.2)
    batcher = Batcher(fake, window_ms=0, max_queue=2, result_ttl=0.05)
    with pytest.raises(BadRequest):
        await batcher.submit(GenerationRequest("   "))
    with pytest.raises(BadRequest):
        await batcher.submit(GenerationRequest("x", n=17))
    first = await batcher.submit(GenerationRequest("one", n=1))
    await wait_state(batcher, first, "running")
    await batcher.submit(GenerationRequest("two", n=1))
    dup = GenerationRequest("three", n=1)
    await batcher.submit(dup)
    with pytest.raises(BadRequest, match="already in use"):
        await batcher.submit(dup)
    with pytest.raises(QueueFull):
        await batcher.submit(GenerationRequest("four", n=1))
    await batcher.result(first, timeout=5)
    await asyncio.sleep(0.1)
    with pytest.raises(UnknownRequest):
        batcher.status(first)  # dropped after the TTL
    with pytest.raises(UnknownRequest):
        await batcher.result("never-submitted")
    await batcher.close()


async def test_close_drains_then_cancels_the_rest():
    fake = FakePipeline(batch_buckets=(1,), fixed_latency=0.2, chunk_tokens=16)
    batcher = Batcher(fake, window_ms=0)
    ids = [await batcher.submit(GenerationRequest(f"r{i}", n=1)) for i in range(4)]
    await wait_state(batcher, ids[0], "running")
    await batcher.close(drain_timeout=0.3)  # time for about one pass, not four
    states = [batcher.status(i).state for i in ids]
    assert states[0] == "done"
    assert "cancelled" in states and set(states) <= {"done", "cancelled"}
    with pytest.raises(ShuttingDown):
        await batcher.submit(GenerationRequest("late"))
    assert fake.call_count <= 3


class IgnoresFirstIndex(FakePipeline):
    """A pipeline that forgets ``first_index`` (would hand out duplicate candidates for split requests)."""

    def generate(self, requests, on_progress=None, should_cancel=None):
        import dataclasses

        return super().generate([dataclasses.replace(r, first_index=0) for r in requests], on_progress, should_cancel)


async def test_a_pipeline_ignoring_first_index_fails_loudly_not_with_duplicates():
    batcher = Batcher(IgnoresFirstIndex(batch_buckets=(4,)), window_ms=0)
    small = await batcher.submit(GenerationRequest("fits one pass", n=3))
    big = await batcher.submit(GenerationRequest("needs a split", n=6))
    assert len((await batcher.result(small, timeout=5)).images) == 3
    with pytest.raises(EngineError, match="first_index"):
        await batcher.result(big, timeout=5)
    await batcher.close()


async def test_warmup_compiles_each_bucket_once_while_idle_and_never_delays_real_work_for_long():
    """warmup=True: with nothing queued, one throw-away pass per bucket (smallest first) up to the capacity; a
    bucket a real pass already used is not warmed again; real requests still get their own correct results;
    without warmup nothing runs until work arrives."""
    fake = FakePipeline(batch_buckets=(1, 2, 4, 8, 16, 32))
    batcher = Batcher(fake, window_ms=0, max_batch=16, warmup=True)
    batcher.start()
    for _ in range(200):
        if not batcher.load()["cold_buckets"]:
            break
        await asyncio.sleep(0.01)
    assert batcher.load()["cold_buckets"] == []
    assert [c.bucket for c in fake.calls] == [1, 2, 4, 8, 16]  # 32 is above max_batch: never used, never warmed
    assert [c.candidates for c in fake.calls] == [1, 2, 4, 8, 16]
    req = GenerationRequest("a blue star", n=3, seed=4)
    res = await batcher.result(await batcher.submit(req), timeout=5)
    assert_same_images(res, req)
    assert len(fake.calls) == 6  # the real pass only
    await batcher.close()

    fake2 = FakePipeline(batch_buckets=(1, 2, 4))
    used_first = Batcher(fake2, window_ms=0, warmup=True)
    res = await used_first.result(await used_first.submit(GenerationRequest("x", n=4, seed=1)), timeout=5)
    for _ in range(200):
        if not used_first.load()["cold_buckets"]:
            break
        await asyncio.sleep(0.01)
    assert [c.bucket for c in fake2.calls] == [4, 1, 2]  # bucket 4 came from the real pass: not warmed again
    await used_first.close()

    fake3 = FakePipeline(batch_buckets=(1, 2))
    cold = Batcher(fake3, window_ms=0)
    cold.start()
    await asyncio.sleep(0.05)
    assert fake3.calls == [] and cold.load()["cold_buckets"] == []
    await cold.close()


async def test_in_process_engine_start_warms_up_only_when_asked():
    from engine.client import InProcessEngine

    idle = InProcessEngine(FakePipeline(batch_buckets=(1, 2)))
    idle.start()  # nothing to warm: the batcher still starts at the first submit
    assert idle.batcher._task is None
    fake = FakePipeline(batch_buckets=(1, 2))
    warm = InProcessEngine(fake, warmup=True)
    warm.start()
    for _ in range(200):
        if not (await warm.status())["cold_buckets"]:
            break
        await asyncio.sleep(0.01)
    assert [c.bucket for c in fake.calls] == [1, 2]
    await warm.close()
    await idle.close()


def fake_checkpoint(directory, checkpoint_id: str):
    """A directory the fake pipeline's with_checkpoint accepts, with this id in its checkpoint.json."""
    directory.mkdir(parents=True)
    (directory / "checkpoint.json").write_text(f'{{"id": "{checkpoint_id}"}}')
    return directory


async def test_reload_swaps_the_pipeline_between_passes_never_inside_a_request(tmp_path):
    fake = FakePipeline(fixed_latency=0.3, chunk_tokens=64, batch_buckets=(1, 2, 4))
    batcher = Batcher(fake, window_ms=0)
    assert batcher.info() == EngineInfo("fake-0", None, None)
    split = GenerationRequest("split over two passes", n=6, seed=1)  # 4 + 2 candidates
    await batcher.submit(split)
    await wait_state(batcher, split.request_id, "running")
    reload = asyncio.create_task(batcher.reload(str(fake_checkpoint(tmp_path / "next", "next-1"))))
    await asyncio.sleep(0.05)
    later = GenerationRequest("after the reload", n=2, seed=2)  # would fit beside the split's last 2
    await batcher.submit(later)
    assert (await asyncio.wait_for(reload, 10)) == EngineInfo("next-1", None, None)
    first, second = await batcher.result(split.request_id, 10), await batcher.result(later.request_id, 10)
    # every candidate of a request comes from one checkpoint; the request queued meanwhile waited for the new one
    assert first.checkpoint_id == "fake-0" and second.checkpoint_id == "next-1"
    assert [c.request_ids for c in fake.calls] == [(f"{split.request_id}@0",), (f"{split.request_id}@4",)]
    assert [c.request_ids for c in batcher.pipeline.calls] == [(f"{later.request_id}@0",)]
    assert_same_images(first, split)
    assert_same_images(second, later)

    with pytest.raises(BadRequest, match="no such directory"):  # the old pipeline keeps serving
        await batcher.reload(str(tmp_path / "nowhere"))
    assert batcher.info().checkpoint_id == "next-1"
    await batcher.close()
    with pytest.raises(ShuttingDown):
        await batcher.reload(str(tmp_path / "next"))


async def test_reload_refuses_a_pipeline_with_other_batch_buckets_and_one_that_cannot_reload(tmp_path):
    batcher = Batcher(FakePipeline(batch_buckets=(1, 2)), loader=lambda d: FakePipeline(batch_buckets=(8,)))
    with pytest.raises(BadRequest, match="batch buckets"):
        await batcher.reload(str(tmp_path))
    assert batcher.info().checkpoint_id == "fake-0"
    await batcher.close()

    class Fixed(FakePipeline):
        with_checkpoint = None

    fixed = Batcher(Fixed())
    with pytest.raises(EngineError, match="cannot load another checkpoint"):
        await fixed.reload(str(tmp_path))
    await fixed.close()


async def test_a_reload_waiting_at_shutdown_is_refused(tmp_path):
    batcher = Batcher(FakePipeline(fixed_latency=0.5, chunk_tokens=64), window_ms=0)
    req = GenerationRequest("busy", n=2)
    await batcher.submit(req)
    await wait_state(batcher, req.request_id, "running")
    reload = asyncio.create_task(batcher.reload(str(fake_checkpoint(tmp_path / "next", "next-1"))))
    await asyncio.sleep(0.05)
    await batcher.close()
    with pytest.raises(ShuttingDown):
        await reload
