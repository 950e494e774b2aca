"""``bot.privacy.PrivacyService`` over a real store (SQLite and PostgreSQL): opt-out and the dataset, the export
(the user's rows only, no secrets) and the deletion (what an open case needs and what is in progress is kept;
files go; audited without the prompt)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np

from bot import privacy as privacy_module
from bot.privacy import PrivacyService
from store.models import Feedback, Generation, Image, ModerationAction, Refusal, Strike
from store.repository import NewImage
from tests.fakes.botkit import rows_of

ME, OTHER, MOD = 71, 72, 900
SECRET_PROMPT = "my secret lighthouse at dusk"


async def done_generation(repo, user_id, prompt, tmp_path, n=2, guild_id=2000):
    gen = await repo.create_generation(user_id=user_id, prompt=prompt, guild_id=guild_id, checkpoint_id="demo",
                                       n_images=n, interaction_token="tok-secret")
    await repo.claim(gen.id)
    images = []
    for i in range(n):
        path = tmp_path / f"{gen.id}-r{i}-i{i}.png"
        path.write_bytes(b"\x89PNG fake")
        images.append(NewImage(index=i, tokens=np.arange(16) + gen.id * 10 + i, rank=i, file_path=str(path)))
    gen, rows = await repo.finish_generation(gen.id, images)
    return gen, rows


async def seed(repo, tmp_path):
    mine, mine_rows = await done_generation(repo, ME, SECRET_PROMPT, tmp_path)
    reviewed, reviewed_rows = await done_generation(repo, ME, "a reported red square", tmp_path, n=1)
    queued = await repo.create_generation(user_id=ME, prompt="still queued", guild_id=2000)
    theirs, their_rows = await done_generation(repo, OTHER, "their green circle", tmp_path)
    await repo.record_feedback(their_rows[0].id, ME, "up")
    await repo.record_feedback(their_rows[1].id, ME, "report", reason="quality", note="blurry")
    await repo.open_case("report", image_id=their_rows[1].id)  # open: my report is part of it
    await repo.record_feedback(mine_rows[0].id, OTHER, "down")
    await repo.record_feedback(reviewed_rows[0].id, OTHER, "report", reason="nsfw")
    await repo.open_case("report", image_id=reviewed_rows[0].id)  # open: my generation is evidence
    await repo.record_refusal(user_id=ME, prompt="a refused prompt", reason="blocklist", guild_id=2000)
    await repo.record_refusal(user_id=OTHER, prompt="their refused prompt", reason="blocklist")
    async with repo.sessions.begin() as s:
        s.add(Strike(user_id=ME, guild_id=2000, source="refusal", reason="blocklist",
                     expires_at=repo.now() + timedelta(days=30)))
    await repo.ban_in_guild(2000, ME, MOD, reason="spam", expires_at=repo.now() + timedelta(days=1))
    return dict(mine=mine, mine_rows=mine_rows, reviewed=reviewed, queued=queued, theirs=theirs,
                their_rows=their_rows)


async def test_optout_excludes_from_the_dataset_and_optin_restores(repo, tmp_path):
    seeded = await seed(repo, tmp_path)
    await repo.record_feedback(seeded["mine_rows"][1].id, OTHER, "up")
    await repo.record_feedback(seeded["their_rows"][0].id, 73, "up")
    privacy = PrivacyService(repo)
    before = await repo.dataset_source()
    assert {i.author_id for i in before.images} == {ME, OTHER}
    assert "optin" in await privacy.opt_out(ME)
    assert (await repo.get_user_state(ME)).opted_out
    after = await repo.dataset_source()
    assert {i.author_id for i in after.images} == {OTHER}  # none of my images
    their_first = next(i for i in after.images if i.image_id == seeded["their_rows"][0].id)
    assert their_first.up == 1  # nor my vote on theirs
    assert after.opted_out_feedback == 2  # my vote and my report on theirs
    await privacy.opt_in(ME)
    assert not (await repo.get_user_state(ME)).opted_out
    assert {i.author_id for i in (await repo.dataset_source()).images} == {ME, OTHER}


async def test_export_holds_my_rows_only(repo, tmp_path):
    seeded = await seed(repo, tmp_path)
    export = await PrivacyService(repo).export(ME)
    assert export.filename.startswith(f"dalle-data-{ME}-") and export.filename.endswith(".json")
    assert export.summary.startswith("Your data: 3 generation(s), 2 vote(s)/report(s), 1 refused prompt(s), "
                                     "1 strike(s), 1 ban(s)")
    doc = json.loads(export.data)
    assert doc["user_id"] == str(ME) and doc["training_opt_out"] is False
    gens = {g["id"]: g for g in doc["generations"]}
    assert set(gens) == {seeded["mine"].id, seeded["reviewed"].id, seeded["queued"].id}
    assert gens[seeded["mine"].id]["prompt"] == SECRET_PROMPT and gens[seeded["mine"].id]["model_id"] == "demo"
    assert [im["id"] for im in gens[seeded["mine"].id]["images"]] == [r.id for r in seeded["mine_rows"]]
    first = gens[seeded["mine"].id]["images"][0]  # the exact image tokens and the file's name, as README promises
    assert first["tokens"] == list(range(seeded["mine"].id * 10, seeded["mine"].id * 10 + 16))
    assert first["file"] == Path(seeded["mine_rows"][0].file_path).name
    assert doc["votes"] == [{"image_id": seeded["their_rows"][0].id, "vote": "up", "at": doc["votes"][0]["at"]}]
    await repo.record_feedback(seeded["their_rows"][0].id, ME, "down", reason="bias")  # changed my mind, said why
    votes = json.loads((await PrivacyService(repo).export(ME)).data)["votes"]
    assert [(v["vote"], v["reason"]) for v in votes] == [("down", "bias")]
    assert [(r["image_id"], r["reason"], r["note"]) for r in doc["reports"]] == [
        (seeded["their_rows"][1].id, "quality", "blurry")]
    assert [r["prompt"] for r in doc["refused_prompts"]] == ["a refused prompt"]
    assert [(s["source"], s["guild_id"]) for s in doc["strikes"]] == [("refusal", "2000")]
    assert [(b["reason"], b["guild_id"], b["kind"]) for b in doc["bans"]] == [("spam", "2000", "ban")]
    assert [c["source"] for c in doc["moderation_cases"]] == ["report"]  # the case on my image
    text = export.data.decode()
    for foreign in ("their green circle", "their refused prompt", "tok-secret", str(MOD)):
        assert foreign not in text


async def test_delete_keeps_what_open_cases_need_and_audits_without_prompt(repo, tmp_path):
    seeded = await seed(repo, tmp_path)
    privacy = PrivacyService(repo)
    preview, anything = await privacy.delete_preview(ME)
    assert anything and preview.startswith("This deletes 1 generation(s) with 2 image(s) and their files, "
                                           "1 vote(s)/report(s) and 1 refused prompt(s).")
    assert "1 generation(s) an open moderation case needs" in preview
    assert "1 report(s) an open moderation case answers" in preview
    assert "1 generation(s) still queued or running" in preview
    assert len(await rows_of(repo, Generation)) == 4  # the preview changed nothing
    files = [r.file_path for r in seeded["mine_rows"]]

    answer = await privacy.delete(ME)
    assert answer.startswith("Deleted 1 generation(s) with 2 image(s)") and "Kept:" in answer
    gens = {g.id for g in await rows_of(repo, Generation)}
    assert gens == {seeded["reviewed"].id, seeded["queued"].id, seeded["theirs"].id}
    assert not any(__import__("os").path.exists(f) for f in files)
    images = {i.generation_id for i in await rows_of(repo, Image)}
    assert seeded["mine"].id not in images
    feedback = [(f.user_id, f.kind) for f in await rows_of(repo, Feedback)]
    assert sorted(feedback) == [(ME, "report"), (OTHER, "report")]  # my report an open case answers stays
    assert [r.user_id for r in await rows_of(repo, Refusal)] == [OTHER]
    assert len(await rows_of(repo, Strike)) == 1  # moderation records stay
    [audit] = [a for a in await rows_of(repo, ModerationAction) if a.action == "delete"]
    assert (audit.moderator_id, audit.target_user_id) == (ME, ME)
    assert "1 generation(s)" in audit.reason and SECRET_PROMPT not in audit.reason
    assert "lighthouse" not in answer

    again = await privacy.delete(ME)  # only the kept rows are left
    assert again.startswith("Nothing of yours was left to delete.") and "open moderation case" in again
    assert len([a for a in await rows_of(repo, ModerationAction) if a.action == "delete"]) == 1
    text, anything = await PrivacyService(repo).delete_preview(12345)
    assert not anything and text == "Nothing of yours is stored that can be deleted."


async def test_export_to_file_for_the_terminal(repo, tmp_path):
    await seed(repo, tmp_path)
    path, summary = await PrivacyService(repo, output_dir=tmp_path / "out").export_to_file(ME)
    assert path.parent == tmp_path / "out" and json.loads(path.read_text())["user_id"] == str(ME)
    assert summary.startswith("Your data:")


async def test_export_is_encoded_off_the_event_loop(repo, tmp_path, monkeypatch):
    """A heavy user's export is megabytes of JSON: it must not be built on the event loop."""
    await seed(repo, tmp_path)
    threads = []
    real = privacy_module.export_document

    def spy(data, now):
        threads.append(threading.current_thread())
        return real(data, now)

    monkeypatch.setattr(privacy_module, "export_document", spy)
    export = await PrivacyService(repo).export(ME)
    assert json.loads(export.data)["user_id"] == str(ME)
    assert threads and threads[0] is not threading.main_thread()
