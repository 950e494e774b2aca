"""Strikes in the store (SQLite and PostgreSQL): they expire, thresholds impose audited cooldowns and bans that a
restart keeps, a reset clears them, one refusal-pattern case per member, appeals at most once per period and their
decisions, and the member's record (live strikes, reports made)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select

from store.models import SYSTEM_MODERATOR, ModerationAction, utcnow
from store.repository import AppealTooSoon, CaseClosed, Escalation, NewImage, Repository

GUILD = 2000


@pytest.fixture
async def clocked(migrated_url):
    """(repository whose clock the test moves, the clock's offset list)."""
    offset = [timedelta(0)]
    repo = Repository.from_url(migrated_url, clock=lambda: utcnow() + offset[0])
    yield repo, offset
    await repo.close()


def cooldown_at(n: int):
    return lambda live: Escalation("cooldown", timedelta(minutes=10), f"{live} strikes") if live >= n else None


async def actions(repo) -> list[tuple]:
    async with repo.sessions() as s:
        rows = (await s.execute(select(ModerationAction).order_by(ModerationAction.id))).scalars()
        return [(a.action, a.moderator_id, a.guild_id, a.target_user_id) for a in rows]


async def test_strikes_moderation_expire(clocked):
    repo, offset = clocked
    first = await repo.add_strike_expiring(5, GUILD, "refusal", days=7, reason="sexual")
    assert first.live == 1 and first.imposed is None
    offset[0] = timedelta(days=3)
    assert (await repo.add_strike_expiring(5, GUILD, "removal", days=7)).live == 2
    assert await repo.live_strikes(5, GUILD) == 2 and await repo.live_strikes(5, 2001) == 0
    assert await repo.live_strikes(5, None) == 0  # outside the guild: counted apart
    offset[0] = timedelta(days=7, minutes=1)  # the first one has expired, the second not yet
    assert await repo.live_strikes(5, GUILD) == 1
    offset[0] = timedelta(days=10, minutes=1)
    assert await repo.live_strikes(5, GUILD) == 0
    assert (await repo.add_strike_expiring(5, GUILD, "refusal", days=7)).live == 1
    assert [s.source for s in await repo.list_strikes(5, GUILD)] == ["refusal", "removal", "refusal"]
    with pytest.raises(ValueError):
        await repo.add_strike_expiring(5, GUILD, "bogus", days=7)
    with pytest.raises(ValueError):
        await repo.add_strike_expiring(5, GUILD, "refusal", days=0)
    assert await repo.live_strikes(5, GUILD) == 1  # the bad calls changed nothing


async def test_strikes_moderation_threshold_cooldown_survives_restart(clocked, migrated_url):
    repo, offset = clocked
    for _ in range(2):
        assert (await repo.add_strike_expiring(6, GUILD, "refusal", days=7, escalate=cooldown_at(3))).imposed is None
    third = await repo.add_strike_expiring(6, GUILD, "refusal", days=7, escalate=cooldown_at(3))
    assert third.imposed == "cooldown" and third.live == 3
    assert await actions(repo) == [("cooldown", SYSTEM_MODERATOR, GUILD, 6)]
    restarted = Repository.from_url(migrated_url)  # a new process: the cooldown is in the database
    try:
        ban = await restarted.active_guild_ban(GUILD, 6)
        assert ban is not None and ban.kind == "cooldown" and ban.moderator_id == SYSTEM_MODERATOR
        assert ban.expires_at == third.until
        assert await restarted.active_guild_ban(2001, 6) is None
    finally:
        await restarted.close()
    offset[0] = timedelta(minutes=11)
    assert await repo.active_guild_ban(GUILD, 6) is None  # it ran out


async def test_strikes_moderation_outside_a_guild_cool_the_user_state(repo):
    result = await repo.add_strike_expiring(8, None, "refusal", days=1, escalate=cooldown_at(1))
    assert result.imposed == "cooldown"
    state = await repo.get_user_state(8)
    assert state.cooldown_until == result.until and state.strikes == 1


async def test_strikes_moderation_concurrent_strikes_escalate_once_each(repo):
    results = await asyncio.gather(*(repo.add_strike_expiring(9, GUILD, "refusal", days=7, escalate=cooldown_at(5))
                                     for _ in range(6)))
    assert sorted(r.live for r in results) == [1, 2, 3, 4, 5, 6]  # serialised on the member's row
    assert sum(r.imposed == "cooldown" for r in results) == 2


async def test_strikes_moderation_reset_clears_strikes_and_lifts_cooldowns_not_bans(repo):
    for _ in range(3):
        await repo.add_strike_expiring(7, GUILD, "refusal", days=7, escalate=cooldown_at(3))
    await repo.ban_in_guild(GUILD, 7, 42, reason="spam", expires_at=None)
    assert await repo.reset_strikes(7, GUILD, 42, "second chance") == (3, 1)
    assert await repo.live_strikes(7, GUILD) == 0
    ban = await repo.active_guild_ban(GUILD, 7)
    assert ban is not None and ban.kind == "ban"  # a moderator's ban stays
    assert (await actions(repo))[-1] == ("strikes_reset", 42, GUILD, 7)
    assert await repo.reset_strikes(7, GUILD, 42) == (0, 0)


async def test_strikes_moderation_one_refusals_case_per_member_and_guild(repo):
    await repo.record_refusal(user_id=11, guild_id=GUILD, prompt="bad one", reason="sexual")
    await repo.record_refusal(user_id=11, guild_id=2001, prompt="elsewhere", reason="sexual")
    await repo.record_refusal(user_id=11, guild_id=GUILD, prompt="bad two", reason="sexual: nude")
    await repo.record_refusal(user_id=11, guild_id=GUILD, prompt="a cat", reason="rate:cooldown")  # not the prompt
    await repo.record_refusal(user_id=11, guild_id=GUILD, prompt="a dog", reason="banned")
    case, created = await repo.open_refusals_case(11, GUILD, "3 strikes")
    again, created_again = await repo.open_refusals_case(11, GUILD, "4 strikes")
    assert created and not created_again and again.id == case.id
    assert (case.source, case.user_id, case.image_id, case.guild_id) == ("refusals", 11, None, GUILD)
    assert [r.prompt for r in await repo.recent_refusals(11, GUILD)] == ["bad two", "bad one"]
    other, created_other = await repo.open_refusals_case(11, 2001, "3 strikes")
    assert created_other and other.id != case.id


async def test_strikes_moderation_appeals_once_per_period_and_decisions(clocked):
    repo, offset = clocked
    for _ in range(3):
        await repo.add_strike_expiring(12, GUILD, "refusal", days=7, escalate=cooldown_at(3))
    await repo.ban_in_guild(GUILD, 12, 42, reason="spam", expires_at=None)
    with pytest.raises(ValueError):
        await repo.open_appeal(12, GUILD, "   ", period=timedelta(days=7))
    case = await repo.open_appeal(12, GUILD, "I was testing the filter", period=timedelta(days=7))
    assert (case.source, case.user_id, case.reason, case.status) == ("appeal", 12, "I was testing the filter", "open")
    with pytest.raises(AppealTooSoon) as too_soon:
        await repo.open_appeal(12, GUILD, "again", period=timedelta(days=7))
    assert too_soon.value.next_at == case.opened_at + timedelta(days=7)
    other_guild = await repo.open_appeal(12, 2001, "there too", period=timedelta(days=7))

    decided, lifted = await repo.decide_appeal(case.id, 42, accept=True, reason="fair")
    assert decided.status == "accepted" and lifted == 2  # the ban and the cooldown
    assert await repo.active_guild_ban(GUILD, 12) is None and await repo.live_strikes(12, GUILD) == 0
    with pytest.raises(CaseClosed):
        await repo.decide_appeal(case.id, 43, accept=False)
    rejected, lifted = await repo.decide_appeal(other_guild.id, 43, accept=False)
    assert rejected.status == "rejected" and lifted == 0
    assert (await actions(repo))[-2:] == [("accept", 42, GUILD, 12), ("reject", 43, 2001, 12)]
    offset[0] = timedelta(days=7, minutes=1)
    assert (await repo.open_appeal(12, GUILD, "later", period=timedelta(days=7))).id > other_guild.id
    refusals, _ = await repo.open_refusals_case(12, GUILD, "x")
    with pytest.raises(ValueError, match="not an appeal"):
        await repo.decide_appeal(refusals.id, 42, accept=True)


async def test_strikes_moderation_user_record_live_strikes_and_reports_made(repo):
    gen = await repo.create_generation(user_id=20, prompt="p", guild_id=GUILD)
    [img] = await repo.add_images(gen.id, [NewImage(index=0, tokens=[1])])
    await repo.record_feedback(img.id, 21, "report", reason="nsfw")
    await repo.record_feedback(img.id, 21, "up")
    await repo.add_strike_expiring(21, GUILD, "refusal", days=7)
    appeal = await repo.open_appeal(21, GUILD, "please", period=timedelta(days=1))
    record = await repo.user_record(21, guild_id=GUILD)
    assert (record.live_strikes, record.strikes, record.reports_made) == (1, 1, 1)
    assert [c.id for c in record.cases] == [appeal.id]  # cases about them, not only on their images
    elsewhere = await repo.user_record(21, guild_id=2001)
    assert (elsewhere.live_strikes, elsewhere.reports_made, elsewhere.cases) == (0, 0, [])
