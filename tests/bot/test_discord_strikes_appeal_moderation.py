"""End to end against the fake Discord: refused prompts add strikes, the guild's threshold puts the member on a
cooldown that the next ``/dalle`` is refused with (after a restart too) and posts one refusal-pattern case to the
review channel; ``/dalle-appeal`` opens a form whose appeal reaches the review channel with Accept / Reject, and
the outcome reaches the member; ``/dalle-mod strikes reset`` and ``/dalle-mod user`` (strikes, reports made)."""

from __future__ import annotations

from bench.fakes.discord import MEMBER_PERMISSIONS
from store.models import ModerationAction, ModerationCase
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import custom_ids, dalle_result, discord_settings, interaction_callback, start_bot
from tests.fakes.engine import FakeEngine

REVIEW = 3100
MANAGE_MESSAGES = str(int(MEMBER_PERMISSIONS) | 1 << 13)
MEMBER = 71


def review_posts(fake):
    return [c for c in fake.calls if c.method == "POST" and c.path == f"/channels/{REVIEW}/messages"]


async def private_answer(fake, rec) -> dict:
    """The bot's private answer to a deferred command, click or form (its edit of the original response)."""
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return edit.json


async def dalle_refusal(fake, prompt: str) -> str:
    rec = await fake.slash("dalle", {"prompt": prompt}, user_id=MEMBER)
    note = await fake.wait_for(lambda c: c.method == "POST" and c.path.endswith(rec.token))
    return note.json["content"]


async def start(tmp_path, repo):
    return await start_bot(discord_settings(tmp_path, REVIEW_CHANNEL_ID=str(REVIEW)), FakeEngine(), repo)


async def test_strikes_moderation_cooldown_case_appeal_and_reset_end_to_end(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start(tmp_path, repo)
    try:
        [mod] = [c for c in fake.commands if c["name"] == "dalle-mod"]
        assert "strikes" in {o["name"] for o in mod["options"]}
        [appeal_cmd] = [c for c in fake.commands if c["name"] == "dalle-appeal"]
        assert appeal_cmd.get("contexts") == [0] or appeal_cmd.get("dm_permission") is False
        await run.bot.service.update_guild_settings(2000, strikes_to_cooldown=2, cooldown_minutes=10, strike_days=7)

        assert "cooldown" not in await dalle_refusal(fake, "n.u.d.e beach")
        assert (await dalle_refusal(fake, "f u c k")).endswith("You're on a cooldown for 10 min after 2 strikes.")
        post = await fake.wait_for(lambda c: c in review_posts(fake))  # the refusal pattern, posted once
        [case] = await rows_of(repo, ModerationCase)
        assert (case.source, case.user_id, case.image_id) == ("refusals", MEMBER, None)
        fields = {f["name"]: f["value"] for f in post.json["embeds"][0]["fields"]}
        assert fields["Member"] == f"<@{MEMBER}>" and "f u c k" in fields["Latest refused prompts"]
        assert custom_ids(post.json) == [f"dalle:case:{a}:{case.id}" for a in ("ban", "dismiss", "history")]
        assert (await dalle_refusal(fake, "a cat")).startswith("You're on a cooldown in this server for another 10 min")
    finally:
        await run.stop()
        await repo.close()

    repo = make_repo(bot_db_url)  # a restart, no Redis: the cooldown holds
    run = await start(tmp_path, repo)
    try:
        assert (await dalle_refusal(fake, "a cat")).startswith("You're on a cooldown in this server for another")

        # the appeal: a form, then a case in the review channel with Accept / Reject
        rec = await fake.slash("dalle-appeal", {}, user_id=MEMBER)
        form = await interaction_callback(fake, rec)
        assert form.json["type"] == 9 and form.json["data"]["custom_id"] == "dalle:appealmodal"
        appeal = await fake.submit_modal("dalle:appealmodal", {"text": "I was testing the filter, sorry"},
                                         user_id=MEMBER)
        answer = (await private_answer(fake, appeal))["content"]
        assert answer.startswith("Your appeal (case #") and "moderators" in answer
        post = await fake.wait_for(lambda c: c in review_posts(fake)
                                   and c.json["embeds"][0]["title"].split(" · ")[1] == "appeal")
        appeal_case = max(await rows_of(repo, ModerationCase), key=lambda c: c.id)
        assert (appeal_case.source, appeal_case.user_id) == ("appeal", MEMBER)
        fields = {f["name"]: f["value"] for f in post.json["embeds"][0]["fields"]}
        assert fields["Their appeal"] == "I was testing the filter, sorry"
        assert custom_ids(post.json) == [f"dalle:case:{a}:{appeal_case.id}" for a in ("accept", "reject", "history")]
        again = await fake.submit_modal("dalle:appealmodal", {"text": "please"}, user_id=MEMBER)
        assert (await private_answer(fake, again))["content"].startswith("You appealed recently")
        message = next(m for m in fake.messages.values() if m["channel_id"] == str(REVIEW)
                       and f"dalle:case:accept:{appeal_case.id}" in custom_ids(m))

        click = await fake.click(message, f"dalle:case:accept:{appeal_case.id}", user_id=72)  # not a moderator
        assert "moderators" in (await private_answer(fake, click))["content"]
        click = await fake.click(message, f"dalle:case:accept:{appeal_case.id}", user_id=60,
                                 permissions=MANAGE_MESSAGES)
        assert (await private_answer(fake, click))["content"].startswith(f"Appeal #{appeal_case.id} accepted")
        told = await fake.wait_for(lambda c: c.method == "POST" and c.path.endswith(appeal.token))
        assert "was accepted" in told.json["content"] and told.json["flags"] & 64  # privately, on their form
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path == f"/channels/{REVIEW}/messages/"
                                   f"{message['id']}")
        assert edit.json["embeds"][0]["title"].endswith("· accepted")
        public, _ = await dalle_result(fake, {"prompt": "a cat", "images": 2, "seed": 2}, MEMBER)  # allowed again

        # /dalle-mod user shows strikes and reports; strikes reset is audited
        assert "cooldown" not in await dalle_refusal(fake, "n.u.d.e party")
        rec = await fake.slash("dalle-mod", {}, subcommand="user", users={"member": MEMBER}, user_id=60,
                               permissions=MANAGE_MESSAGES)
        text = (await private_answer(fake, rec))["content"]
        assert "1 live strike(s) (3 ever)" in text and "0 report(s) made" in text
        rec = await fake.slash("dalle-mod", {}, subcommand="strikes reset", users={"member": MEMBER}, user_id=72)
        assert "moderators" in (await private_answer(fake, rec))["content"]
        rec = await fake.slash("dalle-mod", {"reason": "fresh start"}, subcommand="strikes reset",
                               users={"member": MEMBER}, user_id=60, permissions=MANAGE_MESSAGES)
        assert (await private_answer(fake, rec))["content"] == f"<@{MEMBER}>: 1 strike(s) cleared."

        # /dalle-mod purge: every image the member made here leaves the public messages
        rec = await fake.slash("dalle-mod", {}, subcommand="purge", users={"member": MEMBER}, user_id=72)
        assert "moderators" in (await private_answer(fake, rec))["content"]
        assert not fake.calls_for("PATCH", f"/channels/{public['channel_id']}/messages/{public['id']}")
        rec = await fake.slash("dalle-mod", {}, subcommand="purge", users={"member": MEMBER}, user_id=60,
                               permissions=MANAGE_MESSAGES)
        assert (await private_answer(fake, rec))["content"] == (f"<@{MEMBER}>: 2 image(s) taken down from 1 public "
                                                                "message(s).")
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and c.path == f"/channels/{public['channel_id']}/"
                                   f"messages/{public['id']}")
        assert "2 image(s) removed by a moderator." in edit.json["content"]
        assert fake.messages[int(public["id"])]["attachments"] == []
        audit = [(a.action, a.moderator_id) for a in await rows_of(repo, ModerationAction)]
        assert audit == [("cooldown", 0), ("accept", 60), ("strikes_reset", 60), ("purge", 60)]
        assert fake.errors == []
    finally:
        await run.stop()
        await repo.close()
