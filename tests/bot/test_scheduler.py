"""Fair queue: round-robin by guild then user, positions, caps, cancel, restore order."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.scheduler import FairQueue, QueueEntry, QueueRefused, Scheduler


def _drain(q: FairQueue) -> list[QueueEntry]:
    out = []
    while (job := q.pop()) is not None:
        out.append(job)
    return out


@given(st.lists(st.integers(0, 7), min_size=1, max_size=120))
@settings(max_examples=200, deadline=None)
def test_users_in_one_guild_are_served_round_robin(submitters):
    """Any user's j-th job is dispatched before any other user's (j+2)-th, whatever the submission order."""
    q = FairQueue()
    for i, user in enumerate(submitters):
        q.add(QueueEntry(id=i, user_id=user, guild_id=1, queued_at=float(i)))
    predicted = [j.id for j in q.order()]
    served = _drain(q)
    assert [j.id for j in served] == predicted  # positions are what actually happens
    assert sorted(j.id for j in served) == list(range(len(submitters)))
    nth: dict[int, list[int]] = defaultdict(list)  # user -> dispatch indexes of their 1st, 2nd... job
    for idx, job in enumerate(served):
        nth[job.user_id].append(idx)
    for a in nth:
        for b in nth:
            if a == b:
                continue
            for j, idx in enumerate(nth[a]):
                if j + 2 < len(nth[b]):
                    assert idx < nth[b][j + 2]
    # within a user, oldest first
    for idxs in nth.values():
        ids = [served[i].id for i in idxs]
        assert ids == sorted(ids)


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5)), min_size=1, max_size=120))
@settings(max_examples=200, deadline=None)
def test_guilds_are_served_round_robin_and_users_within_them(submissions):
    q = FairQueue()
    for i, (guild, user) in enumerate(submissions):
        q.add(QueueEntry(id=i, user_id=guild * 100 + user, guild_id=guild, queued_at=float(i)))
    served = _drain(q)
    by_guild: dict[int, list[int]] = defaultdict(list)
    for idx, job in enumerate(served):
        by_guild[job.guild_id].append(idx)
    for a in by_guild:
        for b in by_guild:
            if a != b:
                for j, idx in enumerate(by_guild[a]):
                    if j + 2 < len(by_guild[b]):
                        assert idx < by_guild[b][j + 2]


@given(st.lists(st.integers(0, 5), min_size=2, max_size=60), st.data())
@settings(max_examples=100, deadline=None)
def test_positions_consistent_after_removals_and_pops(submitters, data):
    q = FairQueue()
    for i, user in enumerate(submitters):
        q.add(QueueEntry(id=i, user_id=user, guild_id=user % 2, queued_at=float(i)))
    for _ in range(data.draw(st.integers(0, 5))):
        if len(q) == 0:
            break
        if data.draw(st.booleans()):
            q.pop()
        else:
            victim = data.draw(st.sampled_from(sorted(j.id for j in q.order())))
            assert q.remove(victim) is not None
            assert q.remove(victim) is None
    pos = q.positions()
    assert sorted(pos.values()) == list(range(1, len(q) + 1))
    served = _drain(q)
    assert [pos[j.id] for j in served] == list(range(1, len(served) + 1))


def test_one_heavy_user_does_not_starve_others():
    q = FairQueue()
    for i in range(10):
        q.add(QueueEntry(id=i, user_id=1, guild_id=5, queued_at=float(i)))
    q.add(QueueEntry(id=100, user_id=2, guild_id=5, queued_at=100.0))
    q.add(QueueEntry(id=200, user_id=3, guild_id=None, queued_at=200.0))
    assert q.position(100) == 3 and q.position(200) == 2
    assert [j.id for j in _drain(q)][:4] == [0, 200, 100, 1]


def test_restore_out_of_order_keeps_queued_at_order_within_a_user():
    q = FairQueue()
    q.add(QueueEntry(id=2, user_id=1, guild_id=1, queued_at=20.0))
    q.add(QueueEntry(id=1, user_id=1, guild_id=1, queued_at=10.0))
    assert [j.id for j in _drain(q)] == [1, 2]


async def test_scheduler_caps_cancel_and_next():
    s = Scheduler(per_user_cap=2, total_cap=3)
    assert s.add(QueueEntry(1, 1, 1, 1.0)) == 1
    assert s.add(QueueEntry(2, 1, 1, 2.0)) == 2
    with pytest.raises(QueueRefused, match="limit is 2"):
        s.add(QueueEntry(3, 1, 1, 3.0))
    assert s.add(QueueEntry(4, 2, 1, 4.0)) == 2  # fair: user 2 goes before user 1's second job
    with pytest.raises(QueueRefused, match="queue is full"):
        s.add(QueueEntry(5, 3, 1, 5.0))
    s.add(QueueEntry(5, 3, 1, 5.0), force=True)  # restore after restart ignores caps
    assert s.cancel(2) and not s.cancel(2)
    job = await s.next()
    assert job.id == 1 and s.position(1) == 0
    s.add(QueueEntry(6, 1, 1, 6.0))  # 1 running + 0 queued < 2
    with pytest.raises(QueueRefused):  # 1 running + 1 queued: the running job counts towards the cap
        s.add(QueueEntry(7, 1, 1, 7.0))
    s.done(1)
    assert s.position(1) is None
    waiter = asyncio.create_task(_take_all(s, 4))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # three jobs queued, the fourth take waits
    s.add(QueueEntry(9, 9, 9, 9.0))
    ids = await asyncio.wait_for(waiter, 1)
    assert sorted(ids) == [4, 5, 6, 9]


async def _take_all(s: Scheduler, n: int) -> list[int]:
    return [(await s.next()).id for _ in range(n)]


def test_reserved_admissions_count_against_both_caps():
    s = Scheduler(per_user_cap=2, total_cap=3)
    s.reserve(1)
    s.reserve(1)
    with pytest.raises(QueueRefused, match="limit is 2"):
        s.reserve(1)  # two admissions in flight already fill user 1's cap
    s.reserve(2, per_user_cap=5)  # a guild's own cap replaces the default for this check only
    with pytest.raises(QueueRefused, match="queue is full"):
        s.reserve(3)  # three in flight fill the total cap
    s.release(1)
    s.add(QueueEntry(10, 1, None, 0.0), force=True)  # the slot became a queued job: still 2 for user 1
    with pytest.raises(QueueRefused, match="limit is 2"):
        s.reserve(1)
    s.release(1)
    s.reserve(1)  # a released slot is free again
    s.release(1)
    s.release(2)
    with pytest.raises(ValueError, match="no reserved admission"):
        s.release(2)
    assert s.per_user_cap == 2


async def test_per_user_running_passes_a_busy_user_over_without_losing_their_turn():
    s = Scheduler(per_user_cap=10, per_user_running=2)
    for i, user in enumerate([1, 1, 1, 2, 3]):
        s.add(QueueEntry(i, user, 1, float(i)), force=True)
    got = [await s.next() for _ in range(4)]
    assert [j.user_id for j in got] == [1, 2, 3, 1]  # user 1's third job waits: two are running
    waiter = asyncio.create_task(s.next())
    await asyncio.sleep(0)
    assert not waiter.done()
    s.done(got[0].id)  # one of user 1's jobs finished: the next may start
    assert (await asyncio.wait_for(waiter, 1)).id == 2
    unlimited = Scheduler(per_user_cap=10, per_user_running=None)
    for i in range(3):
        unlimited.add(QueueEntry(i, 7, 1, float(i)), force=True)
    assert [(await unlimited.next()).id for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="per_user_running"):
        Scheduler(per_user_running=0)
