"""End to end against the fake Discord: ``/dalle-privacy optout|optin|export|delete``, answered to the user alone.
Opting out takes their generations and votes out of the feedback dataset; the export is a JSON file of their rows
only; delete asks first, removes their generations, images and files, and keeps what an open case needs."""

from __future__ import annotations

import gzip
import json
import os
import threading

from bot.privacy import OPTED_IN, OPTED_OUT
from store.models import Feedback, Generation, Image, ModerationAction
from tests.fakes.botkit import make_repo, rows_of
from tests.fakes.discordkit import channel_posts, custom_ids, discord_settings, start_bot
from tests.fakes.engine import FakeEngine
from training.feedback import build_dataset

ME, OTHER = 71, 72


async def privacy_command(fake, subcommand: str, user_id: int = ME, guild_id: int | None = 2000):
    """Run ``/dalle-privacy <subcommand>``; returns (interaction, the edit of its private deferred reply)."""
    rec = await fake.slash("dalle-privacy", {}, subcommand=subcommand, user_id=user_id, guild_id=guild_id)
    cb = await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{rec.id}/"))
    assert cb.json == {"type": 5, "data": {"flags": 64}}  # deferred privately, first
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path)
    return rec, edit


async def generate(fake, prompt: str, seed: int, user_id: int, results: int) -> None:
    """``/dalle`` by ``user_id``; returns once ``results`` results in all have been posted to the channel."""
    await fake.slash("dalle", {"prompt": prompt, "images": 2, "seed": seed}, user_id=user_id)
    await fake.wait_count(channel_posts(fake), results)


async def images_of(repo, user_id: int) -> list[Image]:
    gens = {g.id for g in await rows_of(repo, Generation) if g.user_id == user_id}
    return [i for i in await rows_of(repo, Image) if i.generation_id in gens]


async def test_privacy_optout_export_delete(fake, bot_db_url, tmp_path, monkeypatch):
    repo = make_repo(bot_db_url)
    run = await start_bot(discord_settings(tmp_path), FakeEngine(), repo)
    try:
        [cmd] = [c for c in fake.commands if c["name"] == "dalle-privacy"]
        assert {o["name"] for o in cmd["options"]} == {"optout", "optin", "export", "delete"}
        await generate(fake, "my private lighthouse", 1, ME, 1)
        await generate(fake, "their green circle", 2, OTHER, 2)
        service = run.bot.service
        mine, theirs = await images_of(repo, ME), await images_of(repo, OTHER)
        await service.feedback(mine[0].id, OTHER, "up")
        await service.feedback(theirs[0].id, ME, "up")
        await service.feedback(theirs[1].id, 73, "down")
        dataset = build_dataset(await repo.dataset_source())
        assert {i for e in dataset.unpaired for i in e.image_ids} == {mine[0].id, theirs[0].id, theirs[1].id}

        _, edit = await privacy_command(fake, "optout")
        assert edit.json["content"] == OPTED_OUT
        dataset = build_dataset(await repo.dataset_source())
        assert {i for e in dataset.unpaired for i in e.image_ids} == {theirs[1].id}  # neither my image nor my vote
        _, edit = await privacy_command(fake, "optin", guild_id=None)  # in a DM with the bot too
        assert edit.json["content"] == OPTED_IN
        await privacy_command(fake, "optout")

        _, edit = await privacy_command(fake, "export")
        [(name, data)] = edit.files.items()
        assert name.startswith(f"dalle-data-{ME}-") and name.endswith(".json")
        assert edit.json["content"].startswith("Your data: 1 generation(s), 1 vote(s)/report(s)")
        doc = json.loads(data)
        assert doc["user_id"] == str(ME) and doc["training_opt_out"] is True
        assert [g["prompt"] for g in doc["generations"]] == ["my private lighthouse"]
        assert doc["votes"][0]["image_id"] == theirs[0].id
        assert "their green circle" not in data.decode()

        # larger than the upload limit: gzipped, off the event loop, with the image tokens inside
        fake.attachment_limit = len(data) - 1
        real_compress, threads = gzip.compress, []

        def compress(raw, *args, **kwargs):
            threads.append(threading.current_thread())
            return real_compress(raw, *args, **kwargs)

        monkeypatch.setattr(gzip, "compress", compress)
        _, edit = await privacy_command(fake, "export")
        monkeypatch.setattr(gzip, "compress", real_compress)
        fake.attachment_limit = 10 * 1024 * 1024
        [(name, packed)] = edit.files.items()
        assert name.endswith(".json.gz") and threads and threads[0] is not threading.main_thread()
        [image] = [i for i in json.loads(gzip.decompress(packed))["generations"][0]["images"] if i["id"] == mine[0].id]
        assert image["tokens"] == mine[0].tokens.tolist() and image["file"] == os.path.basename(mine[0].file_path)
        rec = await fake.slash("dalle-privacy", {}, subcommand="export", user_id=ME)  # a third within a minute
        cb = await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{rec.id}/"))
        assert cb.json["data"]["content"].startswith("Slow down: try again in") and cb.json["data"]["flags"] == 64

        # a second generation of mine is reported: its open case keeps it through the deletion
        await generate(fake, "my reported square", 3, ME, 3)
        reported = [i for i in await images_of(repo, ME) if i.id not in {m.id for m in mine}][0]
        await service.feedback(reported.id, OTHER, "report", reason="nsfw")
        files = [i.file_path for i in mine]
        assert all(os.path.exists(f) for f in files)

        rec, edit = await privacy_command(fake, "delete")
        assert edit.json["content"].startswith("This deletes 1 generation(s) with 2 image(s) and their files, "
                                               "1 vote(s)/report(s) and 0 refused prompt(s).")
        assert "1 generation(s) an open moderation case needs" in edit.json["content"]
        preview = fake.messages[rec.original_message_id]
        assert custom_ids(preview) == [f"dalle:privacy:delete:{ME}", f"dalle:privacy:keep:{ME}"]

        click = await fake.click(preview, f"dalle:privacy:delete:{ME}", user_id=OTHER)  # not theirs to confirm
        cb = await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{click.id}/"))
        assert cb.json["data"]["content"] == "Only the user who asked can confirm this." and cb.json["data"]["flags"]
        click = await fake.click(preview, f"dalle:privacy:keep:{ME}", user_id=ME)
        cb = await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{click.id}/"))
        assert cb.json["type"] == 7 and cb.json["data"]["content"] == "Nothing was deleted."
        assert len([g for g in await rows_of(repo, Generation) if g.user_id == ME]) == 2

        rec, edit = await privacy_command(fake, "delete")
        click = await fake.click(fake.messages[rec.original_message_id], f"dalle:privacy:delete:{ME}", user_id=ME)
        cb = await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{click.id}/"))
        assert cb.json == {"type": 6}  # acknowledged at once; the answer replaces the question
        done = await fake.wait_for(lambda c: c.method == "PATCH" and click.token in c.path)
        assert done.json["content"].startswith("Deleted 1 generation(s) with 2 image(s)")
        assert "Kept: 1 generation(s) an open moderation case needs" in done.json["content"]
        assert done.json["components"] == []
        assert [g.prompt for g in await rows_of(repo, Generation) if g.user_id == ME] == ["my reported square"]
        assert not any(os.path.exists(f) for f in files)
        assert not os.path.exists(os.path.dirname(files[0]))  # the generation's folder, now empty, went too
        assert [(f.user_id, f.kind) for f in await rows_of(repo, Feedback)] == [(73, "down"), (OTHER, "report")]
        [audit] = [a for a in await rows_of(repo, ModerationAction) if a.action == "delete"]
        assert audit.target_user_id == ME and "lighthouse" not in audit.reason
        assert len(await images_of(repo, OTHER)) == 2  # theirs untouched
    finally:
        await run.stop()
        await repo.close()
