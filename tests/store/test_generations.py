"""Generations and the job queue on SQLite and PostgreSQL: life cycle, claims, admission limits, leases and
take-over between processes, delivery."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from store.models import utcnow
from store.repository import ActiveLimitReached, NewImage, NotFound, Repository, StatusError, TakenOver


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
    done = await repo.set_status(gen.id, "done", checkpoint_id="demo", attention="native")
    assert done.finished_at >= done.started_at and done.checkpoint_id == "demo" and done.attention == "native"
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
    soon, past = utcnow() + timedelta(seconds=60), utcnow() - timedelta(seconds=1)
    live, dead, unleased, mine = [await repo.create_generation(user_id=1, prompt=p) for p in "abcd"]
    assert (await repo.claim(live.id, "proc-a", soon)).owner == "proc-a"
    await repo.claim(dead.id, "proc-b", past)
    await repo.claim(unleased.id)  # with no owner and no lease (both optional)
    await repo.claim(mine.id, "proc-c", soon)
    assert await repo.requeue_interrupted(orphans_only=True, mine="proc-c") == [dead.id, unleased.id, mine.id]
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
    assert await repo.hold_result(live.id, "proc-a", soon)  # about to post: still its own, lease renewed
    await repo.renew_leases("proc-a", [live.id], past)  # proc-a died (or stalled) before posting
    assert await repo.adopt_result(live.id, "proc-b", soon)
    assert not await repo.adopt_result(live.id, "proc-c", soon)  # adopted once
    assert (await repo.get_generation(live.id)).owner == "proc-b"
    assert not await repo.hold_result(live.id, "proc-a", soon)  # a stalled proc-a may not post it any more
    assert await repo.hold_result(live.id, "proc-b", soon)
    await repo.mark_delivered(live.id)
    assert not await repo.hold_result(live.id, "proc-b", soon)  # posted: nothing left to hold


async def test_leases_are_on_the_database_clock_so_skewed_hosts_agree(repo, migrated_url):
    """Two processes whose local clocks are 2 minutes apart: before measuring the database's clock, the slow one's
    30-second lease has already run out for the other, which would take its running job; after
    :meth:`Repository.sync_clock` both write and compare database time, and the job is left alone until the lease
    really runs out."""
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


async def test_queued_jobs_are_adopted_only_when_their_process_stopped_vouching(repo):
    """A queued job carries the lease of the process holding it in its queue; another process adopts it (once)
    only after that lease ran out, or when it has none (requeued, or queued with no owner)."""
    soon, past = utcnow() + timedelta(seconds=60), utcnow() - timedelta(seconds=1)
    held = await repo.create_generation(user_id=1, prompt="a", owner="proc-a", lease_until=soon)
    unleased = await repo.create_generation(user_id=1, prompt="b")
    lapsed = await repo.create_generation(user_id=2, prompt="c", owner="proc-a", lease_until=soon)
    assert [j.id for j in await repo.queued_generations(unvouched=True)] == [unleased.id]
    assert await repo.renew_leases("proc-a", [lapsed.id], past) == {lapsed.id}  # proc-a stopped (or died) holding it
    assert [j.id for j in await repo.queued_generations(unvouched=True)] == [unleased.id, lapsed.id]
    assert await repo.adopt_queued([held.id, unleased.id, lapsed.id], "proc-b", soon) == [unleased.id, lapsed.id]
    assert await repo.adopt_queued([unleased.id, lapsed.id], "proc-c", soon) == []  # adopted once
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
