"""The blocklist and case upkeep over the moderation service, on SQLite and PostgreSQL: Remove blocks the image's
hash (audited), near-duplicates match and distinct or plain images do not, unblock goes by distance (a re-encoded
copy's case lifts it) and only for moderators, the operator blocks everywhere, an old case is re-pinged once and a
deleted public message closes its cases."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from PIL import Image as PILImage
from PIL import ImageEnhance
from sqlalchemy import update

from bot.blocklist import BlocklistService, distance, phash_png, too_plain
from bot.case_upkeep import CaseUpkeep
from bot.moderation import ModerationService, Moderator, NotModerator
from store.models import ModerationAction, ModerationCase
from store.repository import NewImage
from tests.bot.test_moderation_service import FrontEnd
from tests.fakes.botkit import rows_of
from tests.fakes.engine import pattern_png, solid_png

GUILD = 2000
MOD = Moderator(user_id=9, guild_id=GUILD, can_manage_messages=True)
MEMBER = Moderator(user_id=10, guild_id=GUILD)
OTHER_MOD = Moderator(user_id=11, guild_id=2001, can_manage_messages=True)
OPERATOR = Moderator(user_id=1, guild_id=None, operator=True)


def near_copy(png: bytes) -> bytes:
    """Brightened by 10 % and re-encoded as a JPEG: different bytes, nearly the same picture."""
    buf = io.BytesIO()
    ImageEnhance.Brightness(PILImage.open(io.BytesIO(png)).convert("RGB")).enhance(1.1).save(buf, "JPEG", quality=70)
    return buf.getvalue()


class Reminders(FrontEnd):
    def __init__(self):
        super().__init__()
        self.repings = []

    async def reping_case(self, channel_id, message_id, case, hours, role_id):
        self.repings.append((channel_id, message_id, case.case_id, hours, role_id))


@pytest.fixture
async def world(repo, tmp_path):
    front = Reminders()

    async def spoiler(_guild):
        return "spoiler"

    moderation = ModerationService(repo, guild_settings=repo.get_guild_settings, flagged_mode=spoiler,
                                   review_channel_id=3100, front_end=front)
    blocklist = BlocklistService(repo, moderation)
    moderation.blocklist = blocklist

    async def result(pngs, message_id, guild_id=GUILD, store_hash=True):
        gen = await repo.create_generation(user_id=77, prompt="a pattern", guild_id=guild_id, channel_id=3000,
                                           seed=5)
        images = []
        for i, png in enumerate(pngs):
            path = tmp_path / f"{gen.id}-{i}.png"
            path.write_bytes(png)
            images.append(NewImage(index=i, tokens=[1, 2], rank=i, file_path=str(path),
                                   phash=phash_png(png) if store_hash else None))
        rows = await repo.add_images(gen.id, images)
        await repo.mark_delivered(gen.id, result_message_id=message_id)
        return gen, rows

    return moderation, blocklist, front, result


def test_moderation_phash_near_copies_are_close_and_patterns_far():
    a, b = pattern_png(5, 0), pattern_png(6, 0)
    assert distance(phash_png(a), phash_png(near_copy(a))) <= 8 < distance(phash_png(a), phash_png(b))
    assert too_plain(phash_png(solid_png((200, 10, 10)))) and not too_plain(phash_png(a))
    assert phash_png(b"not a png") is None


async def test_moderation_remove_blocks_the_hash_and_near_duplicates_match(world, repo):
    moderation, blocklist, _, result = world
    original = pattern_png(5, 0)
    gen, rows = await result([original, pattern_png(6, 0)], 4444)
    case, _ = await repo.open_case("report", image_id=rows[0].id)
    assert (await moderation.remove(case.id, MOD, "gore")).message == f"Case #{case.id} removed."
    [block] = await repo.active_blocks(GUILD)
    assert (block.phash, block.guild_id, block.case_id, block.image_id) == (rows[0].phash, GUILD, case.id, rows[0].id)
    audit = [(a.action, a.moderator_id, a.case_id) for a in (await repo.get_case(case.id)).actions]
    assert audit == [("remove", 9, case.id), ("block", 9, case.id)]

    hashes = [phash_png(near_copy(original)), phash_png(pattern_png(6, 0)), phash_png(solid_png((1, 2, 3))), None]
    hit, *misses = await blocklist.matches(GUILD, hashes)
    assert hit is not None and hit.block_id == block.id and hit.distance <= 8 and "blocked image hash" in hit.reason
    assert misses == [None, None, None]
    assert await blocklist.matches(2001, hashes[:1]) == [None]  # another guild's block does not apply

    # a plain image is removed but not blocked: its hash would match every plain image
    _, plain = await result([solid_png((9, 9, 9))], 4445)
    plain_case, _ = await repo.open_case("report", image_id=plain[0].id)
    await moderation.remove(plain_case.id, MOD)
    assert len(await repo.active_blocks(GUILD)) == 1


async def test_moderation_unblock_by_a_near_duplicates_case_moderators_only(world, repo):
    moderation, blocklist, _, result = world
    original = pattern_png(7, 1)
    _, rows = await result([original], 5000, store_hash=False)  # stored before the blocklist: hashed from its file
    case, _ = await repo.open_case("report", image_id=rows[0].id)
    await moderation.remove(case.id, MOD)
    [block] = await repo.active_blocks(GUILD)
    assert block.phash == phash_png(original)

    _, copy_rows = await result([near_copy(original)], 5001)
    copy_case, _ = await repo.open_case("blocklist", image_id=copy_rows[0].id, reason="near-duplicate")
    before = len(await rows_of(repo, ModerationAction))
    with pytest.raises(NotModerator):
        await blocklist.unblock(MEMBER, copy_case.id)
    with pytest.raises(NotModerator):
        await blocklist.unblock(OTHER_MOD, copy_case.id)  # another server's case
    _, far = await result([pattern_png(8, 2)], 5002)
    far_case, _ = await repo.open_case("report", image_id=far[0].id)
    assert "nothing changed" in await blocklist.unblock(MOD, far_case.id)  # a different picture lifts nothing
    assert [b.id for b in await repo.active_blocks(GUILD)] == [block.id]
    text = await blocklist.unblock(MOD, copy_case.id, "it was fine")
    assert text.startswith("Unblocked 1 image hash(es)") and await repo.active_blocks(GUILD) == []
    unblock = (await repo.get_case(copy_case.id)).actions[-1]
    assert (unblock.action, unblock.moderator_id, unblock.guild_id) == ("unblock", 9, GUILD)
    assert "it was fine" in unblock.reason
    assert "nothing changed" in await blocklist.unblock(MOD, copy_case.id)
    assert len(await rows_of(repo, ModerationAction)) == before + 1


async def test_moderation_operator_blocks_everywhere_guild_moderators_cannot_lift_it(world, repo):
    moderation, blocklist, _, result = world
    _, rows = await result([pattern_png(9, 0)], 6000)
    case, _ = await repo.open_case("report", image_id=rows[0].id)
    with pytest.raises(NotModerator):
        await blocklist.block_everywhere(MOD, case.id)
    assert "blocked in every server" in await blocklist.block_everywhere(OPERATOR, case.id, "known bad")
    assert "already blocked" in await blocklist.block_everywhere(OPERATOR, case.id)
    [block] = await repo.active_blocks(2001)
    assert block.guild_id is None
    assert [b.id for b in await blocklist.blocks(MOD)] == [block.id]
    with pytest.raises(NotModerator):
        await blocklist.blocks(MEMBER)
    assert "nothing changed" in await blocklist.unblock(MOD, case.id)  # not this server's block to lift
    assert "Unblocked 1" in await blocklist.unblock(OPERATOR, case.id)
    _, plain = await result([solid_png((5, 5, 5))], 6001)
    plain_case, _ = await repo.open_case("report", image_id=plain[0].id)
    with pytest.raises(ValueError, match="too plain"):
        await blocklist.block_everywhere(OPERATOR, plain_case.id)


async def test_moderation_upkeep_repings_once_and_closes_cases_of_deleted_messages(world, repo):
    moderation, _, front, result = world
    upkeep = CaseUpkeep(repo, moderation, reping_hours=24)
    _, rows = await result([pattern_png(1, 0), pattern_png(1, 1)], 7000)
    old, created = await repo.open_case("auto", image_id=rows[0].id)
    await moderation.case_opened(old.id, created)
    fresh, created = await repo.open_case("report", image_id=rows[1].id)
    await moderation.case_opened(fresh.id, created)
    async with repo.sessions.begin() as s:
        await s.execute(update(ModerationCase).where(ModerationCase.id == old.id).values(
            opened_at=repo.now() - timedelta(hours=30)))
    await repo.update_guild_settings(GUILD, moderator_role_id=2500)
    assert await upkeep.reping_due() == [old.id]
    assert await upkeep.reping_due() == []  # once
    [(channel, message, case_id, hours, role)] = front.repings
    assert (channel, case_id, hours, role) == (3100, old.id, 30, 2500)
    assert message == (await repo.get_case(old.id)).review_message_id

    updates = len(front.updates)
    assert await upkeep.public_message_deleted([123456]) == []  # not a result message
    assert sorted(await upkeep.public_message_deleted([7000])) == [old.id, fresh.id]
    for case_id in (old.id, fresh.id):
        case = await repo.get_case(case_id)
        assert (case.status, case.note) == ("closed", "public message deleted")
        assert [(a.action, a.moderator_id) for a in case.actions] == [("close", 0)]
    edited = {view.case_id: view for _, _, view in front.updates[updates:]}
    assert set(edited) == {old.id, fresh.id} and edited[old.id].note == "public message deleted"
    assert edited[old.id].status == "closed"


async def test_moderation_upkeep_repings_past_cases_of_guilds_without_a_review_channel(repo):
    """Fifty old cases of a guild that lost its review channel (and no global one) used to fill every page of due
    cases, so no other case was ever re-pinged."""
    front = Reminders()

    async def spoiler(_guild):
        return "spoiler"

    moderation = ModerationService(repo, guild_settings=repo.get_guild_settings, flagged_mode=spoiler,
                                   front_end=front)  # no global review channel
    upkeep = CaseUpkeep(repo, moderation, reping_hours=24)
    gen = await repo.create_generation(user_id=77, prompt="a pattern", guild_id=2001, channel_id=3001)
    rows = await repo.add_images(gen.id, [NewImage(index=i, tokens=[1]) for i in range(51)])
    for n, row in enumerate(rows):  # posted while the guild still had a review channel
        case, _ = await repo.open_case("report", image_id=row.id)
        await repo.set_case_review_message(case.id, 8000 + n)
    mine = await repo.create_generation(user_id=78, prompt="a pattern", guild_id=GUILD, channel_id=3000)
    [row] = await repo.add_images(mine.id, [NewImage(index=0, tokens=[1])])
    await repo.update_guild_settings(GUILD, review_channel_id=3200)
    case, created = await repo.open_case("report", image_id=row.id)
    await moderation.case_opened(case.id, created)
    async with repo.sessions.begin() as s:  # all of them old; the orphaned ones the oldest
        await s.execute(update(ModerationCase).values(opened_at=repo.now() - timedelta(hours=40)))
        await s.execute(update(ModerationCase).where(ModerationCase.id == case.id).values(
            opened_at=repo.now() - timedelta(hours=30)))
    assert await upkeep.reping_due() == [case.id]
    assert [(c, k) for c, _, k, _, _ in front.repings] == [(3200, case.id)]
