"""ModerationService on SQLite and PostgreSQL: who may act, one review post per case, the actions and their audit,
guild bans, the author's record."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from PIL import Image as PILImage

from bot.moderation import CaseNotFound, ModerationService, Moderator, NotModerator, parse_duration
from bot.outcome import Delivery
from store.repository import NewImage

GUILD = 2000
MOD_ROLE = 2500


class FrontEnd:
    """Records what the service asks a front end to do."""

    def __init__(self):
        self.posts, self.updates, self.refreshed, self.told = [], [], [], []

    async def post_case(self, channel_id, case):
        self.posts.append((channel_id, case))
        return 900 + len(self.posts)

    async def update_case(self, channel_id, message_id, case):
        self.updates.append((channel_id, message_id, case))

    async def refresh_result(self, outcome):
        self.refreshed.append(outcome)

    async def tell_user(self, user_id, text, contact):
        self.told.append((user_id, text, contact))


def png(color) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
async def setup(repo, tmp_path):
    """(service, front end, generation, image rows): a delivered public result of 3 images, image 2 flagged."""
    gen = await repo.create_generation(user_id=77, prompt="a red square", guild_id=GUILD, channel_id=3000, seed=5,
                                       checkpoint_id="demo-1")
    images = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png((40 * i, 0, 0)))
        images.append(NewImage(index=i, tokens=[1, 2], rank=i, clip_score=0.3, safety_scores={"nsfw": 0.9 * (i == 2)},
                               flagged=i == 2, hidden=i == 2, file_path=str(path), sha256="ab" * 32))
    rows = await repo.add_images(gen.id, images)
    await repo.mark_delivered(gen.id, result_message_id=4444)
    front = FrontEnd()

    async def spoiler(_guild):
        return "spoiler"

    svc = ModerationService(repo, guild_settings=repo.get_guild_settings, flagged_mode=spoiler,
                            review_channel_id=3100, front_end=front)
    return svc, front, gen, rows


MOD = Moderator(user_id=9, guild_id=GUILD, can_manage_messages=True)
MEMBER = Moderator(user_id=10, guild_id=GUILD)


def test_moderation_parse_duration():
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration(" 12 h ") == timedelta(hours=12)
    assert parse_duration("30min") == timedelta(minutes=30)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("permanent") is None and parse_duration("") is None
    for bad in ("soon", "0d", "7y", "-1d"):
        with pytest.raises(ValueError, match="not understood"):
            parse_duration(bad)


async def test_moderation_who_may_act(setup, repo):
    svc, *_ = setup
    assert await svc.is_moderator(GUILD, [], True)
    assert not await svc.is_moderator(GUILD, [MOD_ROLE], False)  # no moderator role set yet
    await repo.update_guild_settings(GUILD, moderator_role_id=MOD_ROLE)
    assert await svc.is_moderator(GUILD, [1, MOD_ROLE], False)
    assert not await svc.is_moderator(GUILD, [1], False)
    assert not await svc.is_moderator(None, [MOD_ROLE], True)  # nobody moderates a DM


async def test_moderation_case_is_posted_once_and_reports_join_it(setup, repo):
    svc, front, gen, rows = setup
    case, created = await repo.open_case("auto", image_id=rows[2].id, reason="safety checker: nsfw=0.90")
    await svc.case_opened(case.id, created)
    assert len(front.posts) == 1
    channel, view = front.posts[0]
    assert channel == 3100 and view.case_id == case.id and view.png == png((80, 0, 0))
    assert (view.prompt, view.author_id, view.seed, view.model_id) == ("a red square", 77, 5, "demo-1")
    assert view.safety_scores == {"nsfw": 0.9} and view.public_message_id == 4444 and view.channel_id == 3000
    assert (await repo.get_case(case.id)).review_message_id == 901

    for user, reason in ((21, "nsfw"), (22, "bias")):
        await repo.record_feedback(rows[2].id, user, "report", reason=reason)
        again, created = await svc.open_case("report", image_id=rows[2].id, reporter=user,
                                             contact=Delivery(channel_id=3000))
        assert again == case.id and not created
    assert set(svc.reporters[case.id]) == {21, 22}
    assert len(front.posts) == 1 and len(front.updates) == 2  # the post is refreshed, never repeated
    assert [(r.user_id, r.reason) for r in front.updates[-1][2].reports] == [(21, "nsfw"), (22, "bias")]
    assert await svc.post_pending() == []  # a restart finds nothing to post

    await repo.update_guild_settings(GUILD, review_channel_id=3200)  # the guild's own channel wins
    other, created = await repo.open_case("report", image_id=rows[0].id)
    await svc.case_opened(other.id, created)
    assert front.posts[-1][0] == 3200


async def test_moderation_refuses_a_non_moderator_and_changes_nothing(setup, repo):
    svc, front, gen, rows = setup
    case, _ = await repo.open_case("auto", image_id=rows[2].id)
    for act in (svc.approve, svc.remove, svc.dismiss):
        with pytest.raises(NotModerator):
            await act(case.id, MEMBER)
    with pytest.raises(NotModerator):
        await svc.ban_author(case.id, MEMBER, "7d", "spam")
    with pytest.raises(NotModerator):
        await svc.history(case.id, MEMBER)
    with pytest.raises(NotModerator, match="another server"):
        await svc.remove(case.id, Moderator(user_id=9, guild_id=GUILD + 1, can_manage_messages=True))
    after = await repo.get_case(case.id)
    assert after.status == "open" and after.actions == []
    assert (await repo.get_image(rows[2].id)).hidden is True
    assert await repo.active_guild_ban(GUILD, 77) is None and front.refreshed == [] and front.told == []
    with pytest.raises(CaseNotFound):
        await svc.approve(12345, MOD)


async def test_moderation_remove_then_approve_rerender_the_result_and_are_audited(setup, repo):
    svc, front, gen, rows = setup
    await repo.record_feedback(rows[0].id, 21, "report", reason="quality")
    case, created = await repo.open_case("report", image_id=rows[0].id)
    contact = Delivery(channel_id=3000, application_id=1000, interaction_token="tok")
    await svc.case_opened(case.id, created, reporter=21, contact=contact)

    result = await svc.remove(case.id, MOD, reason="off topic")
    assert result.action == "remove" and result.case.status == "removed"
    assert (await repo.get_image(rows[0].id)).hidden is True
    shown = {im.id: im for im in front.refreshed[-1].images}
    assert shown[rows[0].id].withheld and not shown[rows[1].id].withheld
    assert shown[rows[2].id].flagged and not shown[rows[2].id].withheld  # the flagged one: a spoiler, as before
    assert [(u, c) for u, _, c in front.told] == [(21, contact), (77, None)]  # the reporter, then the author
    assert "removed" in front.told[0][1] and "a red square" in front.told[1][1] and "off topic" in front.told[1][1]
    assert shown[rows[0].id].removed and not shown[rows[2].id].removed
    assert front.updates[-1][2].actions[-1].action == "remove"  # the review post shows who did what
    again = await svc.approve(case.id, MOD)  # a second click on a decided case changes nothing
    assert again.action == "none" and "already closed" in again.message

    flagged, created = await repo.open_case("auto", image_id=rows[2].id)
    await svc.case_opened(flagged.id, created)
    await svc.approve(flagged.id, MOD, reason="fine")
    shown = {im.id: im for im in front.refreshed[-1].images}
    assert not shown[rows[2].id].flagged and not shown[rows[2].id].withheld  # back in the grid, no spoiler
    assert shown[rows[0].id].withheld  # the removed one stays out
    audit = [(a.moderator_id, a.action, a.reason) for c in (case, flagged) for a in (await repo.get_case(c.id)).actions]
    assert audit == [(9, "remove", "off topic"), (9, "approve", "fine")]
    assert {a.guild_id for c in (case, flagged) for a in (await repo.get_case(c.id)).actions} == {GUILD}


async def test_moderation_dismiss_by_moderator_role_leaves_the_image_alone(setup, repo):
    svc, front, gen, rows = setup
    case, _ = await repo.open_case("auto", image_id=rows[2].id)
    with pytest.raises(NotModerator):  # the role counts only once the guild names it
        await svc.dismiss(case.id, Moderator(user_id=9, guild_id=GUILD, role_ids=(MOD_ROLE,)))
    await repo.update_guild_settings(GUILD, moderator_role_id=MOD_ROLE)
    result = await svc.dismiss(case.id, Moderator(user_id=9, guild_id=GUILD, role_ids=(MOD_ROLE,)))
    assert result.case.status == "dismissed" and front.refreshed == []
    assert (await repo.get_image(rows[2].id)).hidden is True


async def test_moderation_ban_author_blocks_in_that_guild_until_it_ends(setup, repo):
    svc, front, gen, rows = setup
    case, _ = await repo.open_case("auto", image_id=rows[2].id)
    with pytest.raises(ValueError, match="not understood"):
        await svc.ban_author(case.id, MOD, "a while", "spam")
    with pytest.raises(ValueError, match="reason"):
        await svc.ban_author(case.id, MOD, "7d", "  ")
    assert await svc.ban_message(77, GUILD) is None
    result = await svc.ban_author(case.id, MOD, "7d", "spam")
    assert result.action == "ban" and "<@77>" in result.message and "until" in result.message
    text = await svc.ban_message(77, GUILD)
    assert text.startswith("You are banned from generating images in this server until ") and text.endswith(": spam")
    assert await svc.ban_message(77, GUILD + 1) is None and await svc.ban_message(78, GUILD) is None
    assert (await repo.get_case(case.id)).status == "open"  # a ban does not decide the image
    await svc.ban_author(case.id, MOD, "permanent", "again")
    assert "permanently: again" in await svc.ban_message(77, GUILD)

    author, record = await svc.history(case.id, MOD)
    assert author == 77 and record.generations == 1 and [b.reason for b in record.bans] == ["again", "spam"]
    assert [c.id for c in record.cases] == [case.id]


async def test_moderation_guild_ban_refuses_admission_with_until_and_why(running_service):
    svc, repo, _engine, _pub = running_service
    now = repo.now()
    await repo.ban_in_guild(GUILD, 5, 9, reason="old", expires_at=now - timedelta(seconds=1))
    assert (await svc.submit(user_id=5, prompt="a cat", guild_id=GUILD)).ok  # an expired ban holds no one
    await repo.ban_in_guild(GUILD, 5, 9, reason="spamming the channel", expires_at=now + timedelta(days=7))
    adm = await svc.submit(user_id=5, prompt="a cat", guild_id=GUILD)
    assert not adm.ok and adm.category == "banned"
    assert adm.message.startswith("You are banned from generating images in this server until ")
    assert adm.message.endswith(": spamming the channel")
    assert (await svc.submit(user_id=5, prompt="a cat", guild_id=GUILD + 1)).ok  # other guilds are not affected
    assert (await svc.submit(user_id=5, prompt="a cat")).ok  # nor DMs
    assert [r.reason for r in await repo.list_refusals(user_id=5)] == ["banned"]
    await repo.lift_guild_bans(GUILD, 5, 9)
    assert (await svc.submit(user_id=5, prompt="a cat", guild_id=GUILD)).ok


async def test_moderation_commands_need_a_moderator_and_are_audited(setup, repo):
    svc, front, gen, rows = setup
    case, _ = await repo.open_case("auto", image_id=rows[2].id)
    for call in (svc.cases(MEMBER), svc.case(MEMBER, case.id), svc.user_history(MEMBER, 77),
                 svc.ban_user(MEMBER, 77, "1d", "spam"), svc.unban_user(MEMBER, 77),
                 svc.cases(Moderator(user_id=9, guild_id=None, can_manage_messages=True))):
        with pytest.raises(NotModerator):
            await call
    assert await repo.active_guild_ban(GUILD, 77) is None
    assert [c.id for c in await svc.cases(MOD)] == [case.id]
    assert (await svc.case(MOD, case.id)).prompt == "a red square"
    assert "until" in await svc.ban_user(MOD, 77, "2h", "spam")
    assert (await svc.user_history(MOD, 77)).bans[0].reason == "spam"
    assert await svc.unban_user(MOD, 77, "appeal") == "<@77> may generate here again."
    await svc.dismiss(case.id, MOD)
    assert await svc.cases(MOD) == [] and [c.status for c in await svc.cases(MOD, open_only=False)] == ["dismissed"]


async def test_moderation_operator_decides_any_case_and_bans_globally(setup, repo):
    svc, front, gen, rows = setup
    operator = Moderator(user_id=1, guild_id=None, operator=True)
    case, _ = await repo.open_case("auto", image_id=rows[2].id)
    assert [c.id for c in await svc.cases(operator)] == [case.id]
    assert (await svc.dismiss(case.id, operator)).case.status == "dismissed"
    with pytest.raises(NotModerator, match="operator"):
        await svc.operator_ban(MOD, 77, "spam")  # a guild's moderator bans in their guild only
    assert "banned everywhere" in await svc.operator_ban(operator, 77, "spam")
    assert (await repo.get_user_state(77)).banned
    await svc.operator_ban(operator, 77, "", lift=True)
    assert not (await repo.get_user_state(77)).banned


async def test_moderation_central_review_channel_moderates_the_cases_sent_there(setup, repo):
    """REVIEW_CHANNEL_ID (3100) collects the cases of servers without their own review channel: its moderators
    (in the operator's server 1999) decide them; anywhere else in that server, another server's case is refused."""
    svc, front, gen, rows = setup
    central = Moderator(user_id=5, guild_id=1999, can_manage_messages=True, channel_id=3100)
    elsewhere = Moderator(user_id=5, guild_id=1999, can_manage_messages=True, channel_id=3300)
    case, _ = await repo.open_case("auto", image_id=rows[2].id)
    with pytest.raises(NotModerator, match="another server"):
        await svc.remove(case.id, elsewhere)
    with pytest.raises(NotModerator):  # Manage Messages is needed there too
        await svc.remove(case.id, Moderator(user_id=6, guild_id=1999, channel_id=3100))
    result = await svc.ban_author(case.id, central, "1d", "spam")
    assert f"in server {GUILD}" in result.message and await svc.ban_message(77, GUILD) is not None
    assert (await svc.remove(case.id, central)).case.status == "removed"
    assert [a.guild_id for a in (await repo.get_case(case.id)).actions] == [GUILD, GUILD]  # the case's server
    await repo.update_guild_settings(GUILD, review_channel_id=3200)  # the server now reviews its own cases
    other, _ = await repo.open_case("auto", image_id=rows[0].id)
    with pytest.raises(NotModerator, match="another server"):
        await svc.dismiss(other.id, central)
