"""End to end against the fake Discord: the result's "Pick an image" menu and the per-image panel it opens (vote,
report with a reason, variations of that image), within Discord's component limits, the grid one message."""

from __future__ import annotations

from bot.moderation import Moderator
from bot.variations import kept_prefix, variation_prefix
from store.models import Feedback, Generation, Image, ModerationCase
from store.repository import NewImage
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import (
    channel_posts,
    dalle_result,
    discord_settings,
    interaction_callback,
    start_bot,
)
from tests.fakes.engine import FakeEngine


def _select(message: dict) -> dict:
    return next(c for row in message["components"] for c in row["components"] if c["type"] == 3)


async def _pick(fake, message: dict, number: int, user_id: int):
    """Pick image ``number`` in the result's menu; returns (the interaction, the private panel message)."""
    select = _select(message)
    value = select["options"][number - 1]["value"]
    rec = await fake.click(message, select["custom_id"], user_id=user_id, component_type=3, values=[value])
    cb = await interaction_callback(fake, rec)
    assert cb.json == {"type": 5, "data": {"flags": 64}}  # private, acknowledged before the database read
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return rec, edit, fake.messages[rec.original_message_id]


def _panel_ids(panel: dict) -> list[str]:
    return [c["custom_id"] for row in panel["components"] for c in row["components"]]


async def test_pick_an_image_then_vote_report_and_vary_that_image_moderation(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    run = await start_bot(discord_settings(tmp_path, DEFAULT_IMAGES="9"), engine, repo)
    try:
        message, post = await dalle_result(fake, {"prompt": "a lighthouse at dusk", "images": 9, "seed": 3}, 11)
        rows = message["components"]
        assert len(rows) <= 5 and all(len(r["components"]) <= 5 for r in rows)  # Discord's component limits
        select = _select(message)
        assert [r["components"] for r in rows].index([select]) == len(rows) - 1  # a select alone in its row
        assert select["placeholder"].startswith("Pick an image (1–9)")
        assert [o["label"] for o in select["options"]] == [f"Image {n}" for n in range(1, 10)]
        gen = next(g for g in await rows_of(repo, Generation) if g.user_id == 11)
        images = {im.id: im for im in await rows_of(repo, Image) if im.generation_id == gen.id}
        by_number = {n: int(o["value"].split(":")[0]) for n, o in enumerate(select["options"], 1)}
        assert sorted(by_number.values()) == sorted(images)  # every image of the grid, once
        image_k = by_number[4]

        rec, edit, panel = await _pick(fake, message, 4, user_id=12)
        assert "Image 4" in edit.json["content"]
        assert list(edit.files.values()) == [open(images[image_k].file_path, "rb").read()]  # full size, that one
        assert _panel_ids(panel) == [f"dalle:vote:up:{image_k}", f"dalle:vote:down:{image_k}",
                                     f"dalle:var:{image_k}:4", f"dalle:report:{image_k}"]

        rec = await fake.click(panel, f"dalle:vote:down:{image_k}", user_id=12)
        await interaction_callback(fake, rec)
        done = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert "Thanks" in done.json["content"] and "What was wrong" in done.json["content"]
        why = fake.messages[rec.original_message_id]  # the 👎's answer asks why, with one button per reason
        assert _panel_ids(why) == [f"dalle:why:{r}:{image_k}" for r in ("bias", "quality", "other")]
        assert (await rows_of(repo, Feedback))[0].reason is None  # the vote counts before any reason
        rec = await fake.click(why, f"dalle:why:bias:{image_k}", user_id=12)
        await interaction_callback(fake, rec)
        done = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert done.json["content"] == "Noted, thanks."

        for user, reason in ((12, "nsfw"), (13, "Bias")):  # two reports of image k: one case for it
            _, _, panel = await _pick(fake, message, 4, user_id=user)
            rec = await fake.click(panel, f"dalle:report:{image_k}", user_id=user)
            cb = await interaction_callback(fake, rec)
            assert cb.json["type"] == 9 and cb.json["data"]["custom_id"] == f"dalle:reportmodal:{image_k}"
            rec = await fake.submit_modal(f"dalle:reportmodal:{image_k}", {"reason": reason, "note": "see image 4"},
                                          user_id=user, message=panel)
            await interaction_callback(fake, rec)
            done = await fake.wait_for(lambda c, token=rec.token: c.method == "PATCH" and token in c.path)
            assert "moderator" in done.json["content"]

        rec = await fake.click(panel, f"dalle:var:{image_k}:4", user_id=13)
        await interaction_callback(fake, rec)
        queued = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert queued.json["content"].startswith("Variation V4 queued")
        await fake.wait_count(channel_posts(fake), 2)

        fb = sorted((f.user_id, f.image_id, f.kind, f.reason) for f in await rows_of(repo, Feedback))
        # one 👎, now with its reason (the reason button re-records the vote, it does not add one)
        assert fb == [(12, image_k, "down", "bias"), (12, image_k, "report", "nsfw"), (13, image_k, "report", "bias")]
        cases = await rows_of(repo, ModerationCase)
        assert [(c.source, c.image_id) for c in cases] == [("report", image_k)]
        var = next(g for g in await rows_of(repo, Generation) if g.user_id == 13)
        assert var.kind == "variation" and var.parent_image_id == image_k and var.parent_generation_id == gen.id
        keep = kept_prefix(images[image_k].tokens)
        assert len(keep) == 4  # the top row of the 4x4 tokens
        assert engine.submitted[-1].image_prefix == keep
        var_images = [im for im in await rows_of(repo, Image) if im.generation_id == var.id]
        assert len(var_images) == 9 and all(tuple(im.tokens[:4].tolist()) == keep for im in var_images)
        assert post.status == 200 and fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_pick_with_a_value_not_in_the_menu_is_answered_moderation(fake, bot_db_url, tmp_path):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        message, _ = await dalle_result(fake, {"prompt": "a red star", "images": 2, "seed": 1}, 41)
        rec = await fake.click(message, _select(message)["custom_id"], user_id=42, component_type=3,
                               values=["nonsense"])
        await interaction_callback(fake, rec)
        edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert edit.json["content"] == "Please pick one of the listed images." and not edit.files
        assert await rows_of(repo, Feedback) == [] and fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_variation_of_a_removed_image_from_an_old_panel_is_refused_moderation(fake, bot_db_url, tmp_path):
    """A panel opened before a moderator removed the image still has its V button: it must not copy the image."""
    repo = make_repo(bot_db_url)
    engine = FakeEngine()
    run = await start_bot(discord_settings(tmp_path, DEFAULT_IMAGES="4"), engine, repo)
    try:
        message, _ = await dalle_result(fake, {"prompt": "a lighthouse at dusk", "images": 4, "seed": 3}, 11)
        image_k = int(_select(message)["options"][1]["value"].split(":")[0])
        _, _, panel = await _pick(fake, message, 2, user_id=12)  # opened while the image was still shown
        case, _ = await repo.open_case("report", image_id=image_k)
        await run.bot.service.moderation.remove(case.id, Moderator(user_id=9, guild_id=2000, operator=True))
        submitted = len(engine.submitted)

        rec = await fake.click(panel, f"dalle:var:{image_k}:2", user_id=12)
        await interaction_callback(fake, rec)
        answer = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
        assert answer.json["content"] == "That image was removed by a moderator."
        assert len(engine.submitted) == submitted
        assert [g.kind for g in await rows_of(repo, Generation)] == ["new"]
        assert fake.errors == []
    finally:
        await run.stop()
        await repo.close()


async def test_variation_queued_before_its_image_was_removed_copies_none_of_it_moderation(repo):
    """The job reads its prefix when it runs: an image hidden since then gives a seed-only variation."""
    parent = await repo.create_generation(user_id=11, prompt="a lighthouse", guild_id=2000)
    [image] = await repo.add_images(parent.id, [NewImage(index=0, tokens=list(range(16)))])
    var = await repo.create_generation(user_id=12, prompt="a lighthouse", guild_id=2000, kind="variation",
                                       parent_generation_id=parent.id, parent_image_id=image.id)
    assert await variation_prefix(repo, var) == tuple(range(4))
    case, _ = await repo.open_case("report", image_id=image.id)
    await repo.add_action(case.id, 9, "remove")
    assert await variation_prefix(repo, var) == ()
