"""Running jobs over a real database and the fake engine: the engine call in fair order, progress, a stalled or
broken engine, storing the images, and handing results over to be posted."""

from __future__ import annotations

import asyncio
import hashlib

from bot.ratelimit import LimitPolicy, RateLimiter
from bot.scheduler import Scheduler
from bot.service import GenerationService
from store.models import ModerationCase, Refusal
from tests.fakes.botkit import RecordingPublisher, create_schema, make_repo, rows_of, sqlite_url, wait_delivered
from tests.fakes.engine import FakeEngine, colour_for


async def test_submit_generates_persists_and_publishes(running_service, tmp_path):
    svc, repo, engine, pub = running_service
    engine.attention = "native"  # as the demo model's engine on a CPU reports it
    adm = await svc.submit(user_id=1, guild_id=5, prompt="a red circle on a blue background", n=4, seed=7)
    assert adm.ok and adm.generation_id and adm.position == 1 and adm.seed == 7
    [outcome] = await pub.wait_for(1)
    assert outcome.ok and outcome.generation.status == "done"
    assert [im.rank for im in outcome.images] == [0, 1, 2, 3]
    scores = [im.clip_score for im in outcome.images]
    assert scores == sorted(scores, reverse=True)
    for im in outcome.images:
        data = im.path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == im.sha256 and data == im.png
        assert im.path.is_relative_to(tmp_path / "out")
    gen = await wait_delivered(repo, adm.generation_id)
    assert gen.status == "done" and gen.seed == 7 and gen.delivered_at is not None
    assert gen.result_message_id == 10_000 + gen.id and gen.checkpoint_id == "fake-ckpt"
    assert gen.attention == "native"  # what made the images, so "same seed, same image" can be checked
    assert len(gen.images) == 4 and all(i.token_bytes for i in gen.images)
    # the image at candidate index i has the colour of stream (seed, i)
    from PIL import Image as PILImage

    for im in outcome.images:
        assert PILImage.open(im.path).getpixel((0, 0)) == colour_for(7, im.index)
    states = [u.state for u in pub.progress_updates if u.generation_id == gen.id]
    assert "running" in states and any(u.tokens_done for u in pub.progress_updates)
    assert engine.submitted[0].prompt == "a red circle on a blue background" and engine.submitted[0].n == 4


async def test_flagged_images_are_hidden_or_withheld_and_cases_opened(running_service):
    svc, repo, engine, pub = running_service
    await repo.update_guild_settings(77, flagged_mode="withhold")
    await svc.submit(user_id=4, guild_id=1, prompt="an unsafe lighthouse", n=2, seed=1)
    await svc.submit(user_id=4, guild_id=77, prompt="an unsafe lighthouse", n=2, seed=1)
    outcomes = await pub.wait_for(2)
    by_guild = {o.generation.guild_id: o for o in outcomes}
    flagged1 = [im for im in by_guild[1].images if im.flagged]
    assert len(flagged1) == 1 and flagged1[0].hidden and not flagged1[0].withheld
    flagged77 = [im for im in by_guild[77].images if im.flagged]
    assert len(flagged77) == 1 and flagged77[0].withheld
    cases = await rows_of(repo, ModerationCase)
    assert sorted(c.image_id for c in cases) == sorted([flagged1[0].id, flagged77[0].id])
    assert all(c.source == "auto" and "nsfw" in c.reason for c in cases)


async def test_engine_failure_is_recorded_and_published(running_service):
    svc, repo, engine, pub = running_service
    adm = await svc.submit(user_id=11, prompt="a balloon about to explode")  # the fake engine fails on "explode"
    [o] = await pub.wait_for(1)
    assert not o.ok and "exploded" in o.error
    gen = await wait_delivered(repo, adm.generation_id)
    assert gen.status == "failed" and "exploded" in gen.error and gen.delivered_at is not None


async def test_fair_dispatch_across_users(bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine(concurrency=1, step_s=0.0)
    pub = RecordingPublisher()
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "o", concurrency=1,
                            limiter=RateLimiter(policy=LimitPolicy(user="1000 per minute", daily_quota=None)),
                            scheduler=Scheduler(per_user_cap=10))
    # queue everything before the workers start, then start: dispatch must interleave users
    for user in (1, 2, 3):
        for k in range(4):
            assert (await svc.submit(user_id=user, guild_id=1, prompt=f"shape {user} {k}", n=1)).ok
    await svc.start()
    await pub.wait_for(12)
    users = [int(r.prompt.split()[1]) for r in engine.submitted]
    assert users == [1, 2, 3] * 4
    await svc.stop()
    await engine.close()
    await repo.close()


async def test_lifecycle_on_sqlite_and_postgresql(repo, tmp_path):
    """The same admit → run → persist → publish path on both databases (``repo`` is migrated by Alembic)."""
    engine = FakeEngine()
    pub = RecordingPublisher()
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "out", concurrency=2)
    await svc.start()
    try:
        a = await svc.submit(user_id=1, guild_id=1, prompt="an unsafe red circle", n=3, seed=9)
        b = await svc.submit(user_id=2, guild_id=1, prompt="b.a.d w0rd f.u.c.k")
        assert a.ok and not b.ok
        [o] = await pub.wait_for(1)
        assert [im.rank for im in o.images] == [0, 1, 2] and sum(im.flagged for im in o.images) == 1
        fb = await svc.feedback(o.images[0].id, 3, "report", reason="quality")
        assert fb.ok and fb.case_id
        assert len(await rows_of(repo, ModerationCase)) == 2 and len(await rows_of(repo, Refusal)) == 1
        gen = await wait_delivered(repo, a.generation_id)
        assert gen.status == "done" and gen.delivered_at is not None and len(gen.images) == 3
    finally:
        await svc.stop()
        await engine.close()


async def test_engine_gets_many_jobs_at_once_in_fair_order(bot_db_url, tmp_path):
    """With ENGINE_CONCURRENCY slots the engine holds that many jobs together (so it can batch them), and it
    receives them in the scheduler's order although their database claims overlap."""
    repo = make_repo(bot_db_url)
    engine = FakeEngine(steps=1, step_s=0.0, concurrency=8)
    engine.gate = asyncio.Event()
    pub = RecordingPublisher()
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "o", concurrency=6,
                            limiter=RateLimiter(policy=LimitPolicy(user="100 per minute", guild="", daily_quota=None)),
                            scheduler=Scheduler(per_user_cap=10))
    ids = [(await svc.submit(user_id=u, guild_id=1, prompt=f"job {u}", n=1)).generation_id for u in range(10)]
    claim = repo.claim

    async def jittery_claim(gid, *args):
        await asyncio.sleep(0.03 if gid % 2 else 0.0)  # odd claims are slow: they finish after later ones
        return await claim(gid, *args)

    repo.claim = jittery_claim
    await svc.start()
    try:
        for _ in range(200):
            if len(engine.submitted) == 6:
                break
            await asyncio.sleep(0.01)
        assert len(engine.submitted) == 6  # six in the engine at once, none of them finished
        engine.gate.set()
        await pub.wait_for(10)
        assert [r.prompt for r in engine.submitted] == [f"job {u}" for u in range(10)]
        assert [(await repo.get_generation(g)).status for g in ids] == ["done"] * 10
    finally:
        await svc.stop(grace=1)
        await engine.close()
        await repo.close()


class _SlowPublisher(RecordingPublisher):
    """Posting blocks until ``release`` is set (a rate-limited or slow Discord channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.posting = 0

    async def publish(self, outcome):
        self.posting += 1
        await self.release.wait()
        return await super().publish(outcome)


async def test_a_slow_post_does_not_hold_the_engine_slot(bot_db_url, tmp_path):
    """One worker: while the first result waits to be posted, the next jobs already run on the engine; a stop
    leaves what could not be posted undelivered, and the next start posts it."""
    repo = make_repo(bot_db_url)
    engine = FakeEngine(step_s=0.0)
    pub = _SlowPublisher()
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "o", concurrency=1,
                            limiter=RateLimiter(policy=LimitPolicy(user="100 per minute", daily_quota=None)))
    await svc.start()
    try:
        ids = [(await svc.submit(user_id=40 + i, prompt="a green star", n=1)).generation_id for i in range(3)]
        for _ in range(300):
            if pub.posting == 3:
                break
            await asyncio.sleep(0.01)
        assert pub.posting == 3 and len(engine.submitted) == 3  # all sampled while the first post still waits
        assert [(await repo.get_generation(g)).status for g in ids] == ["done"] * 3
    finally:
        await svc.stop(grace=0.1)
    assert pub.outcomes == [] and [(await repo.get_generation(g)).delivered_at for g in ids] == [None] * 3
    from store.models import utcnow

    # no longer vouched for: on a shared database another process would post them at once
    leases = [(await repo.get_generation(g)).lease_until for g in ids]
    assert all(lease < utcnow() for lease in leases)

    pub2 = RecordingPublisher()
    svc2 = GenerationService(repo, engine, pub2, output_dir=tmp_path / "o", concurrency=1)
    await svc2.start()
    assert sorted(o.generation.id for o in await pub2.wait_for(3)) == sorted(ids)
    for g in ids:
        assert (await wait_delivered(repo, g)).delivered_at is not None
    await svc2.stop()
    await engine.close()
    await repo.close()


async def test_a_shutdown_during_the_engine_submit_cancels_the_job_there(repo, tmp_path):
    """The engine took the job but its reply never came (a stalled connection) when the bot shut down: the job is
    cancelled on the engine under the id the bot chose, not left running there while it is requeued here."""

    class ReplyLost(FakeEngine):
        async def submit(self, request):
            await super().submit(request)
            await asyncio.Event().wait()  # the reply never comes

        async def cancel(self, request_id):
            self.cancelled.append(request_id)
            return await super().cancel(request_id)

    engine = ReplyLost()
    engine.gate, engine.cancelled = asyncio.Event(), []
    svc = GenerationService(repo, engine, RecordingPublisher(), output_dir=tmp_path / "o", concurrency=1)
    await svc.start()
    gid = (await svc.submit(user_id=95, prompt="a red circle", n=1)).generation_id
    for _ in range(200):
        if engine.submitted:
            break
        await asyncio.sleep(0.01)
    await svc.stop(grace=0.05)
    [request] = engine.submitted
    assert engine.cancelled == [request.request_id]
    assert (await repo.get_generation(gid)).status == "queued"  # back in the queue for the next start
    await engine.close()


async def _service_with(bot_db_url, engine, output_dir):
    repo = make_repo(bot_db_url)
    pub = RecordingPublisher()
    limiter = RateLimiter(policy=LimitPolicy(user="100 per minute", guild="", daily_quota=None))
    svc = GenerationService(repo, engine, pub, output_dir=output_dir, limiter=limiter,
                            scheduler=Scheduler(per_user_cap=5), concurrency=1, progress_interval=0.0)
    svc.runner.retry_delay = 0.01
    await svc.start()
    return svc, repo, pub


async def test_a_result_that_cannot_be_stored_fails_the_job_and_tells_the_user(bot_db_url, tmp_path):
    """Not only engine errors end a job: a disk that refuses the PNGs must not leave it 'running' forever."""
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    engine = FakeEngine()
    svc, repo, pub = await _service_with(bot_db_url, engine, blocker)
    try:
        adm = await svc.submit(user_id=1, prompt="a red circle", n=1)
        (outcome,) = await pub.wait_for(1)
        assert not outcome.ok and "could not be stored" in outcome.error
        await asyncio.sleep(0.1)  # delivered is stamped just after the publisher returns
        gen = await repo.get_generation(adm.generation_id)
        assert gen.status == "failed" and gen.delivered_at is not None
        assert await svc.user_queue(1) == []
    finally:
        await svc.stop(grace=1)
        await engine.close()
        await repo.close()


class _BrokenProgressEngine(FakeEngine):
    """The result arrives, but the progress stream breaks (an HTTP engine's SSE connection dropping)."""

    async def events(self, request_id):
        from engine.api import EngineError

        raise EngineError("lost the event stream")
        yield  # pragma: no cover - makes this an async generator


async def test_a_broken_progress_stream_does_not_fail_a_finished_job(bot_db_url, tmp_path):
    engine = _BrokenProgressEngine()
    svc, repo, pub = await _service_with(bot_db_url, engine, tmp_path / "out")
    try:
        adm = await svc.submit(user_id=1, prompt="a red circle", n=2)
        (outcome,) = await pub.wait_for(1)
        assert outcome.ok and len(outcome.images) == 2
        assert (await repo.get_generation(adm.generation_id)).status == "done"
    finally:
        await svc.stop(grace=1)
        await engine.close()
        await repo.close()


async def test_a_job_the_engine_stops_talking_about_is_cancelled_there_and_failed(bot_db_url, tmp_path):
    """A hung model (the job never leaves the engine's queue, no event follows) must not hold the job and its user
    forever: after ENGINE_STALL_TIMEOUT of silence the job is cancelled on the engine and failed with a message;
    the user's slot is free again."""
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # never set: the engine takes the job and then says nothing more
    svc, repo, pub = await _service_with(bot_db_url, engine, tmp_path / "out")
    svc.runner.engine_stall_timeout = 0.3
    try:
        adm = await svc.submit(user_id=1, prompt="a red circle", n=1)
        (outcome,) = await asyncio.wait_for(pub.wait_for(1), 10)
        assert not outcome.ok and "stopped responding" in outcome.error
        assert (await repo.get_generation(adm.generation_id)).status == "failed"
        (rid,) = engine._tasks
        await asyncio.sleep(0.05)
        assert engine._tasks[rid].done()  # cancelled on the engine, not left to run later
        assert await svc.user_queue(1) == []
    finally:
        await svc.stop(grace=1)
        await engine.close()
        await repo.close()


async def test_a_slow_engine_that_reports_progress_is_not_given_up(bot_db_url, tmp_path):
    """Only silence counts: a job that takes several stall timeouts in all, with events between, finishes."""
    engine = FakeEngine(steps=8, step_s=0.1)
    svc, repo, pub = await _service_with(bot_db_url, engine, tmp_path / "out")
    svc.runner.engine_stall_timeout = 0.3
    try:
        await svc.submit(user_id=1, prompt="a red circle", n=1)
        (outcome,) = await asyncio.wait_for(pub.wait_for(1), 10)
        assert outcome.ok, outcome.error
    finally:
        await svc.stop(grace=1)
        await engine.close()
        await repo.close()


async def test_a_transient_claim_failure_is_retried(bot_db_url, tmp_path):
    engine = FakeEngine()
    svc, repo, pub = await _service_with(bot_db_url, engine, tmp_path / "out")
    real_claim, calls = repo.claim, []

    async def flaky_claim(generation_id, *args):
        calls.append(generation_id)
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        return await real_claim(generation_id, *args)

    repo.claim = flaky_claim
    try:
        adm = await svc.submit(user_id=1, prompt="a red circle", n=1)
        (outcome,) = await pub.wait_for(1)
        assert outcome.ok and calls == [adm.generation_id, adm.generation_id]
    finally:
        await svc.stop(grace=1)
        await engine.close()
        await repo.close()


async def test_engine_request_ids_do_not_clash_across_bot_processes(tmp_path):
    """Two bots (or one on a fresh database) both have a generation 1; an engine service keeps request ids for its
    result TTL and refuses a second 'gen-1-1' as a duplicate, so the ids carry a per-process nonce."""
    seen = []

    class Recording(FakeEngine):
        async def submit(self, request):
            seen.append(request.request_id)
            return await super().submit(request)

    for k in range(2):
        url = sqlite_url(tmp_path / f"bot{k}")
        create_schema(url)
        engine = Recording()
        svc, repo, pub = await _service_with(url, engine, tmp_path / "out")
        try:
            adm = await svc.submit(user_id=1, prompt="a red circle", n=1)
            assert adm.generation_id == 1  # each database numbers from 1
            await pub.wait_for(1)
        finally:
            await svc.stop(grace=1)
            await engine.close()
            await repo.close()
    assert len(seen) == 2 and seen[0] != seen[1]


async def test_a_critical_flag_is_withheld_even_where_the_guild_spoilers_flagged_images(running_service):
    svc, repo, engine, pub = running_service
    await svc.submit(user_id=4, guild_id=1, prompt="a severe lighthouse", n=2, seed=1)  # guild 1: spoiler mode
    [outcome] = await pub.wait_for(1)
    [critical] = [im for im in outcome.images if im.flagged]
    assert critical.hidden and critical.withheld
    assert all(not im.withheld for im in outcome.images if not im.flagged)
    [case] = await rows_of(repo, ModerationCase)
    assert case.image_id == critical.id and case.reason.startswith("safety checker (critical): ")
    assert (await repo.get_image(critical.id)).critical is True
