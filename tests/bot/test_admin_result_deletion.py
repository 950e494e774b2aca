"""The author's 🗑 on SQLite and PostgreSQL (``bot.deletion.ResultDeletion``): only the requester or a moderator
deletes; the rows go unless an open case needs them; every deletion is audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from bot.deletion import ResultDeletion
from bot.moderation import ModerationService, Moderator, NotModerator
from bot.picks import ImagePicks
from store.models import Feedback, Generation, Image, ModerationAction, ModerationCase
from store.repository import NewImage

GUILD = 2000


class FrontEnd:
    def __init__(self):
        self.told = []

    async def post_case(self, channel_id, case):
        return 901

    async def update_case(self, channel_id, message_id, case):
        pass

    async def refresh_result(self, outcome):
        pass

    async def tell_user(self, user_id, text, contact):
        self.told.append((user_id, contact))


async def result(repo, tmp_path, user_id=77):
    gen = await repo.create_generation(user_id=user_id, prompt="a red square", guild_id=GUILD, channel_id=3000,
                                       seed=5, application_id=1000, interaction_token="tok-1",
                                       token_expires_at=repo.now() + timedelta(minutes=10))
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{gen.id}-{i}.png")
        paths[-1].write_bytes(b"png")
    rows = await repo.add_images(gen.id, [NewImage(index=i, tokens=[1, 2], rank=i, file_path=str(p))
                                          for i, p in enumerate(paths)])
    await repo.mark_delivered(gen.id, result_message_id=4444)
    return gen, rows, paths


async def rows(repo, model):
    async with repo.sessions() as s:
        return list((await s.execute(select(model))).scalars())


@pytest.fixture
def services(repo):
    async def settings(guild_id):
        return await repo.get_guild_settings(guild_id) if guild_id else None

    async def mode(guild_id):
        return "spoiler"

    moderation = ModerationService(repo, guild_settings=settings, flagged_mode=mode, front_end=FrontEnd())
    deletion = ResultDeletion(repo, moderation)
    moderation.on_decided = deletion.case_decided  # as bot.service wires them
    return moderation, deletion


async def test_result_deletion_by_author_removes_rows_files_and_is_audited(services, repo, tmp_path):
    _, deletion = services
    gen, images, paths = await result(repo, tmp_path)
    await repo.record_feedback(images[0].id, 5, "up")
    taken_down = []

    async def take_down(g):
        taken_down.append(g.id)

    # someone else: refused, nothing taken down or changed
    with pytest.raises(NotModerator, match="Only the member who asked"):
        await deletion.delete(gen.id, Moderator(user_id=5, guild_id=GUILD), take_down)
    assert taken_down == [] and await repo.get_generation(gen.id) is not None
    assert await rows(repo, ModerationAction) == []

    text = await deletion.delete(gen.id, Moderator(user_id=77, guild_id=GUILD), take_down)
    assert text == "Deleted: the message and its images are gone."
    assert taken_down == [gen.id]
    assert await repo.get_generation(gen.id) is None
    assert await rows(repo, Image) == [] and await rows(repo, Feedback) == []
    assert not any(p.exists() for p in paths)
    [audit] = await rows(repo, ModerationAction)
    assert (audit.action, audit.moderator_id, audit.guild_id, audit.target_user_id, audit.case_id) == (
        "delete", 77, GUILD, 77, None)
    assert await deletion.delete(gen.id, Moderator(user_id=77, guild_id=GUILD), take_down) == \
        "That result was deleted already."


async def test_result_deletion_keeps_rows_an_open_case_needs_and_moderators_may_delete(services, repo, tmp_path):
    moderation, deletion = services
    gen, images, paths = await result(repo, tmp_path)
    case, _ = await repo.open_case("report", image_id=images[1].id, reason="nsfw")
    mod = Moderator(user_id=9, guild_id=GUILD, can_manage_messages=True)
    text = await deletion.delete(gen.id, mod)
    assert text.startswith("Deleted from the channel. Moderators are reviewing a report")
    assert await repo.get_generation(gen.id) is not None and all(p.exists() for p in paths)
    [audit] = await rows(repo, ModerationAction)
    assert (audit.action, audit.moderator_id, audit.reason) == ("delete", 9, f"result #{gen.id} deleted by its "
                                                                         "moderator")
    # once the case is decided, the rows kept for it go, and the files; its record stays
    await moderation.dismiss(case.id, mod)
    assert await repo.get_generation(gen.id) is None and not any(p.exists() for p in paths)
    assert await deletion.delete(gen.id, Moderator(user_id=77, guild_id=GUILD)) == "That result was deleted already."
    [kept] = await rows(repo, ModerationCase)
    assert (kept.status, kept.generation_id, kept.image_id) == ("dismissed", None, None)
    # a moderator of another server is no moderator here
    other, _, _ = await result(repo, tmp_path)
    with pytest.raises(NotModerator):
        await deletion.delete(other.id, Moderator(user_id=9, guild_id=GUILD + 1, can_manage_messages=True))


async def test_result_deletion_by_author_leaves_reported_cases_open_until_decided_moderation(services, repo,
                                                                                            tmp_path):
    """🗑 is no way out of a report: the message's delete event leaves the cases open, the rows stay as evidence,
    and they go once the last case on the result is decided."""
    moderation, deletion = services
    gen, images, paths = await result(repo, tmp_path)
    first, _ = await repo.open_case("report", image_id=images[0].id, reason="nsfw")
    second, _ = await repo.open_case("report", image_id=images[1].id, reason="nsfw")
    author, mod = Moderator(user_id=77, guild_id=GUILD), Moderator(user_id=9, guild_id=GUILD, operator=True)
    seen = []

    async def take_down(g):  # Discord's MESSAGE_DELETE arrives while the deletion is still under way
        seen.append(await repo.close_cases_of_messages([g.result_message_id], "public message deleted"))

    text = await deletion.delete(gen.id, author, take_down)
    assert text.startswith("Deleted from the channel. Moderators are reviewing a report")
    assert seen == [[]] and await repo.close_cases_of_messages([4444], "public message deleted") == []
    assert [(await repo.get_case(c.id)).status for c in (first, second)] == ["open", "open"]
    assert (await repo.get_generation(gen.id)).deleted_at is not None and all(p.exists() for p in paths)
    picked = await ImagePicks(repo, moderation.flagged_mode).pick(images[1].id, 5)  # an old panel, or its V button
    assert (picked.ok, picked.message) == (False, "That result was deleted.")

    await moderation.remove(first.id, mod, "gross")  # one case still open: the rows stay
    assert await repo.get_generation(gen.id) is not None and all(p.exists() for p in paths)
    await moderation.dismiss(second.id, mod)  # the last one decided: now they go
    assert await repo.get_generation(gen.id) is None and await rows(repo, Image) == []
    assert not any(p.exists() for p in paths)
    assert {(c.id, c.status, c.image_id) for c in await rows(repo, ModerationCase)} == {
        (first.id, "removed", None), (second.id, "dismissed", None)}
    assert [a.action for a in await rows(repo, ModerationAction)] == ["delete", "remove", "dismiss"]


async def test_result_deletion_whose_take_down_fails_changes_nothing_moderation(services, repo, tmp_path):
    _, deletion = services
    gen, images, paths = await result(repo, tmp_path)
    case, _ = await repo.open_case("report", image_id=images[0].id)

    async def take_down(g):
        raise RuntimeError("Discord said no")

    with pytest.raises(RuntimeError):
        await deletion.delete(gen.id, Moderator(user_id=77, guild_id=GUILD), take_down)
    assert (await repo.get_generation(gen.id)).deleted_at is None and all(p.exists() for p in paths)
    assert await rows(repo, ModerationAction) == []
    assert await repo.close_cases_of_messages([4444], "public message deleted") == [case.id]  # as before
    assert await repo.finish_deleted_result(gen.id) is None  # never marked: a closed case deletes nothing


async def test_result_deletion_left_by_a_crash_goes_with_the_next_decision_moderation(services, repo, tmp_path):
    """A crash between a decision and the row deletion leaves a marked result with no open case: the next decision
    anywhere deletes it; a deletion still in progress (marked moments ago) is left alone."""
    moderation, _ = services
    left, left_images, left_paths = await result(repo, tmp_path)
    case, _ = await repo.open_case("report", image_id=left_images[0].id)
    await repo.mark_result_deleted(left.id)
    await repo.add_action(case.id, 9, "dismiss")  # decided, then the process died before the rows went
    async with repo.sessions.begin() as s:
        await s.execute(update(Generation).where(Generation.id == left.id).values(
            deleted_at=repo.now() - timedelta(minutes=30)))
    in_flight, _, in_flight_paths = await result(repo, tmp_path)
    await repo.mark_result_deleted(in_flight.id)  # its take-down is under way
    other, other_images, _ = await result(repo, tmp_path)
    other_case, _ = await repo.open_case("report", image_id=other_images[0].id)

    await moderation.dismiss(other_case.id, Moderator(user_id=9, guild_id=GUILD, operator=True))
    assert await repo.get_generation(left.id) is None and not any(p.exists() for p in left_paths)
    assert await repo.get_generation(in_flight.id) is not None and all(p.exists() for p in in_flight_paths)
    assert await repo.get_generation(other.id) is not None  # never deleted: nothing to finish
