"""The blocklist and case-upkeep parts of the repository on SQLite and PostgreSQL: blocks and their lifting are
audited in the same transaction, a duplicate block or an empty lift writes nothing, a re-ping is claimed once, and
deleting a public message closes exactly its open cases with a note and the bot's audited ``close``."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from store.models import SYSTEM_MODERATOR, ImageBlock, ModerationAction, ModerationCase
from store.repository import NewImage

GUILD, OTHER = 2000, 2001
HASH = "c3a5f00f0ff0a55c"


async def actions(repo) -> list[tuple]:
    async with repo.sessions() as s:
        rows = (await s.execute(select(ModerationAction).order_by(ModerationAction.id))).scalars()
        return [(a.action, a.moderator_id, a.guild_id, a.case_id, a.reason) for a in rows]


async def test_moderation_block_is_audited_once_and_scoped(repo):
    block, created = await repo.add_block(GUILD, HASH.upper(), 9, reason="removed in case #1")
    assert created and block.phash == HASH and block.guild_id == GUILD and block.lifted_at is None
    again, created = await repo.add_block(GUILD, HASH, 10)
    assert not created and again.id == block.id  # the same hash again: nothing written
    everywhere, _ = await repo.add_block(None, "0123456789abcdef", 1)
    other, _ = await repo.add_block(OTHER, "fedcba9876543210", 11)
    assert await actions(repo) == [("block", 9, GUILD, None, f"image hash {HASH}: removed in case #1"),
                                   ("block", 1, None, None, "image hash 0123456789abcdef"),
                                   ("block", 11, OTHER, None, "image hash fedcba9876543210")]
    for bad in ("xyz", "0123", "0123456789abcdeg", ""):
        with pytest.raises(ValueError, match="16 hex digits"):
            await repo.add_block(GUILD, bad, 9)
    assert len(await actions(repo)) == 3

    assert [b.id for b in await repo.active_blocks(GUILD)] == [block.id, everywhere.id]
    assert [b.id for b in await repo.active_blocks(GUILD, include_global=False)] == [block.id]
    assert [b.id for b in await repo.active_blocks(None)] == [everywhere.id]  # a DM: every guild's blocks only
    assert {b.id for b in await repo.active_blocks(None, every_guild=True)} == {block.id, everywhere.id, other.id}


async def test_moderation_lift_blocks_is_audited_and_idempotent(repo):
    a, _ = await repo.add_block(GUILD, HASH, 9)
    b, _ = await repo.add_block(GUILD, "0000ffff0000ffff", 9)
    lifted = await repo.lift_blocks([a.id, b.id, a.id], 12, guild_id=GUILD, case_id=None, reason="a mistake")
    assert sorted(x.id for x in lifted) == [a.id, b.id]
    assert all(x.lifted_by == 12 and x.lifted_at is not None for x in lifted)
    assert await repo.active_blocks(GUILD) == []
    assert (await actions(repo))[-1] == ("unblock", 12, GUILD, None,
                                         "image hash 0000ffff0000ffff, c3a5f00f0ff0a55c: a mistake")
    assert await repo.lift_blocks([a.id], 12, guild_id=GUILD) == []  # lifted already: nothing written
    assert await repo.lift_blocks([], 12, guild_id=GUILD) == []
    assert [x[0] for x in await actions(repo)] == ["block", "block", "unblock"]
    again, created = await repo.add_block(GUILD, HASH, 9)  # a lifted hash may be blocked again
    assert created and again.id != a.id
    async with repo.sessions() as s:
        assert len((await s.execute(select(ImageBlock))).scalars().all()) == 3


async def _case_on_new_image(repo, guild_id, *, message_id=None, source="auto"):
    gen = await repo.create_generation(user_id=5, prompt="a thing", guild_id=guild_id, channel_id=3000, seed=1)
    [image] = await repo.add_images(gen.id, [NewImage(index=0, tokens=[1, 2], rank=0, phash=HASH)])
    if message_id is not None:
        await repo.mark_delivered(gen.id, result_message_id=message_id)
    case, _ = await repo.open_case(source, image_id=image.id)
    return gen, image, case


async def _age(repo, case_id: int, hours: float) -> None:
    async with repo.sessions.begin() as s:
        await s.execute(update(ModerationCase).where(ModerationCase.id == case_id).values(
            opened_at=repo.now() - timedelta(hours=hours)))


async def test_moderation_cases_due_for_reping_follow_the_guild_setting_and_are_claimed_once(repo):
    _, image, old = await _case_on_new_image(repo, GUILD)
    assert image.phash == HASH  # every image keeps its perceptual hash
    _, _, young = await _case_on_new_image(repo, GUILD)
    _, _, unposted = await _case_on_new_image(repo, GUILD)
    _, _, other = await _case_on_new_image(repo, OTHER)
    for case in (old, young, other):
        await repo.set_case_review_message(case.id, 900 + case.id)
    await _age(repo, old.id, 30)
    await _age(repo, young.id, 2)
    await _age(repo, unposted.id, 30)  # not in a review channel yet: nothing to remind of
    await _age(repo, other.id, 5)
    assert [c.id for c in await repo.cases_due_for_reping(24)] == [old.id]
    await repo.update_guild_settings(OTHER, reping_hours=4)  # the guild's own setting wins
    await repo.update_guild_settings(GUILD, reping_hours=0)  # 0: never re-ping
    assert [c.id for c in await repo.cases_due_for_reping(24)] == [other.id]
    await repo.update_guild_settings(GUILD, reping_hours=None)
    assert [c.id for c in await repo.cases_due_for_reping(1)] == [old.id, other.id, young.id]  # oldest first

    assert await repo.claim_reping(old.id) is True
    assert await repo.claim_reping(old.id) is False  # once only, whoever asks
    assert [c.id for c in await repo.cases_due_for_reping(1)] == [other.id, young.id]
    await repo.add_action(young.id, 9, "dismiss")
    assert await repo.claim_reping(young.id) is False  # decided meanwhile: no reminder
    assert (await repo.get_case(old.id)).repinged_at is not None


async def test_moderation_deleted_public_message_closes_its_open_cases(repo):
    gen, image, case = await _case_on_new_image(repo, GUILD, message_id=7001)
    _, _, elsewhere = await _case_on_new_image(repo, GUILD, message_id=7002)
    decided_gen, _, decided = await _case_on_new_image(repo, GUILD, message_id=7003)
    await repo.add_action(decided.id, 9, "approve")
    assert await repo.close_cases_of_messages([], "gone") == []
    assert await repo.close_cases_of_messages([123, 7003], "public message deleted") == []  # decided: untouched
    assert await repo.close_cases_of_messages([7001], "public message deleted") == [case.id]
    closed = await repo.get_case(case.id)
    assert (closed.status, closed.note) == ("closed", "public message deleted") and closed.closed_at is not None
    assert (await repo.get_case(elsewhere.id)).status == "open"
    assert (await repo.get_case(decided.id)).status == "approved"
    assert (await actions(repo))[-1] == ("close", SYSTEM_MODERATOR, GUILD, case.id, "public message deleted")
    assert await repo.close_cases_of_messages([7001], "public message deleted") == []  # once
    assert len(await actions(repo)) == 2
