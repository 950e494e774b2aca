"""Moderation in the store: cases, audited actions, user state and strikes, refusals."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest


async def test_moderation_cases_and_actions(repo, gen_with_images):
    gen, rows, _ = await gen_with_images(user_id=77)
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


async def test_concurrent_reports_open_one_case(repo, gen_with_images):
    _gen, rows, _ = await gen_with_images(n=1)
    results = await asyncio.gather(*(repo.open_case("report", image_id=rows[0].id) for _ in range(8)))
    assert len({c.id for c, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_user_state_overrides_and_strikes(repo):
    until = datetime.now(UTC) + timedelta(minutes=5)
    await repo.update_user_state(1, cooldown_until=until, daily_quota=0)
    assert await repo.add_strike(1) == 1
    assert await repo.add_strike(1) == 2
    st = await repo.get_user_state(1)
    assert st.cooldown_until == until and st.daily_quota == 0 and st.strikes == 2 and not st.banned
    with pytest.raises(ValueError):
        await repo.update_user_state(1, karma=3)
    reset = await repo.update_user_state(1, strikes=0)  # a moderator resets the strikes
    assert reset.strikes == 0 and reset.cooldown_until == until


async def test_concurrent_strikes_are_not_lost(repo):
    counts = await asyncio.gather(*(repo.add_strike(4242) for _ in range(20)))
    assert sorted(counts) == list(range(1, 21))
    assert (await repo.get_user_state(4242)).strikes == 20


async def test_refusals_recorded(repo):
    r = await repo.record_refusal(user_id=3, guild_id=4, prompt="B4D", normalized="bad", reason="blocked term")
    await repo.record_refusal(user_id=5, prompt="x", reason="rate limit")
    mine = await repo.list_refusals(user_id=3)
    assert [x.id for x in mine] == [r.id] and mine[0].normalized == "bad" and mine[0].reason == "blocked term"
    assert len(await repo.list_refusals()) == 2
