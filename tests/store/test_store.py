"""Repository round trips on SQLite and PostgreSQL, concurrency, token packing, URL mapping, SQLite pragmas."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from store.db import (
    DatabaseURLError,
    async_url,
    make_async_engine,
    make_sync_engine,
    parse_url,
    redact_url,
    sync_url,
)
from store.models import Checkpoint, Feedback, Image, UserState, decode_tokens, encode_tokens
from store.repository import ActiveLimitReached, NewImage, NotFound, Repository, StatusError, TakenOver

# --- URLs and engines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "sync", "async_"),
    [
        ("sqlite:///data/x.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:////abs/x.db", "sqlite+pysqlite", "sqlite+aiosqlite"),
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+psycopg", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+psycopg", "postgresql+asyncpg"),
    ],
)
def test_url_mapping(url, sync, async_):
    assert sync_url(url).drivername == sync
    assert async_url(url).drivername == async_
    assert sync_url(url).database == async_url(url).database == parse_url(url).database


@pytest.mark.parametrize("url", ["not a url", "mysql://u@h/db", "postgresql://u@h", ""])
def test_bad_urls(url):
    with pytest.raises(DatabaseURLError):
        parse_url(url)


def test_redact_url_hides_password():
    shown = redact_url("postgresql://bot:hunter2@db.example:5432/dalle")
    assert "hunter2" not in shown and "bot" in shown and "dalle" in shown


def test_sqlite_pragmas(sqlite_url):
    engine = make_sync_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    engine.dispose()


async def test_sqlite_async_pragmas(sqlite_url):
    engine = make_async_engine(sqlite_url)
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
    await engine.dispose()


# --- image tokens -------------------------------------------------------------------------------------------


def test_token_packing_exact_and_compact():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16384, size=256).astype(np.int64)
    tokens[:2] = [0, 32767]
    blob = encode_tokens(tokens)
    assert len(blob) == 2 * 256
    back = decode_tokens(blob)
    assert back.dtype == np.int16 and np.array_equal(back, tokens)
    im = Image(generation_id=1, index=0)
    im.tokens = tokens.reshape(16, 16)  # grids are flattened row-major
    assert np.array_equal(im.tokens, tokens)
    im.tokens = None
    assert im.tokens is None and im.token_bytes is None


@pytest.mark.parametrize("bad", [[-1], [32768], np.array([0.5])])
def test_token_packing_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="image tokens"):
        encode_tokens(bad)


# --- generations --------------------------------------------------------------------------------------------


async def test_generation_round_trip(repo):
    gen = await repo.create_generation(
        user_id=2**62 + 7,  # snowflakes need 64 bits
        guild_id=2**61 + 1,
        channel_id=42,
        prompt="A  Cat",
        normalized_prompt="a cat",
        n_images=4,
        seed=2**63 - 1,
        params={"top_k": 50, "condition_scale": 10.0},
        private=True,
        application_id=123,
        interaction_token="tok",
        token_expires_at=datetime.now(UTC) + timedelta(minutes=15),
    )
    got = await repo.get_generation(gen.id)
    assert got.user_id == 2**62 + 7 and got.guild_id == 2**61 + 1 and got.seed == 2**63 - 1
    assert got.prompt == "A  Cat" and got.normalized_prompt == "a cat"
    assert got.params == {"top_k": 50, "condition_scale": 10.0}
    assert got.status == "queued" and got.kind == "new" and got.private is True and got.attempts == 0
    assert got.queued_at.tzinfo is not None and got.queued_at.utcoffset() == timedelta(0)
    assert got.token_expires_at > got.queued_at
    assert got.images == []
    assert await repo.get_generation(10**9) is None
    assert "tok" not in repr(got) and "Cat" not in repr(got)


async def test_status_life_cycle(repo):
    gen = await repo.create_generation(user_id=1, prompt="p")
    running = await repo.set_status(gen.id, "running")
    assert running.started_at is not None and running.attempts == 1 and running.finished_at is None
    done = await repo.set_status(gen.id, "done", checkpoint_id="demo")
    assert done.finished_at >= done.started_at and done.checkpoint_id == "demo"
    with pytest.raises(StatusError):
        await repo.set_status(gen.id, "running")
    with pytest.raises(ValueError):
        await repo.set_status(gen.id, "exploded")
    with pytest.raises(NotFound):
        await repo.set_status(10**9, "running")
    failed = await repo.create_generation(user_id=1, prompt="q")
    await repo.set_status(failed.id, "running")
    f = await repo.set_status(failed.id, "failed", error="engine down")
    assert f.error == "engine down" and f.status == "failed"


async def test_queue_order_and_claim(repo):
    a = await repo.create_generation(user_id=1, guild_id=10, prompt="a")
    b = await repo.create_generation(user_id=2, guild_id=10, prompt="b")
    c = await repo.create_generation(user_id=1, guild_id=None, prompt="c")
    jobs = await repo.queued_generations()
    assert [j.id for j in jobs] == [a.id, b.id, c.id]
    assert (jobs[0].user_id, jobs[0].guild_id, jobs[2].guild_id) == (1, 10, None)
    assert await repo.active_ids(1) == {a.id, c.id}

    claimed = await repo.claim(b.id)  # the scheduler may pick any job, not only the oldest
    assert claimed.status == "running" and claimed.attempts == 1
    assert await repo.claim(b.id) is None
    assert [j.id for j in await repo.queued_generations()] == [a.id, c.id]
    assert await repo.active_ids(2) == {b.id}  # running still counts against the user's cap
    await repo.set_status(c.id, "cancelled")
    assert await repo.claim(c.id) is None
    assert await repo.active_ids(1) == {a.id}
    assert [j.id for j in await repo.queued_generations(limit=1)] == [a.id]
    await repo.claim(a.id)
    assert await repo.queued_generations() == []


async def test_claim_is_exclusive_under_concurrency(repo):
    gen = await repo.create_generation(user_id=1, prompt="p")
    results = await asyncio.gather(*(repo.claim(gen.id) for _ in range(10)))
    assert sum(r is not None for r in results) == 1
    assert (await repo.get_generation(gen.id)).attempts == 1


async def test_concurrent_writers_lose_nothing(repo):
    async def one(i):
        gen = await repo.create_generation(user_id=i % 7, prompt=f"prompt {i}", seed=i)
        await repo.add_images(gen.id, [NewImage(index=0, tokens=np.full(16, i, dtype=np.int16))])
        return gen.id

    ids = await asyncio.gather(*(one(i) for i in range(50)))
    assert len(set(ids)) == 50
    jobs = await repo.queued_generations()
    assert len(jobs) == 50
    assert sorted(j.id for j in jobs) == sorted(ids)
    for gid in ids[:5]:
        gen = await repo.get_generation(gid)
        assert np.array_equal(gen.images[0].tokens, np.full(16, gen.seed, dtype=np.int16))


async def test_max_active_counts_at_insert_and_concurrent_admissions_take_turns(repo, migrated_url):
    """create_generation(max_active=N) refuses the user's N+1-th queued-or-running job, also when the N+1 inserts
    race from several processes (separate connection pools on one database): exactly N get in. Finished jobs do
    not count; other users are not affected."""
    first = await repo.create_generation(user_id=5, prompt="p", max_active=2)
    await repo.create_generation(user_id=5, prompt="p", max_active=2)
    with pytest.raises(ActiveLimitReached) as info:
        await repo.create_generation(user_id=5, prompt="p", max_active=2)
    assert info.value.active == 2
    await repo.create_generation(user_id=6, prompt="p", max_active=2)
    await repo.set_status(first.id, "running")
    await repo.set_status(first.id, "done")
    await repo.create_generation(user_id=5, prompt="p", max_active=2)  # a finished job frees its slot

    others = [Repository.from_url(migrated_url) for _ in range(3)]  # bot processes sharing the database
    try:
        async def admit(r):
            try:
                return await r.create_generation(user_id=9, prompt="race", max_active=3)
            except ActiveLimitReached:
                return None

        results = await asyncio.gather(*(admit(r) for r in [repo, *others] for _ in range(4)))
        assert sum(r is not None for r in results) == 3
        assert len(await repo.active_ids(9)) == 3
    finally:
        for r in others:
            await r.close()


async def test_requeue_interrupted(repo):
    a = await repo.create_generation(user_id=1, prompt="a")
    b = await repo.create_generation(user_id=1, prompt="b")
    await repo.claim(a.id)
    await repo.claim(b.id)
    await repo.set_status(b.id, "done")
    assert await repo.requeue_interrupted() == [a.id]
    again = await repo.get_generation(a.id)
    assert again.status == "queued" and again.started_at is None and again.attempts == 1
    assert await repo.requeue_interrupted() == []


async def test_leases_keep_a_live_process_jobs_and_free_a_dead_one(repo):
    """Several bot processes on one database: a running job whose owner renews its lease is not taken back; one
    whose lease ran out (or that has none) is; a process restarted under its own id takes back its own jobs. A
    finished, unposted result is adopted once, and only when its owner stopped vouching for it; a process whose
    job was taken back cannot finish it."""
    from datetime import timedelta

    from store.models import utcnow

    soon, past = utcnow() + timedelta(seconds=60), utcnow() - timedelta(seconds=1)
    live, dead, legacy, mine = [await repo.create_generation(user_id=1, prompt=p) for p in "abcd"]
    assert (await repo.claim(live.id, "proc-a", soon)).owner == "proc-a"
    await repo.claim(dead.id, "proc-b", past)
    await repo.claim(legacy.id)  # written by a version without leases
    await repo.claim(mine.id, "proc-c", soon)
    assert await repo.requeue_interrupted(orphans_only=True, mine="proc-c") == [dead.id, legacy.id, mine.id]
    back = await repo.get_generation(dead.id)
    assert back.status == "queued" and back.owner is None and back.lease_until is None
    assert (await repo.get_generation(live.id)).status == "running"

    assert await repo.renew_leases("proc-a", [live.id, dead.id], past) == {live.id}  # only its own job
    assert await repo.requeue_interrupted(orphans_only=True) == [live.id]  # the lease ran out
    await repo.claim(live.id, "proc-a", soon)
    assert await repo.requeue_interrupted() == [live.id]  # the only process on the database: everything

    await repo.claim(live.id, "proc-a", soon)
    with pytest.raises(TakenOver):  # a process whose job was taken back cannot finish it
        await repo.finish_generation(live.id, [], owner="proc-b")
    with pytest.raises(TakenOver):
        await repo.set_status(live.id, "failed", owner="proc-b")
    await repo.set_status(live.id, "done", owner="proc-a")  # finished; proc-a is about to post it
    assert not await repo.adopt_result(live.id, "proc-b", soon)
    assert [g.id for g in await repo.undelivered()] == [live.id]
    await repo.renew_leases("proc-a", [live.id], past)  # proc-a died before posting
    assert await repo.adopt_result(live.id, "proc-b", soon)
    assert not await repo.adopt_result(live.id, "proc-c", soon)  # adopted once
    assert (await repo.get_generation(live.id)).owner == "proc-b"


async def test_leases_are_on_the_database_clock_so_skewed_hosts_agree(repo, migrated_url):
    """Two processes whose local clocks are 2 minutes apart: before measuring the database's clock, the slow one's
    30-second lease has already run out for the other, which would take its running job; after
    :meth:`Repository.sync_clock` both write and compare database time, and the job is left alone until the lease
    really runs out."""
    from datetime import timedelta

    from store.models import utcnow
    from store.repository import Repository

    slow = Repository.from_url(migrated_url, clock=lambda: utcnow() - timedelta(minutes=2))
    try:
        job = await slow.create_generation(user_id=1, prompt="a")
        assert await slow.claim(job.id, "slow-host", slow.now() + timedelta(seconds=30))
        assert await repo.requeue_interrupted(orphans_only=True) == [job.id]  # taken from a live process

        offset = await slow.sync_clock()
        assert abs(offset - timedelta(minutes=2)) < timedelta(seconds=2)
        assert abs(slow.now() - utcnow()) < timedelta(seconds=2)
        await repo.sync_clock()
        assert abs(repo.clock_offset) < timedelta(seconds=2)  # this host's clock is the database's
        assert await slow.claim(job.id, "slow-host", slow.now() + timedelta(seconds=30))
        assert await repo.requeue_interrupted(orphans_only=True) == []  # the lease holds
        assert abs((await repo.get_generation(job.id)).started_at - utcnow()) < timedelta(seconds=2)
        await slow.renew_leases("slow-host", [job.id], slow.now() - timedelta(seconds=1))  # it stops vouching
        assert await repo.requeue_interrupted(orphans_only=True) == [job.id]
    finally:
        await slow.close()


async def test_now_keeps_the_database_clock_when_the_local_clock_steps(migrated_url):
    """After a sync, ``now()`` runs on the monotonic clock from the database time it read: the host's wall clock
    stepping back 90 s (NTP, a resumed VM) right after leaves it on the database's time, not 90 s behind."""
    from datetime import timedelta

    from store.models import utcnow
    from store.repository import Repository

    step = [timedelta(0)]
    host = Repository.from_url(migrated_url, clock=lambda: utcnow() + step[0])
    try:
        await host.sync_clock()
        step[0] = timedelta(seconds=-90)
        assert abs(host.now() - utcnow()) < timedelta(seconds=2)
        assert abs(await host.sync_clock() - timedelta(seconds=90)) < timedelta(seconds=2)  # what it measured
        assert abs(host.now() - utcnow()) < timedelta(seconds=2)
    finally:
        await host.close()


async def test_a_clock_sample_with_a_slow_round_trip_does_not_replace_a_good_one(migrated_url):
    """A reading of the database's clock that took over a second to come back is too uncertain: the first one is
    used (there is nothing better), a later one keeps the anchor it had; a quick one replaces it."""
    from store.repository import Repository

    ticks = {"t": 0.0, "per_call": 0.0}

    def monotonic() -> float:
        ticks["t"] += ticks["per_call"]
        return ticks["t"]

    host = Repository.from_url(migrated_url, monotonic=monotonic)
    try:
        ticks["per_call"] = 2.0  # every reading of the monotonic clock sees 2 s more: a 2 s round trip
        await host.sync_clock()
        first = host._anchor
        assert first is not None
        await host.sync_clock()
        assert host._anchor == first
        ticks["per_call"] = 0.0
        await host.sync_clock()
        assert host._anchor != first and host._anchor[1] == ticks["t"]
    finally:
        await host.close()


async def test_queued_jobs_are_adopted_only_when_their_process_stopped_vouching(repo):
    """A queued job carries the lease of the process holding it in its queue; another process adopts it (once)
    only after that lease ran out, or when it has none (requeued, or written by a version without leases)."""
    from datetime import timedelta

    from store.models import utcnow

    soon, past = utcnow() + timedelta(seconds=60), utcnow() - timedelta(seconds=1)
    held = await repo.create_generation(user_id=1, prompt="a", owner="proc-a", lease_until=soon)
    legacy = await repo.create_generation(user_id=1, prompt="b")
    lapsed = await repo.create_generation(user_id=2, prompt="c", owner="proc-a", lease_until=soon)
    assert [j.id for j in await repo.queued_generations(unvouched=True)] == [legacy.id]
    assert await repo.renew_leases("proc-a", [lapsed.id], past) == {lapsed.id}  # proc-a stopped (or died) holding it
    assert [j.id for j in await repo.queued_generations(unvouched=True)] == [legacy.id, lapsed.id]
    assert await repo.adopt_queued([held.id, legacy.id, lapsed.id], "proc-b", soon) == [legacy.id, lapsed.id]
    assert await repo.adopt_queued([legacy.id, lapsed.id], "proc-c", soon) == []  # adopted once
    assert (await repo.get_generation(lapsed.id)).owner == "proc-b"
    assert len(await repo.queued_generations()) == 3 and await repo.queued_generations(unvouched=True) == []
    await repo.claim(held.id, "proc-a", soon)
    await repo.renew_leases("proc-a", [held.id], past)
    assert await repo.adopt_queued([held.id], "proc-b", soon) == []  # running, not queued: requeue_interrupted's


async def test_delivery_fields(repo):
    gen = await repo.create_generation(user_id=1, prompt="p", interaction_token="secret-token")
    await repo.update_delivery(gen.id, ack_message_id=555, application_id=9)
    with pytest.raises(ValueError):
        await repo.update_delivery(gen.id, prompt="changed")
    await repo.claim(gen.id)
    await repo.set_status(gen.id, "done")
    assert [g.id for g in await repo.undelivered()] == [gen.id]
    delivered = await repo.mark_delivered(gen.id, result_message_id=777)
    assert delivered.delivered_at is not None and delivered.interaction_token is None
    got = await repo.get_generation(gen.id)
    assert (got.ack_message_id, got.result_message_id, got.application_id) == (555, 777, 9)
    assert await repo.undelivered() == []


# --- images and feedback ------------------------------------------------------------------------------------


async def _gen_with_images(repo, n=3, user_id=1, prompt="a red square"):
    gen = await repo.create_generation(user_id=user_id, prompt=prompt, checkpoint_id="demo")
    rng = np.random.default_rng(gen.id)
    images = [
        NewImage(index=i, tokens=rng.integers(0, 16384, 256), rank=i, clip_score=0.3 - i / 10,
                 safety_scores={"nsfw": 0.01 * i}, flagged=i == 2, hidden=i == 2, sha256="ab" * 32,
                 file_path=f"outputs/{gen.id}_{i}.png")
        for i in range(n)
    ]
    rows = await repo.add_images(gen.id, images)
    return gen, rows, images


async def test_images_round_trip_int16_tokens(repo):
    gen, rows, images = await _gen_with_images(repo)
    got = await repo.get_generation(gen.id)
    assert [im.index for im in got.images] == [0, 1, 2]
    for stored, sent in zip(got.images, images, strict=True):
        assert stored.tokens.dtype == np.int16
        assert np.array_equal(stored.tokens, np.asarray(sent.tokens))
        assert stored.safety_scores == dict(sent.safety_scores)
    assert got.images[2].flagged and got.images[2].hidden and not got.images[0].hidden
    with pytest.raises(NotFound):
        await repo.add_images(10**9, [NewImage(index=0, tokens=[1])])
    with pytest.raises(IntegrityError):  # (generation, index) is unique
        await repo.add_images(gen.id, [NewImage(index=0, tokens=[1])])
    assert (await repo.get_image(rows[2].id)).hidden and not (await repo.get_image(rows[0].id)).hidden
    assert await repo.get_image(10**9) is None


async def test_new_image_from_engine_result():
    class Generated:  # the fields of engine.api.GeneratedImage
        index, rank, png, clip_score, flagged = 3, 0, b"", 0.25, True
        tokens = np.array([1, 2, 3], dtype=np.int16)
        safety = {"nsfw": 0.9}

    ni = NewImage.from_generated(Generated(), file_path="x.png", sha256="00")
    assert (ni.index, ni.rank, ni.flagged, ni.hidden, ni.file_path) == (3, 0, True, True, "x.png")


async def test_feedback_votes_upsert_and_reports(repo):
    _gen, rows, _ = await _gen_with_images(repo)
    image = rows[0].id
    up = await repo.record_feedback(image, 100, "up")
    down = await repo.record_feedback(image, 100, "down", reason="quality", note="blurry")
    assert up.id == down.id and down.kind == "down" and down.reason == "quality"
    await repo.record_feedback(image, 101, "up")
    rep = await repo.record_feedback(image, 100, "report", reason="nsfw")
    rep2 = await repo.record_feedback(image, 100, "report", reason="bias", note="again")
    assert rep.id == rep2.id and rep2.reason == "bias" and rep.id != up.id
    async with repo.sessions() as s:  # one vote per user, one report per user
        stored = (await s.execute(select(Feedback.user_id, Feedback.kind).where(Feedback.image_id == image))).all()
    assert sorted(stored) == [(100, "down"), (100, "report"), (101, "up")]
    with pytest.raises(ValueError, match="kind"):
        await repo.record_feedback(image, 1, "meh")
    with pytest.raises(ValueError, match="reason"):
        await repo.record_feedback(image, 1, "down", reason="ugly")
    with pytest.raises(NotFound):
        await repo.record_feedback(10**9, 1, "up")


async def test_one_vote_per_user_enforced_by_database(repo):
    _gen, rows, _ = await _gen_with_images(repo, n=1)
    async with repo.sessions.begin() as s:
        s.add(Feedback(image_id=rows[0].id, user_id=5, kind="up"))
    with pytest.raises(IntegrityError):
        async with repo.sessions.begin() as s:
            s.add(Feedback(image_id=rows[0].id, user_id=5, kind="down"))


async def test_concurrent_votes_leave_one_row(repo):
    _gen, rows, _ = await _gen_with_images(repo, n=1)
    kinds = ["up", "down"] * 10
    await asyncio.gather(*(repo.record_feedback(rows[0].id, 7, k) for k in kinds))
    async with repo.sessions() as s:
        votes = (await s.execute(select(Feedback).where(Feedback.user_id == 7))).scalars().all()
    assert len(votes) == 1 and votes[0].kind in ("up", "down")


async def test_refusals_recorded(repo):
    r = await repo.record_refusal(user_id=3, guild_id=4, prompt="B4D", normalized="bad", reason="blocked term")
    await repo.record_refusal(user_id=5, prompt="x", reason="rate limit")
    mine = await repo.list_refusals(user_id=3)
    assert [x.id for x in mine] == [r.id] and mine[0].normalized == "bad" and mine[0].reason == "blocked term"
    assert len(await repo.list_refusals()) == 2


async def test_feedback_export_for_training(repo):
    _gen, rows, images = await _gen_with_images(repo, prompt="a blue circle")
    _gen2, rows2, _ = await _gen_with_images(repo, user_id=2, prompt="opted out prompt")
    await repo.record_feedback(rows[0].id, 10, "up")
    await repo.record_feedback(rows[1].id, 11, "down", reason="bias")
    await repo.record_feedback(rows[1].id, 12, "report", reason="nsfw")
    await repo.record_feedback(rows2[0].id, 10, "up")  # author 2 opts out below
    await repo.record_feedback(rows[2].id, 13, "up")  # voter 13 opts out below
    await repo.update_user_state(2, opted_out=True)
    await repo.update_user_state(13, opted_out=True)

    records = await repo.feedback_export()
    assert [(r.image_id, r.kind, r.reason) for r in records] == [
        (rows[0].id, "up", None),
        (rows[1].id, "down", "bias"),
        (rows[1].id, "report", "nsfw"),
    ]
    assert records[0].prompt == "a blue circle" and records[0].checkpoint_id == "demo"
    assert records[0].tokens.dtype == np.int16
    assert np.array_equal(records[0].tokens, np.asarray(images[0].tokens))
    votes = await repo.feedback_export(kinds=["up", "down"])
    assert [r.kind for r in votes] == ["up", "down"]
    assert len(await repo.feedback_export(include_opted_out=True)) == 5
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await repo.feedback_export(since=future) == []


# --- moderation ---------------------------------------------------------------------------------------------


async def test_moderation_cases_and_actions(repo):
    gen, rows, _ = await _gen_with_images(repo, user_id=77)
    case, created = await repo.open_case("auto", image_id=rows[2].id, reason="nsfw 0.93")
    again, created2 = await repo.open_case("report", image_id=rows[2].id)
    assert created and not created2 and again.id == case.id and case.generation_id == gen.id
    other, _ = await repo.open_case("report", image_id=rows[0].id, reason="user report")
    await repo.set_case_review_message(case.id, 999)
    assert [c.id for c in await repo.list_open_cases()] == [case.id, other.id]

    await repo.add_action(case.id, moderator_id=5, action="approve", reason="fine")
    approved = await repo.get_case(case.id)
    assert approved.status == "approved" and approved.closed_at is not None and approved.review_message_id == 999
    assert (await repo.get_image(rows[2].id)).hidden is False

    await repo.add_action(other.id, moderator_id=5, action="remove")
    ban = await repo.add_action(other.id, moderator_id=5, action="ban", reason="repeat")
    assert ban.target_user_id == 77
    state = await repo.get_user_state(77)
    assert state.banned and state.ban_reason == "repeat" and state.strikes == 1
    assert (await repo.get_image(rows[0].id)).hidden is True
    closed = await repo.get_case(other.id)
    assert closed.status == "removed" and [a.action for a in closed.actions] == ["remove", "ban"]
    assert await repo.list_open_cases() == []

    await repo.add_action(None, moderator_id=5, action="unban", target_user_id=77)
    assert (await repo.get_user_state(77)).banned is False
    new_case, created3 = await repo.open_case("report", image_id=rows[2].id)  # closed cases don't block new ones
    assert created3 and new_case.id != case.id
    with pytest.raises(ValueError):
        await repo.add_action(None, moderator_id=5, action="ban")
    with pytest.raises(ValueError):
        await repo.add_action(case.id, moderator_id=5, action="delete")
    with pytest.raises(ValueError):
        await repo.open_case("robot", image_id=rows[0].id)


async def test_concurrent_reports_open_one_case(repo):
    _gen, rows, _ = await _gen_with_images(repo, n=1)
    results = await asyncio.gather(*(repo.open_case("report", image_id=rows[0].id) for _ in range(8)))
    assert len({c.id for c, _ in results}) == 1
    assert sum(created for _, created in results) == 1


# --- guild settings, user state ------------------------------------------------------------------------------


async def test_guild_settings_and_user_state(repo):
    assert await repo.get_guild_settings(10) is None
    gs = await repo.update_guild_settings(10, flagged_mode="withhold", daily_quota=5, block_list=["gore"])
    gs = await repo.update_guild_settings(10, rate_limit_user="2/minute", review_channel_id=2**60)
    got = await repo.get_guild_settings(10)
    assert (got.flagged_mode, got.daily_quota, got.block_list, got.allow_list) == ("withhold", 5, ["gore"], [])
    assert got.rate_limit_user == "2/minute" and got.review_channel_id == 2**60 and gs.guild_id == 10
    with pytest.raises(ValueError, match="unknown guild setting"):
        await repo.update_guild_settings(10, colour="red")
    with pytest.raises(ValueError, match="flagged_mode"):
        await repo.update_guild_settings(10, flagged_mode="blur")
    with pytest.raises(ValueError, match="daily_quota"):
        await repo.update_guild_settings(10, daily_quota=-1)
    with pytest.raises(IntegrityError):  # and the database's CHECK constraint behind it
        async with repo.sessions.begin() as s:
            await s.execute(text("UPDATE guild_settings SET daily_quota = -1 WHERE guild_id = 10"))

    until = datetime.now(UTC) + timedelta(minutes=5)
    await repo.update_user_state(1, cooldown_until=until, daily_quota=0)
    assert await repo.add_strike(1) == 1
    assert await repo.add_strike(1) == 2
    st = await repo.get_user_state(1)
    assert st.cooldown_until == until and st.daily_quota == 0 and st.strikes == 2 and not st.banned
    with pytest.raises(ValueError):
        await repo.update_user_state(1, karma=3)


async def test_naive_datetimes_are_rejected(repo):
    with pytest.raises(Exception, match="naive datetime"):
        await repo.update_user_state(1, cooldown_until=datetime(2030, 1, 1))


# --- checkpoints and training runs ---------------------------------------------------------------------------


async def test_checkpoint_registry(repo):
    assert await repo.get_active_checkpoint() is None
    await repo.register_checkpoint("demo", "engine/assets/demo", metrics={"loss": 3.0})
    await repo.register_checkpoint("ft-1", "runs/ft-1", parent_id="demo")
    assert (await repo.set_active_checkpoint("demo")).status == "active"
    await repo.set_active_checkpoint("ft-1")
    active = await repo.get_active_checkpoint()
    assert active.id == "ft-1" and active.parent_id == "demo"
    assert {c.id: c.status for c in await repo.list_checkpoints()} == {"demo": "retired", "ft-1": "active"}
    merged = await repo.update_checkpoint_metrics("demo", {"clip": 0.3})
    assert merged.metrics == {"loss": 3.0, "clip": 0.3}
    with pytest.raises(NotFound):
        await repo.set_active_checkpoint("nope")
    with pytest.raises(IntegrityError):  # the database itself allows one active checkpoint
        async with repo.sessions.begin() as s:
            await s.execute(text("UPDATE checkpoints SET status = 'active' WHERE id = 'demo'"))
    async with repo.sessions() as s:
        assert (await s.execute(select(Checkpoint.id).where(Checkpoint.status == "active"))).scalars().all() == [
            "ft-1"
        ]


async def test_training_runs(repo):
    await repo.register_checkpoint("demo", "engine/assets/demo")
    run = await repo.create_training_run("feedback", config={"lr": 1e-5}, input_checkpoint_id="demo",
                                         log_path="runs/1.log")
    assert run.status == "running" and run.started_at is not None
    await repo.register_checkpoint("ft-2", "runs/ft-2", parent_id="demo")
    done = await repo.finish_training_run(run.id, "done", metrics={"loss": 1.5}, output_checkpoint_id="ft-2")
    got = await repo.get_training_run(run.id)
    assert done.finished_at is not None and got.metrics == {"loss": 1.5} and got.output_checkpoint_id == "ft-2"
    assert got.config == {"lr": 1e-5}


async def test_foreign_keys_enforced(repo):
    with pytest.raises(IntegrityError):
        async with repo.sessions.begin() as s:
            s.add(Image(generation_id=10**9, index=0))
    with pytest.raises(IntegrityError):
        async with repo.sessions.begin() as s:
            s.add(UserState(user_id=1, strikes=0, daily_quota=-5))


async def test_retire_checkpoint(repo):
    await repo.register_checkpoint("demo", "engine/assets/demo")
    await repo.set_active_checkpoint("demo")
    assert (await repo.retire_checkpoint("demo")).status == "retired"
    assert await repo.get_active_checkpoint() is None


async def test_concurrent_strikes_are_not_lost(repo):
    counts = await asyncio.gather(*(repo.add_strike(4242) for _ in range(20)))
    assert sorted(counts) == list(range(1, 21))
    assert (await repo.get_user_state(4242)).strikes == 20


@pytest.mark.parametrize("seed", range(5))
def test_token_packing_random_round_trip(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(x) for x in rng.integers(1, 20, size=int(rng.integers(1, 3))))
    tokens = rng.integers(0, 32768, size=shape)
    back = decode_tokens(encode_tokens(tokens))
    assert back.dtype == np.int16 and np.array_equal(back, tokens.reshape(-1))


async def test_open_read_session_does_not_block_writers(repo):
    """Repository reads use deferred transactions on SQLite: a long read never holds the write lock."""
    await repo.create_generation(user_id=1, prompt="a")
    async with repo._read() as s:
        assert (await s.execute(text("SELECT count(*) FROM generations"))).scalar_one() == 1
        await asyncio.wait_for(repo.create_generation(user_id=2, prompt="b"), timeout=5)
    assert len(await repo.queued_generations()) == 2


async def test_finish_generation_stores_images_and_marks_done_atomically(repo):
    gen = await repo.create_generation(user_id=1, prompt="p", n_images=2)
    images = [NewImage(index=i, tokens=np.full(8, i, dtype=np.int16), rank=1 - i, clip_score=0.1 * i)
              for i in range(2)]
    with pytest.raises(StatusError):  # still queued: not allowed to jump to done, and nothing is stored
        await repo.finish_generation(gen.id, images)
    assert (await repo.get_generation(gen.id)).images == []
    await repo.set_status(gen.id, "running")
    done, rows = await repo.finish_generation(gen.id, images, checkpoint_id="ck1")
    assert done.status == "done" and done.finished_at >= done.started_at and done.checkpoint_id == "ck1"
    assert [r.index for r in rows] == [0, 1] and all(r.id for r in rows)
    got = await repo.get_generation(gen.id)
    assert got.status == "done" and sorted((im.index, im.rank) for im in got.images) == [(0, 1), (1, 0)]
    assert decode_tokens(got.images[0].token_bytes).tolist() == [got.images[0].index] * 8
    with pytest.raises(NotFound):
        await repo.finish_generation(10**9, images)
