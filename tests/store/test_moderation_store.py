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
        await repo.add_action(case.id, moderator_id=5, action="obliterate")  # not a ModAction
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


async def test_moderation_guild_cases_dismiss_and_closed_cases(repo):
    from store.repository import CaseClosed

    gen = await repo.create_generation(user_id=7, prompt="p", guild_id=2000)
    from store.repository import NewImage

    rows = await repo.add_images(gen.id, [NewImage(index=i, tokens=[1, 2]) for i in range(2)])
    case, _ = await repo.open_case("auto", image_id=rows[0].id)
    assert case.guild_id == 2000
    assert [c.id for c in await repo.list_unposted_cases(gen.id)] == [case.id]
    await repo.set_case_review_message(case.id, 55)
    assert await repo.list_unposted_cases() == []
    action = await repo.add_action(case.id, moderator_id=9, action="dismiss", reason="fine")
    assert action.guild_id == 2000 and (await repo.get_case(case.id)).status == "dismissed"
    assert (await repo.get_image(rows[0].id)).hidden is False
    with pytest.raises(CaseClosed):  # a second moderator's click on a decided case changes nothing
        await repo.add_action(case.id, moderator_id=10, action="remove")
    assert (await repo.get_case(case.id)).status == "dismissed"
    assert [a.moderator_id for a in (await repo.get_case(case.id)).actions] == [9]

    other, _ = await repo.open_case("report", image_id=rows[1].id)
    await repo.add_action(other.id, moderator_id=9, action="remove")
    assert await repo.removed_image_ids(gen.id) == {rows[1].id}


async def test_moderation_case_reports_count_since_the_last_closed_case(repo):
    from store.repository import NewImage

    gen = await repo.create_generation(user_id=7, prompt="p", guild_id=2000)
    [img] = await repo.add_images(gen.id, [NewImage(index=0, tokens=[1])])
    await repo.record_feedback(img.id, 21, "report", reason="nsfw")
    first, _ = await repo.open_case("report", image_id=img.id)
    await repo.record_feedback(img.id, 22, "report", reason="bias", note="x")
    assert [(f.user_id, f.reason) for f in await repo.case_reports(first.id)] == [(21, "nsfw"), (22, "bias")]
    await repo.add_action(first.id, moderator_id=9, action="approve")
    await repo.record_feedback(img.id, 23, "report", reason="other")
    second, created = await repo.open_case("report", image_id=img.id)
    assert created and [f.user_id for f in await repo.case_reports(second.id)] == [23]


async def test_moderation_guild_bans_expire_and_lift(repo):
    now = repo.now()
    assert await repo.active_guild_ban(2000, 7) is None
    await repo.ban_in_guild(2000, 7, 9, reason="old", expires_at=now - timedelta(minutes=1))
    assert await repo.active_guild_ban(2000, 7) is None  # expired
    ban = await repo.ban_in_guild(2000, 7, 9, reason="spam", expires_at=now + timedelta(days=7))
    assert (await repo.active_guild_ban(2000, 7)).id == ban.id
    assert await repo.active_guild_ban(2001, 7) is None  # per guild
    forever = await repo.ban_in_guild(2000, 7, 9, reason="worse", expires_at=None)
    assert (await repo.active_guild_ban(2000, 7)).id == forever.id  # the permanent one holds longest
    assert await repo.lift_guild_bans(2000, 7, 9, reason="appeal") == 2
    assert await repo.active_guild_ban(2000, 7) is None
    record = await repo.user_record(7, guild_id=2000)
    assert [b.reason for b in record.bans] == ["worse", "spam", "old"] and not record.globally_banned
    actions = await rows_of_actions(repo)
    assert [(a.action, a.guild_id, a.target_user_id) for a in actions] == [
        ("ban", 2000, 7), ("ban", 2000, 7), ("ban", 2000, 7), ("unban", 2000, 7)]


async def test_moderation_user_record_counts(repo):
    from store.repository import NewImage

    g1 = await repo.create_generation(user_id=7, prompt="p", guild_id=2000)
    await repo.create_generation(user_id=7, prompt="q", guild_id=2001)
    [img] = await repo.add_images(g1.id, [NewImage(index=0, tokens=[1])])
    case, _ = await repo.open_case("auto", image_id=img.id)
    await repo.record_refusal(user_id=7, guild_id=2000, prompt="x", reason="filter")
    await repo.add_strike(7)
    here = await repo.user_record(7, guild_id=2000)
    assert (here.generations, here.refusals, here.strikes, [c.id for c in here.cases]) == (1, 1, 1, [case.id])
    everywhere = await repo.user_record(7)
    assert everywhere.generations == 2 and (await repo.user_record(8)).generations == 0


async def test_moderation_check_constraints_hold_after_migration(repo):
    """The rebuilt CHECK constraints accept the new values and still refuse unknown ones."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    async with repo.sessions.begin() as s:
        await s.execute(text("INSERT INTO moderation_cases (source, status, opened_at) "
                             "VALUES ('auto', 'dismissed', CURRENT_TIMESTAMP)"))
    case_sql = "INSERT INTO moderation_cases (source, status, opened_at) VALUES ('{}', '{}', CURRENT_TIMESTAMP)"
    for sql in (case_sql.format("auto", "bogus"), case_sql.format("robot", "open"),
                "INSERT INTO moderation_actions (moderator_id, action, created_at) "
                "VALUES (1, 'bogus', CURRENT_TIMESTAMP)"):
        with pytest.raises(IntegrityError):
            async with repo.sessions.begin() as s:
                await s.execute(text(sql))


async def rows_of_actions(repo):
    from sqlalchemy import select

    from store.models import ModerationAction

    async with repo.sessions() as s:
        return list((await s.execute(select(ModerationAction).order_by(ModerationAction.id))).scalars())
