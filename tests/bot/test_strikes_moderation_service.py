"""Strikes, cooldowns, bans and appeals through the services (SQLite and PostgreSQL): refused prompts and removed
images add strikes that expire, the guild's thresholds impose a cooldown the next request is refused with (after a
restart too) and open one refusals case in the review channel, moderators reset strikes, appeals reach the review
channel and their outcome reaches the member, and a cancelled job gives its rate-limit hit back."""

from __future__ import annotations

from datetime import timedelta

import pytest

from bot.admin import Admin
from bot.moderation import Moderator, NotModerator
from bot.outcome import Delivery
from bot.ratelimit import LimitPolicy, RateLimiter
from bot.service import GenerationService
from bot.strikes import StrikeRules
from store.models import Image, ModerationAction, Strike, utcnow
from store.repository import NewImage, Repository
from tests.fakes.botkit import RecordingPublisher, rows_of
from tests.fakes.engine import FakeEngine
from tests.fakes.redis_server import PrivateRedis

GUILD = 2000
MOD = Moderator(user_id=9, guild_id=GUILD, can_manage_messages=True)
MEMBER = Moderator(user_id=10, guild_id=GUILD)
BAD = ("n.u.d.e beach", "f u c k", "n.u.d.e party")


class FrontEnd:
    """Records what the moderation service asks a front end to do."""

    def __init__(self):
        self.posts, self.updates, self.told, self.refreshed = [], [], [], []

    async def post_case(self, channel_id, case):
        self.posts.append((channel_id, case))
        return 900 + len(self.posts)

    async def update_case(self, channel_id, message_id, case):
        self.updates.append((channel_id, message_id, case))

    async def refresh_result(self, outcome):
        self.refreshed.append(outcome)

    async def tell_user(self, user_id, text, contact):
        self.told.append((user_id, text, contact))


@pytest.fixture
async def world(migrated_url, tmp_path):
    """``make()`` → (service, front end): a fresh service (a restart) over the same database, whose clock moves with
    ``offset[0]``; the guild's rules: a cooldown of 10 min from 2 strikes, a ban from 4, strikes count 1 day."""
    offset = [timedelta(0)]
    made = []

    async def make(limiter=None):
        repo = Repository.from_url(migrated_url, clock=lambda: utcnow() + offset[0])
        svc = GenerationService(repo, FakeEngine(), RecordingPublisher(), output_dir=tmp_path / "out",
                                limiter=limiter or RateLimiter(policy=LimitPolicy(user="100 per minute",
                                                                                  guild="", daily_quota=None)))
        front = FrontEnd()
        svc.moderation.front_end = front
        made.append(repo)
        return svc, front

    svc, front = await make()
    await svc.update_guild_settings(GUILD, review_channel_id=3100, strikes_to_cooldown=2, cooldown_minutes=10,
                                    strikes_to_ban=4, ban_days=3, strike_days=1, appeal_days=7)
    yield make, offset
    for repo in made:
        await repo.close()


async def test_strikes_moderation_cooldown_blocks_next_request_and_survives_restart(world):
    make, offset = world
    svc, front = await make()
    first = await svc.submit(user_id=5, guild_id=GUILD, prompt=BAD[0])
    assert not first.ok and "can't draw" in first.message and "cooldown" not in first.message
    second = await svc.submit(user_id=5, guild_id=GUILD, prompt=BAD[1])
    assert second.message.endswith("You're on a cooldown for 10 min after 2 strikes.")
    # the refusal pattern is a case in the review channel, posted once, listing the refused prompts
    [(channel, case)] = front.posts
    assert (channel, case.source, case.author_id, case.image_id) == (3100, "refusals", 5, None)
    assert case.details == [BAD[1], BAD[0]]
    good = await svc.submit(user_id=5, guild_id=GUILD, prompt="a cat in a hat")
    assert not good.ok and good.message.startswith("You're on a cooldown in this server for another 10 min (until ")

    restarted, front2 = await make()  # a new process, no Redis: the cooldown is in the database
    again = await restarted.submit(user_id=5, guild_id=GUILD, prompt="a cat in a hat")
    assert not again.ok and again.message.startswith("You're on a cooldown in this server for another 10 min")
    assert (await restarted.submit(user_id=6, guild_id=GUILD, prompt="a cat in a hat")).ok  # others are not
    assert (await restarted.submit(user_id=5, guild_id=2001, prompt="a cat in a hat")).ok  # nor other servers

    offset[0] = timedelta(minutes=11)  # the cooldown is over; a third strike doubles it
    assert (await restarted.submit(user_id=5, guild_id=GUILD, prompt="a cat in a hat")).ok
    third = await restarted.submit(user_id=5, guild_id=GUILD, prompt=BAD[2])
    assert third.message.endswith("You're on a cooldown for 20 min after 3 strikes.")
    assert front2.posts == [] and front2.updates[-1][2].details[0] == BAD[2]  # the same case, refreshed
    offset[0] = timedelta(minutes=40)
    fourth = await restarted.submit(user_id=5, guild_id=GUILD, prompt=BAD[0])
    assert "You're banned from generating here until" in fourth.message and "after 4 strikes" in fourth.message
    ban = await restarted.moderation.ban_message(5, GUILD)
    assert ban.startswith("You are banned from generating images in this server until") and "4 strikes" in ban


async def test_strikes_moderation_expire_and_stop_counting(world):
    make, offset = world
    svc, _ = await make()
    await svc.submit(user_id=7, guild_id=GUILD, prompt=BAD[0])
    assert await svc.repo.live_strikes(7, GUILD) == 1
    offset[0] = timedelta(days=1, minutes=1)  # strike_days = 1: the first strike no longer counts
    assert await svc.repo.live_strikes(7, GUILD) == 0
    later = await svc.submit(user_id=7, guild_id=GUILD, prompt=BAD[1])
    assert "cooldown" not in later.message  # one live strike: under the threshold


async def test_strikes_moderation_outside_a_guild_cooldown_is_durable(world):
    make, _ = world
    svc, _ = await make()
    for prompt in BAD[:3]:  # the default rules: a cooldown from 3 strikes
        refused = await svc.submit(user_id=8, prompt=prompt)
    assert "You're on a cooldown for 10 min after 3 strikes." in refused.message
    restarted, _ = await make()
    after = await restarted.submit(user_id=8, prompt="a cat")
    assert not after.ok and after.category == "rate:cooldown" and "Try again in 10 min" in after.message


async def test_strikes_moderation_removal_strikes_the_author(world, tmp_path):
    make, _ = world
    svc, front = await make()
    gen = await svc.repo.create_generation(user_id=77, prompt="a red square", guild_id=GUILD, channel_id=3000)
    [img] = await svc.repo.add_images(gen.id, [NewImage(index=0, tokens=[1], flagged=True, hidden=True)])
    case, _ = await svc.repo.open_case("auto", image_id=img.id)
    await svc.moderation.remove(case.id, MOD, "gross")
    [strike] = await rows_of(svc.repo, Strike)
    assert (strike.user_id, strike.guild_id, strike.source, strike.case_id) == (77, GUILD, "removal", case.id)
    assert "gross" in strike.reason


async def test_strikes_moderation_reset_by_moderators_only(world):
    make, _ = world
    svc, _ = await make()
    for prompt in BAD[:2]:
        await svc.submit(user_id=5, guild_id=GUILD, prompt=prompt)
    with pytest.raises(NotModerator):
        await svc.strikes.reset(MEMBER, 5)
    assert await svc.repo.live_strikes(5, GUILD) == 2  # a refused reset changed nothing
    assert await svc.strikes.reset(MOD, 5, "new leaf") == "<@5>: 2 strike(s) cleared and 1 cooldown(s) lifted."
    assert (await svc.submit(user_id=5, guild_id=GUILD, prompt="a cat")).ok
    record = await svc.moderation.user_history(MOD, 5)
    assert record.live_strikes == 0 and record.strikes == 2


async def test_strikes_moderation_appeal_reaches_channel_and_outcome_reaches_member(world):
    make, _ = world
    svc, front = await make()
    await svc.moderation.ban_user(MOD, 5, "7d", "spam")
    assert not (await svc.submit(user_id=5, guild_id=GUILD, prompt="a cat")).ok
    with pytest.raises(ValueError, match="say why"):
        await svc.appeals.appeal(5, GUILD, "  ")
    answer = await svc.appeals.appeal(5, GUILD, "It was my brother", contact=None)
    assert answer.startswith("Your appeal (case #")
    [(channel, case)] = front.posts
    assert (channel, case.source, case.author_id, case.reason) == (3100, "appeal", 5, "It was my brother")
    with pytest.raises(ValueError, match="You appealed recently"):
        await svc.appeals.appeal(5, GUILD, "Please!")
    with pytest.raises(NotModerator):
        await svc.appeals.accept(case.case_id, MEMBER)
    result = await svc.appeals.accept(case.case_id, MOD)
    assert result.action == "accept" and result.case.status == "accepted"
    assert front.told[-1][0] == 5 and "was accepted" in front.told[-1][1]
    assert front.updates[-1][2].status == "accepted"  # the review post shows the decision
    assert (await svc.submit(user_id=5, guild_id=GUILD, prompt="a cat")).ok
    assert "already closed" in (await svc.appeals.reject(case.case_id, MOD)).message

    await svc.appeals.appeal(6, GUILD, "Let me back in")
    rejected = await svc.appeals.reject(front.posts[-1][1].case_id, MOD, "no")
    assert rejected.case.status == "rejected" and "was rejected" in front.told[-1][1] and front.told[-1][0] == 6
    refusals, _ = await svc.repo.open_refusals_case(6, GUILD, "x")
    with pytest.raises(ValueError, match="not an appeal"):
        await svc.appeals.accept(refusals.id, MOD)


async def test_strikes_moderation_cancelled_job_gives_its_rate_limit_hit_back(world):
    make, _ = world
    limiter = RateLimiter(policy=LimitPolicy(user="1 per minute", guild="2 per minute", daily_quota=2))
    svc, _ = await make(limiter)
    first = await svc.submit(user_id=5, guild_id=GUILD, prompt="a cat")
    assert first.ok
    assert (await svc.submit(user_id=5, guild_id=GUILD, prompt="a cat")).category == "rate:user"
    assert await svc.cancel(first.generation_id, 5)
    second = await svc.submit(user_id=5, guild_id=GUILD, prompt="a dog")  # the cancelled one does not count
    assert second.ok
    assert (await svc.submit(user_id=5, guild_id=GUILD, prompt="a cat")).category == "rate:user"
    assert (await svc.submit(user_id=6, guild_id=GUILD, prompt="a cow")).ok  # the guild's window got it back too
    assert (await svc.submit(user_id=7, guild_id=GUILD, prompt="a cow")).category == "rate:guild"
    assert not await svc.cancel(second.generation_id, 6)  # not theirs: nothing given back
    assert (await svc.submit(user_id=7, guild_id=GUILD, prompt="a cow")).category == "rate:guild"


async def test_strikes_moderation_give_back_only_while_the_hit_counts():
    limiter = RateLimiter(policy=LimitPolicy(user="1 per minute", guild="", daily_quota=None))
    assert (await limiter.hit(1, None)).allowed
    await limiter.give_back(1, None, hit_at=utcnow().timestamp() - 120)  # that hit left the window long ago
    assert not (await limiter.hit(1, None)).allowed
    await limiter.give_back(1, None)
    assert (await limiter.hit(1, None)).allowed and not (await limiter.hit(1, None)).allowed


async def test_strikes_moderation_purge_takes_a_members_images_down_here(world):
    make, _ = world
    svc, front = await make()
    made = []
    for guild, private in ((GUILD, False), (GUILD, True), (2001, False)):
        gen = await svc.repo.create_generation(user_id=30, prompt="a fish", guild_id=guild, channel_id=3000,
                                               private=private)
        await svc.repo.add_images(gen.id, [NewImage(index=i, tokens=[1]) for i in range(2)])
        await svc.repo.mark_delivered(gen.id, result_message_id=5000 + gen.id)
        made.append(gen)
    with pytest.raises(NotModerator):
        await svc.strikes.purge(MEMBER, 30)
    assert not any(im.hidden for im in await rows_of(svc.repo, Image))  # refused: nothing changed
    assert await svc.strikes.purge(MOD, 30, "spam") == "<@30>: 4 image(s) taken down from 1 public message(s)."
    [outcome] = front.refreshed  # the public result here, re-rendered without them
    assert outcome.generation.id == made[0].id and all(im.removed and im.withheld for im in outcome.images)
    hidden = {im.generation_id for im in await rows_of(svc.repo, Image) if im.hidden}
    assert hidden == {made[0].id, made[1].id}  # not the other server's
    assert await svc.repo.removed_image_ids(made[2].id) == set()
    [action] = await rows_of(svc.repo, ModerationAction)
    assert (action.action, action.moderator_id, action.guild_id, action.target_user_id, action.reason) == (
        "purge", 9, GUILD, 30, "spam")
    # an image made after the purge is not taken down by it
    later = await svc.repo.create_generation(user_id=30, prompt="a fish", guild_id=GUILD)
    await svc.repo.add_images(later.id, [NewImage(index=0, tokens=[1], flagged=True, hidden=True)])
    assert await svc.repo.removed_image_ids(later.id) == set()


async def test_strikes_moderation_rules_are_admin_settings(world):
    make, _ = world
    svc, _ = await make()
    admin = Admin(user_id=1, guild_id=GUILD, can_manage_guild=True)
    shown = await svc.admin.show(admin)
    assert shown["strikes_to_cooldown"] == (2, True) and shown["cooldown_minutes"] == (10, True)
    assert shown["strikes_to_ban"] == (4, True)
    for bad in ({"strikes_to_cooldown": -1}, {"strike_days": 0}):
        with pytest.raises(ValueError, match="whole number"):
            await svc.admin.set(admin, **bad)
    assert (await svc.admin.show(admin))["strike_days"] == (1, True)  # a refused change changed nothing
    said = await svc.admin.set(admin, strikes_to_cooldown=1, cooldown_minutes=5)
    assert "strikes before a cooldown (0: never) → 1" in said
    refused = await svc.submit(user_id=5, guild_id=GUILD, prompt=BAD[0])
    assert refused.message.endswith("You're on a cooldown for 5 min after 1 strike.")
    assert (await svc.admin.reset(admin, "strikes_to_cooldown")).startswith("strikes before a cooldown")
    assert (await svc.admin.show(admin))["strikes_to_cooldown"] == (3, False)  # the bot's default
    audit = [a.reason for a in await rows_of(svc.repo, ModerationAction) if a.action == "settings"]
    assert audit == ["cooldown_minutes=5, strikes_to_cooldown=1", "strikes_to_cooldown=default"]


async def test_strikes_moderation_cases_about_a_member_refuse_image_actions(world):
    make, _ = world
    svc, _ = await make()
    await svc.appeals.appeal(5, GUILD, "please")
    refusals, _ = await svc.repo.open_refusals_case(6, GUILD, "3 strikes")
    appeal = max((await svc.repo.list_guild_cases(GUILD)), key=lambda c: c.source == "appeal")
    for action in ("approve", "remove", "dismiss"):
        with pytest.raises(ValueError, match="is an appeal: accept or reject it"):
            await getattr(svc.moderation, action)(appeal.id, MOD)
    for action in ("approve", "remove"):
        with pytest.raises(ValueError, match="has no image to"):
            await getattr(svc.moderation, action)(refusals.id, MOD)
    assert await rows_of(svc.repo, ModerationAction) == []  # refused: nothing recorded
    assert (await svc.moderation.dismiss(refusals.id, MOD, "a one-off")).message == f"Case #{refusals.id} dismissed."
    author, record = await svc.moderation.history(refusals.id, MOD)
    assert author == 6 and record.cases[0].status == "dismissed"


async def test_strikes_moderation_appeal_outcome_follows_notify_mode(world):
    make, _ = world
    svc, front = await make()
    form = Delivery(channel_id=3000, application_id=1, interaction_token="tok")
    await svc.appeals.appeal(5, GUILD, "please", contact=form)
    await svc.appeals.reject(front.posts[-1][1].case_id, MOD)
    assert front.told[-1][2] == form  # on their form (the front end falls back to a DM once it expired)
    await svc.update_guild_settings(GUILD, notify_mode="dm")
    await svc.appeals.appeal(6, GUILD, "please", contact=form)
    await svc.appeals.reject(front.posts[-1][1].case_id, MOD)
    assert front.told[-1][0] == 6 and front.told[-1][2] is None  # the server wants DMs


async def test_strikes_moderation_give_back_is_shared_through_redis(tmp_path):
    """Two bot processes' limiters on one Redis: a hit given back by one is a slot the other admits, once."""
    server = PrivateRedis(tmp_path).start()
    try:
        policy = LimitPolicy(user="1 per minute", guild="", daily_quota=None)
        a = RateLimiter(server.url, namespace="giveback", policy=policy)
        b = RateLimiter(server.url, namespace="giveback", policy=policy)
        assert (await a.hit(1, None)).allowed and not (await b.hit(1, None)).allowed
        await a.give_back(1, None)
        assert (await b.hit(1, None)).allowed
        assert not (await a.hit(1, None)).allowed and not (await b.hit(1, None)).allowed
        assert not a.degraded and not b.degraded
    finally:
        server.kill()


async def test_strikes_moderation_cooldown_in_dms_does_not_follow_into_servers(world):
    """A cooldown earned in DMs is the DMs' own: no server's strikes reset could lift it, so it must not apply there."""
    make, _ = world
    svc, _ = await make()
    for prompt in BAD[:3]:  # the default rules: a cooldown from 3 strikes
        refused = await svc.submit(user_id=18, prompt=prompt)
    assert "You're on a cooldown for 10 min after 3 strikes." in refused.message
    assert (await svc.submit(user_id=18, guild_id=GUILD, prompt="a cat in a hat")).ok
    in_dms = await svc.submit(user_id=18, prompt="a cat in a hat")
    assert not in_dms.ok and in_dms.category == "rate:cooldown"


def test_strikes_moderation_cooldown_doubling_stops_at_a_day_without_overflow():
    rules = StrikeRules(strikes_to_cooldown=3, cooldown_minutes=10, strikes_to_ban=0)
    assert [rules.escalation(n, guild=True).length for n in (3, 4, 11)] == [
        timedelta(minutes=10), timedelta(minutes=20), timedelta(days=1)]
    assert rules.escalation(45, guild=True).length == timedelta(days=1)  # 10 min * 2**42 overflowed timedelta
    assert rules.escalation(10_000, guild=False).length == timedelta(days=1)


async def test_strikes_moderation_many_strikes_keep_striking(world):
    """With bans off, strikes far past the threshold still count and keep the member on a day's cooldown."""
    make, _ = world
    svc, _ = await make()
    await svc.update_guild_settings(GUILD, strikes_to_cooldown=1, strikes_to_ban=0)
    for _ in range(45):
        result = await svc.strikes.add(19, GUILD, "manual", reason="test")
    assert (result.live, result.imposed) == (45, "cooldown")
    assert result.until - svc.repo.now() > timedelta(hours=23)
    refused = await svc.submit(user_id=19, guild_id=GUILD, prompt=BAD[0])
    assert not refused.ok and "cooldown" in refused.message
    assert await svc.repo.live_strikes(19, GUILD) == 45  # a refused prompt while cooled down adds no strike
