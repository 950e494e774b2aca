"""The request lifecycle over a real database (SQLite file) and the fake engine."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest

from bot.ratelimit import LimitPolicy, RateLimiter, StrikePolicy
from bot.scheduler import Scheduler
from bot.service import GenerationService, derive_seed
from store.models import Feedback, ModerationCase, Refusal
from tests.fakes.botkit import RecordingPublisher, create_schema, make_repo, sqlite_url
from tests.fakes.engine import FakeEngine, colour_for


@pytest.fixture
def bot_db_url(tmp_path):
    url = sqlite_url(tmp_path)
    create_schema(url)
    return url


@pytest.fixture
async def env(bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    pub = RecordingPublisher()
    limiter = RateLimiter(policy=LimitPolicy(user="100 per minute", guild="1000 per minute", daily_quota=None))
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "out", limiter=limiter,
                            scheduler=Scheduler(per_user_cap=5), concurrency=2, progress_interval=0.0)
    await svc.start()
    yield svc, repo, engine, pub
    await svc.stop(grace=1)
    await engine.close()
    await repo.close()


async def _delivered(repo, generation_id):
    """The row once the service has marked it delivered (it does so just after the publisher returns)."""
    for _ in range(200):
        gen = await repo.get_generation(generation_id)
        if gen.delivered_at is not None:
            return gen
        await asyncio.sleep(0.01)
    return gen


async def _rows(repo, model):
    from sqlalchemy import select

    async with repo.sessions() as s:
        return list((await s.execute(select(model))).scalars())


async def test_submit_generates_persists_and_publishes(env, tmp_path):
    svc, repo, engine, pub = env
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
    gen = await _delivered(repo, adm.generation_id)
    assert gen.status == "done" and gen.seed == 7 and gen.delivered_at is not None
    assert gen.result_message_id == 10_000 + gen.id and gen.checkpoint_id == "fake-ckpt"
    assert len(gen.images) == 4 and all(i.token_bytes for i in gen.images)
    # the image at candidate index i has the colour of stream (seed, i)
    from PIL import Image as PILImage

    for im in outcome.images:
        assert PILImage.open(im.path).getpixel((0, 0)) == colour_for(7, im.index)
    states = [u.state for u in pub.progress_updates if u.generation_id == gen.id]
    assert "running" in states and any(u.tokens_done for u in pub.progress_updates)
    assert engine.submitted[0].prompt == "a red circle on a blue background" and engine.submitted[0].n == 4


async def test_filter_refusals_are_recorded_and_strikes_escalate(env):
    svc, repo, engine, pub = env
    svc.limiter.strikes = StrikePolicy(free=1, base_s=60)
    a = await svc.submit(user_id=2, prompt="n.u.d.e beach")
    assert not a.ok and a.category == "sexual" and "can't draw" in a.message and "cooldown" not in a.message
    b = await svc.submit(user_id=2, prompt="f u c k")
    assert not b.ok and "cooldown" in b.message
    c = await svc.submit(user_id=2, prompt="a cat wearing a hat")
    assert not c.ok and c.category == "rate:cooldown" and c.retry_after > 50
    refusals = await _rows(repo, Refusal)
    assert [r.reason.split(":")[0] for r in refusals] == ["sexual", "profanity", "rate"]
    assert refusals[0].normalized == "nude beach"
    assert (await repo.get_user_state(2)).strikes == 2
    assert engine.submitted == []


async def test_rate_limit_and_queue_cap_refusals(env):
    svc, repo, engine, pub = env
    svc.limiter.policy = LimitPolicy(user="2 per minute", guild="", daily_quota=None)
    engine.gate = asyncio.Event()
    assert (await svc.submit(user_id=3, prompt="a blue square")).ok
    assert (await svc.submit(user_id=3, prompt="a blue square")).ok
    r = await svc.submit(user_id=3, prompt="a blue square")
    assert not r.ok and r.category == "rate:user" and 0 < r.retry_after <= 60 and "Try again in" in r.message
    svc.limiter.policy = LimitPolicy(user="100 per minute", guild="", daily_quota=None)
    svc.scheduler.per_user_cap = 2
    r = await svc.submit(user_id=3, prompt="a blue square")
    assert not r.ok and r.category == "queue" and "limit is 2" in r.message
    await repo.update_guild_settings(9, max_queue_per_user=3)
    assert (await svc.submit(user_id=3, guild_id=9, prompt="a blue square")).ok
    assert len(await _rows(repo, Refusal)) == 2
    engine.gate.set()
    await pub.wait_for(3)


async def test_flagged_images_are_hidden_or_withheld_and_cases_opened(env):
    svc, repo, engine, pub = env
    await repo.update_guild_settings(77, flagged_mode="withhold")
    await svc.submit(user_id=4, guild_id=1, prompt="an unsafe lighthouse", n=2, seed=1)
    await svc.submit(user_id=4, guild_id=77, prompt="an unsafe lighthouse", n=2, seed=1)
    outcomes = await pub.wait_for(2)
    by_guild = {o.generation.guild_id: o for o in outcomes}
    flagged1 = [im for im in by_guild[1].images if im.flagged]
    assert len(flagged1) == 1 and flagged1[0].hidden and not flagged1[0].withheld
    flagged77 = [im for im in by_guild[77].images if im.flagged]
    assert len(flagged77) == 1 and flagged77[0].withheld
    cases = await _rows(repo, ModerationCase)
    assert sorted(c.image_id for c in cases) == sorted([flagged1[0].id, flagged77[0].id])
    assert all(c.source == "auto" and "nsfw" in c.reason for c in cases)


async def test_reroll_and_variation_lineage(env):
    svc, repo, engine, pub = env
    first = await svc.submit(user_id=5, prompt="a green triangle", n=3, seed=11)
    [o] = await pub.wait_for(1)
    rr = await svc.reroll(first.generation_id, user_id=6)
    target = o.images[1]
    var = await svc.variation(target.id, user_id=5)
    await pub.wait_for(3)
    g_rr = await repo.get_generation(rr.generation_id)
    g_var = await repo.get_generation(var.generation_id)
    assert g_rr.kind == "reroll" and g_rr.parent_generation_id == first.generation_id and g_rr.user_id == 6
    assert g_rr.prompt == "a green triangle" and g_rr.n_images == 3
    assert g_var.kind == "variation" and g_var.parent_image_id == target.id
    assert g_var.seed == derive_seed(11, target.index) != 11
    assert (await svc.variation(99999, user_id=5)).category == "invalid"


async def test_feedback_and_reports(env):
    svc, repo, engine, pub = env
    await svc.submit(user_id=7, prompt="a yellow star", n=2, seed=3)
    [o] = await pub.wait_for(1)
    img = o.images[0].id
    assert (await svc.feedback(img, 8, "up")).ok
    assert (await svc.feedback(img, 8, "down")).ok  # replaces the vote
    rep = await svc.feedback(img, 9, "report", reason="bias", note="all the same")
    assert rep.ok and rep.case_id
    assert not (await svc.feedback(img, 9, "report", reason="rude")).ok
    assert not (await svc.feedback(424242, 9, "up")).ok
    rows = await _rows(repo, Feedback)
    assert sorted((r.user_id, r.kind, r.reason) for r in rows) == [(8, "down", None), (9, "report", "bias")]
    case = await repo.get_case(rep.case_id)
    assert case.source == "report" and case.image_id == img


async def test_cancel_while_queued(env):
    svc, repo, engine, pub = env
    engine.gate = asyncio.Event()
    ids = [(await svc.submit(user_id=10 + i, prompt="a red ball")).generation_id for i in range(4)]
    await asyncio.sleep(0.05)  # two are taken by the workers, two wait
    queued = [g for g in ids if svc.position(g)]
    assert len(queued) == 2
    assert not await svc.cancel(queued[0], user_id=999)  # not the owner
    owner = (await repo.get_generation(queued[0])).user_id
    assert await svc.cancel(queued[0], user_id=owner)
    assert not await svc.cancel(queued[0], user_id=owner)
    assert (await repo.get_generation(queued[0])).status == "cancelled"
    engine.gate.set()
    await pub.wait_for(3)
    assert len(engine.submitted) == 3


async def test_engine_failure_is_recorded_and_published(env):
    svc, repo, engine, pub = env
    adm = await svc.submit(user_id=11, prompt="make it explode")
    [o] = await pub.wait_for(1)
    assert not o.ok and "exploded" in o.error
    gen = await _delivered(repo, adm.generation_id)
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
        gen = await _delivered(repo2, g)
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
    assert (await _delivered(repo, adm.generation_id)).delivered_at is not None
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
    svc.post_retry_delays = (0.05, 0.05)
    await svc.start()
    try:
        pub.fail_next = 2
        delivered = (await svc.submit(user_id=31, prompt="a white boat", n=1)).generation_id
        [o] = await pub.wait_for(1)
        assert o.generation.id == delivered and pub.fail_next == 0
        assert (await _delivered(repo, delivered)).delivered_at is not None

        pub.fail_next = 3
        lost = (await svc.submit(user_id=32, prompt="a red boat", n=1)).generation_id
        for _ in range(200):
            if pub.fail_next == 0 and not svc._post_retries and not svc._publishing:
                break
            await asyncio.sleep(0.01)
        assert pub.fail_next == 0 and len(pub.outcomes) == 1
        assert (await repo.get_generation(lost)).delivered_at is None  # left to the next start
    finally:
        await svc.stop()
        await engine.close()


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
        assert (await _delivered(repo, g)).delivered_at is not None
    await svc2.stop()
    await engine.close()
    await repo.close()


def test_derive_seed_is_stable():
    assert derive_seed(1, 2) == derive_seed(1, 2)
    assert len({derive_seed(1, i) for i in range(9)}) == 9
    assert all(0 <= derive_seed(s, i) < 2**31 for s in range(5) for i in range(5))




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
        assert len(await _rows(repo, ModerationCase)) == 2 and len(await _rows(repo, Refusal)) == 1
        gen = await _delivered(repo, a.generation_id)
        assert gen.status == "done" and gen.delivered_at is not None and len(gen.images) == 3
    finally:
        await svc.stop()
        await engine.close()


async def _status(repo, gid, want, tries=300):
    for _ in range(tries):
        gen = await repo.get_generation(gid)
        if gen.status == want:
            return gen
        await asyncio.sleep(0.01)
    return gen


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
    svc_a.exclusive_database = svc_b.exclusive_database = False
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
        assert (await _status(repo, gid, "running")).owner == svc_a.owner
        assert await svc_b.start() == []
        await asyncio.sleep(1.5 * LEASE_S)  # well past one lease: A renewed it
        gen = await repo.get_generation(gid)
        assert gen.status == "running" and gen.owner == svc_a.owner and engine_b.submitted == []

        svc_a._lease_task.cancel()  # A "dies": its job stays running in the database, unrenewed
        [o] = await pub_b.wait_for(1, timeout=10)
        assert o.generation.id == gid and (await _delivered(repo, gid)).status == "done"
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
        await _status(repo, first, "running")
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


async def test_a_job_adopted_while_the_cap_is_read_counts_once(repo, tmp_path, monkeypatch):
    """The lease loop may adopt one of the user's orphaned jobs while ``submit`` awaits the count of the user's
    jobs held elsewhere: that job is then both in the count and in this process's queue, and must count once
    (cap 2, one job: admitted)."""
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    svc = GenerationService(repo, engine, RecordingPublisher(), output_dir=tmp_path / "o", concurrency=1, lease_s=60)
    svc.exclusive_database = False
    svc.scheduler.per_user_cap = 2
    await svc.start()
    try:
        busy = await svc.submit(user_id=81, prompt="a white star", n=1)  # keeps the one worker waiting
        await _status(repo, busy.generation_id, "running")
        orphan = await repo.create_generation(user_id=80, prompt="a red circle")  # its process died: no lease
        read = repo.active_ids

        async def read_then_adopt(*args, **kwargs):
            ids = await read(*args, **kwargs)
            assert await svc._adopt_queued() == [orphan.id]  # a lease beat lands between the read and reserve
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
        await _status(repo, first, "running")  # A's one worker waits on its engine's gate
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
        await _status(repo, running, "running")
        queued = (await svc_a.submit(user_id=51, prompt="a red circle", n=1)).generation_id
        assert await svc_b.start() == []
        await asyncio.sleep(1.5 * LEASE_S)  # past one lease and a beat of B's
        assert svc_b.engine.submitted == [] and (await repo.get_generation(running)).owner == svc_a.owner
        assert (await repo.get_generation(queued)).lease_until > utcnow()

        svc_a._lease_task.cancel()  # A dies
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
        await _status(repo, first, "running")
        waiting = (await svc_a.submit(user_id=51, prompt="a red circle", n=1)).generation_id
        assert (await repo.get_generation(waiting)).owner == svc_a.owner
        assert await svc_b.start() == []  # A is alive: its queue is its own
        await asyncio.sleep(1.5 * LEASE_S)  # past one lease: A renewed both
        assert engine_b.submitted == [] and (await repo.get_generation(waiting)).status == "queued"

        svc_a._lease_task.cancel()  # A "dies"
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
        await _status(repo, running, "running")
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
    svc.exclusive_database = False
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
    svc2.exclusive_database = False
    await svc2.start()
    try:
        [o] = await svc2.publisher.wait_for(1)  # the next start posts it
        assert o.generation.id == first
    finally:
        await svc2.stop()
        await engine.close()
        await repo.close()


async def test_concurrent_submits_never_exceed_the_per_user_cap_and_inserts_overlap(env):
    """Admission holds no lock across the database insert, yet a burst from one user stops at the cap."""
    svc, repo, engine, pub = env
    engine.gate = asyncio.Event()  # nothing finishes during the burst
    svc.scheduler.per_user_cap = 3
    create = repo.create_generation
    inside, most = 0, 0

    async def slow_create(**kw):
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        try:
            await asyncio.sleep(0.02)  # a slow insert: other admissions run meanwhile
            return await create(**kw)
        finally:
            inside -= 1

    repo.create_generation = slow_create
    results = await asyncio.gather(*(svc.submit(user_id=42, prompt="a green cube", n=1) for _ in range(12)),
                                   *(svc.submit(user_id=100 + k, prompt="a green cube", n=1) for k in range(3)))
    mine = results[:12]
    assert sum(r.ok for r in mine) == 3
    assert {r.category for r in mine if not r.ok} == {"queue"}
    assert all(r.ok for r in results[12:])
    assert most > 1  # inserts of different admissions overlapped
    gens = await repo.list_generations(user_id=42, limit=50)
    assert len(gens) == 3
    assert svc.scheduler._reserved == {}
    engine.gate.set()
    await pub.wait_for(6)


async def test_guild_settings_cached_shared_and_invalidated_by_updates(bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    now = [0.0]
    svc = GenerationService(repo, FakeEngine(), None, output_dir=tmp_path / "o", guild_settings_ttl=5.0,
                            clock=lambda: now[0])
    reads = 0
    real = repo.get_guild_settings

    async def counted(guild_id):
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)
        return await real(guild_id)

    repo.get_guild_settings = counted
    try:
        await repo.update_guild_settings(3, flagged_mode="withhold")
        got = await asyncio.gather(*(svc.guild_settings(3) for _ in range(10)))
        assert reads == 1 and all(g.flagged_mode == "withhold" for g in got)  # ten misses, one read
        assert (await svc.guild_settings(3)).flagged_mode == "withhold" and reads == 1
        assert await svc.guild_settings(None) is None and reads == 1
        await svc.update_guild_settings(3, flagged_mode="spoiler")  # through the service: seen at once
        assert (await svc.guild_settings(3)).flagged_mode == "spoiler" and reads == 2
        await repo.update_guild_settings(3, flagged_mode="withhold")  # another process: seen after the TTL
        assert (await svc.guild_settings(3)).flagged_mode == "spoiler"
        now[0] += 5.1
        assert (await svc.guild_settings(3)).flagged_mode == "withhold" and reads == 3
        with pytest.raises(ValueError):
            await svc.update_guild_settings(3, flagged_mode="blur")
    finally:
        await repo.close()


def test_engine_concurrency_setting_sets_the_workers():
    from types import SimpleNamespace

    from bot.service import service_from_settings

    svc = service_from_settings(SimpleNamespace(engine_concurrency=7), None, FakeEngine(), None)
    assert svc.concurrency == 7
    default = service_from_settings(SimpleNamespace(), None, FakeEngine(), None)
    assert (default.concurrency, default.engine_stall_timeout) == (16, 600)
    assert service_from_settings(SimpleNamespace(engine_stall_timeout=0), None, FakeEngine(),
                                 None).engine_stall_timeout == 0


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


async def _service_with(bot_db_url, engine, output_dir):
    repo = make_repo(bot_db_url)
    pub = RecordingPublisher()
    limiter = RateLimiter(policy=LimitPolicy(user="100 per minute", guild="", daily_quota=None))
    svc = GenerationService(repo, engine, pub, output_dir=output_dir, limiter=limiter,
                            scheduler=Scheduler(per_user_cap=5), concurrency=1, progress_interval=0.0)
    svc.retry_delay = 0.01
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
    svc.engine_stall_timeout = 0.3
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
    svc.engine_stall_timeout = 0.3
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
