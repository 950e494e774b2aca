"""Leases and posting: resuming at start, results posted later or again, and several bot processes sharing one
database (take-over of a dead process's jobs, the per-user cap across processes)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from bot.ratelimit import LimitPolicy, RateLimiter
from bot.scheduler import Scheduler
from bot.service import GenerationService
from tests.fakes.botkit import RecordingPublisher, make_repo, wait_delivered, wait_status
from tests.fakes.engine import FakeEngine


async def test_restart_resumes_queued_and_interrupted_jobs(bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # nothing finishes before the "crash"
    pub = RecordingPublisher()
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "o", concurrency=2)
    await svc.start()
    ids = [(await svc.submit(user_id=20 + i, prompt="a purple circle", n=1)).generation_id for i in range(4)]
    await asyncio.sleep(0.05)
    statuses = sorted([(await repo.get_generation(g)).status for g in ids])
    assert statuses == ["queued", "queued", "running", "running"]
    await svc.stop(grace=0.05)
    await engine.close()
    assert [(await repo.get_generation(g)).status for g in ids] == ["queued"] * 4
    assert pub.outcomes == []
    await repo.close()

    # a new process: new repository, engine, service
    repo2 = make_repo(bot_db_url)
    engine2 = FakeEngine()
    pub2 = RecordingPublisher()
    svc2 = GenerationService(repo2, engine2, pub2, output_dir=tmp_path / "o", concurrency=2)
    resumed = await svc2.start()
    assert sorted(resumed) == sorted(ids)
    outcomes = await pub2.wait_for(4)
    assert sorted(o.generation.id for o in outcomes) == sorted(ids)
    for g in ids:
        gen = await wait_delivered(repo2, g)
        assert gen.status == "done" and len(gen.images) == 1 and gen.delivered_at is not None
    await svc2.stop()
    await engine2.close()
    await repo2.close()


async def test_undelivered_results_are_posted_on_start(bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    pub = RecordingPublisher()
    pub.fail_next = 1  # Discord was down when the result was ready
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "o")
    await svc.start()
    adm = await svc.submit(user_id=30, prompt="a white boat", n=2)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if (await repo.get_generation(adm.generation_id)).status == "done":
            break
    await svc.stop()
    assert pub.outcomes == [] and (await repo.get_generation(adm.generation_id)).delivered_at is None
    svc2 = GenerationService(repo, engine, pub, output_dir=tmp_path / "o")
    await svc2.start()
    [o] = await pub.wait_for(1)
    assert o.generation.id == adm.generation_id and len(o.images) == 2 and all(im.png for im in o.images)
    assert (await wait_delivered(repo, adm.generation_id)).delivered_at is not None
    await svc2.stop()
    await engine.close()
    await repo.close()


async def test_a_failed_post_is_tried_again_while_the_bot_runs(repo, tmp_path):
    """Discord fails the first two posts of a result (a 503 after discord.py's own retries): the bot tries again
    after each delay, without a restart, and the third attempt delivers it; past the last delay it gives up
    until the next start."""
    engine = FakeEngine(step_s=0.0)
    pub = RecordingPublisher()
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "o")
    svc.leases.post_retry_delays = (0.05, 0.05)
    await svc.start()
    try:
        pub.fail_next = 2
        delivered = (await svc.submit(user_id=31, prompt="a white boat", n=1)).generation_id
        [o] = await pub.wait_for(1)
        assert o.generation.id == delivered and pub.fail_next == 0
        assert (await wait_delivered(repo, delivered)).delivered_at is not None

        pub.fail_next = 3
        lost = (await svc.submit(user_id=32, prompt="a red boat", n=1)).generation_id
        for _ in range(200):
            if pub.fail_next == 0 and not svc.leases.retrying and not svc.leases.publishing:
                break
            await asyncio.sleep(0.01)
        assert pub.fail_next == 0 and len(pub.outcomes) == 1
        assert (await repo.get_generation(lost)).delivered_at is None  # left to the next start
    finally:
        await svc.stop()
        await engine.close()


LEASE_S = 1.0  # short enough to watch leases run out, long enough that a loaded machine's stalls never lose one


def _shared_database_pair(repo, out, *, lease_a=LEASE_S, lease_b=LEASE_S, repo_a=None):
    """Two bot processes on one database (as on PostgreSQL; SQLite is one process's): A's engine never finishes a
    job, B's finishes at once; A uses ``repo_a`` if given (another host). Returns (svc_a, pub_a, svc_b, pub_b)."""
    engine_a, engine_b = FakeEngine(), FakeEngine(step_s=0.0)
    engine_a.gate = asyncio.Event()
    pub_a, pub_b = RecordingPublisher(), RecordingPublisher()
    lim = RateLimiter(policy=LimitPolicy(user="100 per minute", daily_quota=None))
    svc_a = GenerationService(repo_a or repo, engine_a, pub_a, output_dir=out / "a", concurrency=1,
                              lease_s=lease_a, limiter=lim)
    svc_b = GenerationService(repo, engine_b, pub_b, output_dir=out / "b", concurrency=1, lease_s=lease_b)
    svc_a.leases.exclusive_database = svc_b.leases.exclusive_database = False
    return svc_a, pub_a, svc_b, pub_b


async def _stop_pair(svc_a, svc_b) -> None:
    await svc_a.stop(grace=0.05)
    await svc_b.stop()
    await svc_a.engine.close()
    await svc_b.engine.close()


async def test_two_bot_processes_on_one_database_keep_each_others_jobs(repo, tmp_path):
    """Bot B starting on a shared database leaves bot A's running job alone while A renews its lease; when A
    dies (stops renewing), B takes the job back, runs it and posts it; A's late graceful stop cannot requeue it."""
    svc_a, pub_a, svc_b, pub_b = _shared_database_pair(repo, tmp_path)
    engine_b = svc_b.engine
    await svc_a.start()
    try:
        gid = (await svc_a.submit(user_id=50, prompt="a white star", n=1)).generation_id
        assert (await wait_status(repo, gid, "running")).owner == svc_a.owner
        assert await svc_b.start() == []
        await asyncio.sleep(1.5 * LEASE_S)  # well past one lease: A renewed it
        gen = await repo.get_generation(gid)
        assert gen.status == "running" and gen.owner == svc_a.owner and engine_b.submitted == []

        svc_a.leases.renewal.cancel()  # A "dies": its job stays running in the database, unrenewed
        [o] = await pub_b.wait_for(1, timeout=10)
        assert o.generation.id == gid and (await wait_delivered(repo, gid)).status == "done"
        assert [r.prompt for r in engine_b.submitted] == ["a white star"]
    finally:
        await _stop_pair(svc_a, svc_b)
    gen = await repo.get_generation(gid)
    assert gen.status == "done" and gen.delivered_at is not None and pub_a.outcomes == []


async def test_the_per_user_cap_counts_jobs_other_processes_hold(repo, tmp_path):
    """Several bot processes on one database share a user's cap: with 2 jobs held by A (one running, one queued),
    the same user is refused by B with the queue message; another user is not; once A's jobs finish, B admits
    the first user again."""
    svc_a, pub_a, svc_b, pub_b = _shared_database_pair(repo, tmp_path, lease_a=60, lease_b=60)
    svc_a.scheduler.per_user_cap = svc_b.scheduler.per_user_cap = 2
    await svc_a.start()
    await svc_b.start()
    try:
        first = (await svc_a.submit(user_id=70, prompt="a white star", n=1)).generation_id
        await wait_status(repo, first, "running")
        assert (await svc_a.submit(user_id=70, prompt="a red circle", n=1)).ok
        refused = await svc_b.submit(user_id=70, prompt="a blue square", n=1)
        assert not refused.ok and refused.category == "queue" and "limit is 2" in refused.message
        assert (await svc_b.submit(user_id=71, prompt="a blue square", n=1)).ok

        svc_a.engine.gate.set()  # A's jobs finish
        await pub_a.wait_for(2, timeout=10)
        assert (await svc_b.submit(user_id=70, prompt="a blue square", n=1)).ok
    finally:
        await _stop_pair(svc_a, svc_b)


async def test_two_processes_admitting_one_user_at_once_stay_within_the_cap(repo, migrated_url, tmp_path):
    """The per-user cap holds across processes even when their admissions of one user overlap (each read the
    other's jobs before either insert committed): the insert counts again under a per-user database lock."""
    from store.repository import Repository

    repo_a = Repository.from_url(migrated_url)  # another process: its own connections
    svc_a, pub_a, svc_b, pub_b = _shared_database_pair(repo, tmp_path, lease_a=60, lease_b=60, repo_a=repo_a)
    svc_b.engine.gate = asyncio.Event()  # B's jobs stay running too: nothing frees a slot during the test
    svc_a.scheduler.per_user_cap = svc_b.scheduler.per_user_cap = 2
    svc_b.limiter = svc_a.limiter
    await svc_a.start()
    await svc_b.start()
    try:
        admissions = await asyncio.gather(*(svc.submit(user_id=80, prompt=f"a red circle {k}", n=1)
                                            for k in range(4) for svc in (svc_a, svc_b)))
        assert sum(a.ok for a in admissions) == 2
        refused = [a for a in admissions if not a.ok]
        assert {a.category for a in refused} == {"queue"} and all("limit is 2" in a.message for a in refused)
        assert len(await repo.active_ids(80)) == 2
    finally:
        await _stop_pair(svc_a, svc_b)
        await repo_a.close()


async def test_a_job_adopted_while_the_cap_is_read_counts_once(repo, tmp_path, monkeypatch):
    """The lease loop may adopt one of the user's orphaned jobs while ``submit`` awaits the count of the user's
    jobs held elsewhere: that job is then both in the count and in this process's queue, and must count once
    (cap 2, one job: admitted)."""
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    svc = GenerationService(repo, engine, RecordingPublisher(), output_dir=tmp_path / "o", concurrency=1, lease_s=60)
    svc.leases.exclusive_database = False
    svc.scheduler.per_user_cap = 2
    await svc.start()
    try:
        busy = await svc.submit(user_id=81, prompt="a white star", n=1)  # keeps the one worker waiting
        await wait_status(repo, busy.generation_id, "running")
        orphan = await repo.create_generation(user_id=80, prompt="a red circle")  # its process died: no lease
        read = repo.active_ids

        async def read_then_adopt(*args, **kwargs):
            ids = await read(*args, **kwargs)
            assert await svc.leases.adopt_queued() == [orphan.id]  # a lease beat lands between the read and reserve
            return ids

        monkeypatch.setattr(repo, "active_ids", read_then_adopt)
        second = await svc.submit(user_id=80, prompt="a blue square", n=1)
        assert second.ok, second.message
        assert orphan.id in svc.scheduler.queue and second.generation_id in svc.scheduler.queue
        monkeypatch.undo()
        third = await svc.submit(user_id=80, prompt="a green circle", n=1)
        assert not third.ok and third.category == "queue" and "limit is 2" in third.message
    finally:
        engine.gate.set()
        await svc.stop(grace=0.5)
        await engine.close()


async def test_a_queued_job_another_process_took_leaves_this_queue(repo, tmp_path):
    """Process A stalled past a queued job's lease and process B adopted it: A's next lease beat finds it can no
    longer renew that lease and drops the job from its queue, so only B runs it."""
    from sqlalchemy import update

    from store.models import Generation

    svc_a, pub_a, svc_b, pub_b = _shared_database_pair(repo, tmp_path, lease_a=0.3)
    await svc_a.start()
    try:
        first = (await svc_a.submit(user_id=90, prompt="a white star", n=1)).generation_id
        await wait_status(repo, first, "running")  # A's one worker waits on its engine's gate
        second = (await svc_a.submit(user_id=91, prompt="a red circle", n=1)).generation_id
        assert second in svc_a.scheduler.queue
        async with repo.sessions.begin() as s:  # B adopted it (A's lease on it had run out)
            await s.execute(update(Generation).where(Generation.id == second)
                            .values(owner="proc-b", lease_until=repo.now() + timedelta(seconds=60)))
        for _ in range(100):
            if second not in svc_a.scheduler.queue:
                break
            await asyncio.sleep(0.02)
        assert second not in svc_a.scheduler.queue
        svc_a.engine.gate.set()
        await pub_a.wait_for(1, timeout=10)
        await asyncio.sleep(0.2)
        assert [r.prompt for r in svc_a.engine.submitted] == ["a white star"]
        gen = await repo.get_generation(second)
        assert gen.status == "queued" and gen.owner == "proc-b"
    finally:
        await _stop_pair(svc_a, svc_b)


async def test_a_process_whose_clock_is_behind_keeps_its_jobs(repo, migrated_url, tmp_path):
    """Bot A's host clock is 2 minutes behind: its leases are still on the database's clock, so B leaves A's
    running and queued jobs alone while A lives (on A's own clock they would have run out at once), and takes
    them when A dies."""
    from datetime import timedelta

    from store.models import utcnow
    from store.repository import Repository

    slow = Repository.from_url(migrated_url, clock=lambda: utcnow() - timedelta(minutes=2))
    svc_a, pub_a, svc_b, pub_b = _shared_database_pair(repo, tmp_path, repo_a=slow)
    await svc_a.start()
    try:
        running = (await svc_a.submit(user_id=50, prompt="a white star", n=1)).generation_id
        await wait_status(repo, running, "running")
        queued = (await svc_a.submit(user_id=51, prompt="a red circle", n=1)).generation_id
        assert await svc_b.start() == []
        await asyncio.sleep(1.5 * LEASE_S)  # past one lease and a beat of B's
        assert svc_b.engine.submitted == [] and (await repo.get_generation(running)).owner == svc_a.owner
        assert (await repo.get_generation(queued)).lease_until > utcnow()

        svc_a.leases.renewal.cancel()  # A dies
        outcomes = await pub_b.wait_for(2, timeout=10)
        assert sorted(o.generation.id for o in outcomes) == [running, queued]
    finally:
        await _stop_pair(svc_a, svc_b)
        await slow.close()


async def test_queued_jobs_of_a_dead_process_are_run_by_a_live_one(repo, tmp_path):
    """Bot A dies with a job running and one waiting in its queue: B takes both over once A's leases run out
    (not before), runs and posts them. A graceful stop hands its queued jobs over at once."""
    svc_a, pub_a, svc_b, pub_b = _shared_database_pair(repo, tmp_path / "1")
    engine_b = svc_b.engine
    await svc_a.start()
    try:
        first = (await svc_a.submit(user_id=50, prompt="a white star", n=1)).generation_id
        await wait_status(repo, first, "running")
        waiting = (await svc_a.submit(user_id=51, prompt="a red circle", n=1)).generation_id
        assert (await repo.get_generation(waiting)).owner == svc_a.owner
        assert await svc_b.start() == []  # A is alive: its queue is its own
        await asyncio.sleep(1.5 * LEASE_S)  # past one lease: A renewed both
        assert engine_b.submitted == [] and (await repo.get_generation(waiting)).status == "queued"

        svc_a.leases.renewal.cancel()  # A "dies"
        outcomes = await pub_b.wait_for(2, timeout=10)
        assert sorted(o.generation.id for o in outcomes) == [first, waiting]
        assert sorted(r.prompt for r in engine_b.submitted) == ["a red circle", "a white star"]
    finally:
        await _stop_pair(svc_a, svc_b)
    assert pub_a.outcomes == []

    # a graceful stop: the job left in C's queue is D's at D's next beat, not a lease later
    svc_c, _, svc_d, pub_d = _shared_database_pair(repo, tmp_path / "2", lease_a=60)
    await svc_c.start()
    try:
        running = (await svc_c.submit(user_id=60, prompt="a blue square", n=1)).generation_id
        await wait_status(repo, running, "running")
        queued = (await svc_c.submit(user_id=61, prompt="a black star", n=1)).generation_id
        await svc_c.stop(grace=0.05)
        await svc_d.start()
        outcomes = await pub_d.wait_for(2, timeout=10)
        assert sorted(o.generation.id for o in outcomes) == sorted([running, queued])
    finally:
        await _stop_pair(svc_c, svc_d)


class _CountingPublisher(RecordingPublisher):
    """Slow posts (they overlap lease beats); posts of the generation ids in ``failing`` always raise."""

    def __init__(self, failing=()) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.failing = set(failing)

    async def publish(self, outcome):
        self.calls.append(outcome.generation.id)
        await asyncio.sleep(0.05)
        if outcome.generation.id in self.failing:
            raise RuntimeError("403 Forbidden")
        return await super().publish(outcome)


async def test_on_a_shared_database_every_result_is_posted_once_and_a_failed_post_is_not_retried_each_beat(
        bot_db_url, tmp_path):
    """Lease beats (every 0.05 s here) while posts are under way must not post a result twice, and a post that
    fails is not retried by every beat (the next start does)."""
    repo = make_repo(bot_db_url)
    engine = FakeEngine(step_s=0.0, concurrency=8)
    pub = _CountingPublisher()
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "o", concurrency=4, lease_s=0.15,
                            limiter=RateLimiter(policy=LimitPolicy(user="1000 per minute", guild="",
                                                                   daily_quota=None)),
                            scheduler=Scheduler(per_user_cap=50))
    svc.leases.exclusive_database = False
    await svc.start()
    try:
        first = (await svc.submit(user_id=60, prompt="a red star", n=1)).generation_id
        pub.failing.add(first)
        ids = [first] + [(await svc.submit(user_id=61 + i % 3, prompt=f"shape {i}", n=1)).generation_id
                         for i in range(20)]
        await pub.wait_for(20)
        await asyncio.sleep(0.6)  # a dozen beats after the last post
        assert sorted(pub.calls) == sorted(ids)  # each once, the failing one included (tried once)
        assert (await repo.get_generation(first)).delivered_at is None
    finally:
        await svc.stop()
    svc2 = GenerationService(repo, engine, RecordingPublisher(), output_dir=tmp_path / "o", lease_s=0.15)
    svc2.leases.exclusive_database = False
    await svc2.start()
    try:
        [o] = await svc2.publisher.wait_for(1)  # the next start posts it
        assert o.generation.id == first
    finally:
        await svc2.stop()
        await engine.close()
        await repo.close()
