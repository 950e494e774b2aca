"""End to end against the fake Discord: ``/dalle-admin model list|train|status|cancel|promote|rollback``. Members
without Manage Server are refused everything, admins who are not the bot's operator may list but not train or
promote; the operator's promote and rollback go through the real ``python -m training feedback`` CLI (the registry)
and swap the bot's engine; a training job runs as its own process, reports its step, and a cancel stops it."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from bench.fakes.discord import MEMBER_PERMISSIONS
from bot.model_admin import ModelAdmin
from store.db import upgrade
from tests.fakes.botkit import make_repo
from tests.fakes.discordkit import discord_settings, start_bot
from tests.fakes.engine import FakeEngine

MANAGE_GUILD = str(int(MEMBER_PERMISSIONS) | 1 << 5)
OPERATOR = 1  # the fake application's owner
GUILD = 2000  # the fake's guild of slash commands

FAKE_TRAINING = textwrap.dedent("""
    import json, pathlib, signal, sys, time
    args = sys.argv[1:]
    action = args[1]
    with open(pathlib.Path(sys.argv[0]).with_name("argv.jsonl"), "a") as f:
        f.write(json.dumps(args) + "\\n")
    if action == "export":
        print(json.dumps({"counts": {}}))
    elif action == "finetune":
        out = pathlib.Path(args[args.index("--out") + 1])
        log = out.with_name(out.name + "-train")
        log.mkdir(parents=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        for step in range(1, 10000):
            with open(log / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step}) + "\\n")
            if stop:
                print(json.dumps({"cancelled": f"stopped at step {step}"}))
                sys.exit(0)
            time.sleep(0.05)
    else:
        sys.exit(3)
""")


async def admin_command(fake, subcommand: str, *, user_id: int = 80, **kw) -> str:
    rec = await fake.slash("dalle-admin", kw.pop("options", {}), subcommand=subcommand, user_id=user_id, **kw)
    await fake.wait_for(lambda c: c.path.startswith(f"/interactions/{rec.id}/"))
    edit = await fake.wait_for(lambda c: c.method == "PATCH" and rec.token in c.path, timeout=120)
    return edit.json["content"]


async def test_admin_model_commands_refuse_non_admins_and_non_operators(fake, tmp_path):
    settings = discord_settings(tmp_path)
    upgrade(settings.database_url, "head")
    repo = make_repo(settings.database_url)
    run = await start_bot(settings, FakeEngine(), repo)
    try:
        for sub in ("model list", "model status", "model train", "model cancel", "model rollback"):
            text = await admin_command(fake, sub)
            assert text.startswith("Only this server's admins"), (sub, text)
        text = await admin_command(fake, "model promote", options={"checkpoint": "x"})
        assert text.startswith("Only this server's admins")
        for sub in ("model train", "model cancel", "model rollback"):
            text = await admin_command(fake, sub, permissions=MANAGE_GUILD)
            assert text.startswith("Only the bot's operator"), (sub, text)
        assert (await admin_command(fake, "model list", permissions=MANAGE_GUILD)).startswith("No checkpoints")
        assert await repo.list_checkpoints() == []
    finally:
        await run.stop()
        await repo.close()


async def test_operator_promotes_rolls_back_and_the_engine_swaps(fake, tmp_path):
    settings = discord_settings(tmp_path)
    upgrade(settings.database_url, "head")
    repo = make_repo(settings.database_url)
    engine = FakeEngine()
    run = await start_bot(settings, engine, repo)
    parent, cand = tmp_path / "parent", tmp_path / "cand"
    parent.mkdir()
    cand.mkdir()
    try:
        await repo.register_checkpoint("base", str(parent))
        await repo.set_active_checkpoint("base")
        await repo.register_checkpoint("round-1", str(cand), parent_id="base")
        await repo.update_checkpoint_metrics("round-1", {"gate": {"promote": True, "checks": []},
                                                         "measure": {"bias_share": 0.2, "fidelity": 0.44}})
        await repo.register_checkpoint("bad", str(cand), parent_id="base")
        await repo.reject_checkpoint("bad", {"gate": {"promote": False}})

        listed = await admin_command(fake, "model list", permissions=MANAGE_GUILD)
        assert "`base` — active" in listed and "`bad` — rejected" in listed
        assert "`round-1` — candidate · parent `base` · red 20% · fidelity 44%" in listed

        text = await admin_command(fake, "model promote", options={"checkpoint": "bad"}, user_id=OPERATOR,
                                   permissions=MANAGE_GUILD)
        assert "rejected by the gate" in text
        assert (await repo.get_active_checkpoint()).id == "base"

        text = await admin_command(fake, "model promote", options={"checkpoint": "round-1"}, user_id=OPERATOR,
                                   permissions=MANAGE_GUILD)
        assert text.startswith("`round-1` is now active; the engine serves")
        assert (await repo.get_active_checkpoint()).id == "round-1"
        assert (await engine.info()).checkpoint_id == cand.name

        text = await admin_command(fake, "model rollback", user_id=OPERATOR, permissions=MANAGE_GUILD)
        assert text.startswith("Rolled back from `round-1` to `base`")
        assert (await repo.get_active_checkpoint()).id == "base"
        assert (await engine.info()).checkpoint_id == parent.name
        # audited in the command's server, naming the admin (the refused promotion left nothing)
        assert [(a.moderator_id, a.guild_id, a.action, a.reason) for a in await repo.audit_log(None)][::-1] == [
            (OPERATOR, GUILD, "model_promote", "checkpoint round-1 (was base)"),
            (OPERATOR, GUILD, "model_rollback", "checkpoint base (was round-1); rolled back from round-1")]
        assert [a.action for a in await repo.audit_log([GUILD])] == ["model_rollback", "model_promote"]
    finally:
        await run.stop()
        await repo.close()


async def test_model_admin_audit_rows_name_the_admin(tmp_path):
    """Through the real CLI: the promotion and the rollback name the admin who asked, in their server; a
    non-operator's or non-admin's attempt changes nothing and leaves no row."""
    from bot.admin import NotAdmin
    from bot.model_admin import ModelActor, NotOperator

    url = f"sqlite:///{tmp_path / 'models.db'}"
    upgrade(url, "head")
    repo = make_repo(url)
    admin = ModelAdmin(repo, FakeEngine(), database_url=url, runs_dir=tmp_path / "runs")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        await repo.register_checkpoint("a", str(tmp_path / "a"))
        await repo.set_active_checkpoint("a")
        await repo.register_checkpoint("b", str(tmp_path / "b"), parent_id="a")
        await repo.update_checkpoint_metrics("b", {"gate": {"promote": True}})
        for who, refused in ((ModelActor(55, 7000, True, False), NotOperator),
                             (ModelActor(55, 7000, False, True), NotAdmin)):
            with pytest.raises(refused):
                await admin.promote(who, "b")
        assert await repo.audit_log(None) == [] and (await repo.get_active_checkpoint()).id == "a"
        owner = ModelActor(4242, 7000, True, True)
        assert (await admin.promote(owner, "b")).startswith("`b` is now active")
        assert (await admin.rollback(owner)).startswith("Rolled back from `b` to `a`")
        rows = [(a.moderator_id, a.guild_id, a.action) for a in await repo.audit_log(None)][::-1]
        assert rows == [(4242, 7000, "model_promote"), (4242, 7000, "model_rollback")]
        assert "`b` — retired" in await admin.list(owner)
    finally:
        await repo.close()


async def test_model_list_marks_every_forced_promotion(tmp_path):
    """Forced past the gate: a rejected checkpoint, one the gate failed after it stopped being a candidate, and one
    never evaluated; a checkpoint that passed, promoted with a needless force, is not marked."""
    from bot.model_admin import ModelActor
    from store.repository import ModelAudit

    url = f"sqlite:///{tmp_path / 'models.db'}"
    upgrade(url, "head")
    repo = make_repo(url)
    admin = ModelAdmin(repo, FakeEngine(), database_url=url, runs_dir=tmp_path / "runs")
    by = ModelAudit(OPERATOR, GUILD)
    try:
        await repo.register_checkpoint("base", "/base")
        await repo.set_active_checkpoint("base")
        await repo.register_checkpoint("rejected", "/r", parent_id="base")
        await repo.reject_checkpoint("rejected", {"gate": {"promote": False}})
        await repo.register_checkpoint("failed", "/f", parent_id="base", metrics={"gate": {"promote": False}})
        await repo.register_checkpoint("ungated", "/u", parent_id="base")
        await repo.register_checkpoint("passed", "/p", parent_id="base", metrics={"gate": {"promote": True}})
        for cid in ("rejected", "failed", "ungated", "passed"):
            await repo.set_active_checkpoint(cid, force=True, by=by)
        listed = await admin.list(ModelActor(55, GUILD, True, False))
        for cid in ("rejected", "failed", "ungated"):
            assert f"`{cid}` — retired (forced past the gate)" in listed, (cid, listed)
        assert "`passed` — active · parent `base`" in listed.splitlines() and "`base` — retired" in listed.splitlines()
    finally:
        await repo.close()


async def test_operator_trains_in_its_own_process_sees_progress_and_cancels(fake, tmp_path):
    settings = discord_settings(tmp_path)
    upgrade(settings.database_url, "head")
    repo = make_repo(settings.database_url)
    script = tmp_path / "fake_training.py"
    script.write_text(FAKE_TRAINING)
    run = await start_bot(settings, FakeEngine(), repo)
    run.bot.model_admin = ModelAdmin(repo, FakeEngine(), database_url=settings.database_url,
                                     runs_dir=tmp_path / "runs", command=(sys.executable, str(script)))
    try:
        text = await admin_command(fake, "model train", options={"steps": 40}, user_id=OPERATOR,
                                   permissions=MANAGE_GUILD)
        assert text.startswith("Training started in `feedback-") and "40 steps" in text
        again = await admin_command(fake, "model train", user_id=OPERATOR, permissions=MANAGE_GUILD)
        assert again.startswith("A training job is already running")
        job = run.bot.model_admin.job
        for _ in range(200):
            metrics = job.run_dir / "candidate-train" / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count("\n") >= 3:
                break
            await __import__("asyncio").sleep(0.05)
        status = await admin_command(fake, "model status", permissions=MANAGE_GUILD)
        assert "running: finetune (step " in status and "of 40)" in status
        text = await admin_command(fake, "model cancel", user_id=OPERATOR, permissions=MANAGE_GUILD)
        assert "cancelled: finetune" in text and "nothing was registered" in text
        assert job.state == "cancelled" and job.process is None
        assert json.loads((job.run_dir / "candidate-train" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        assert await repo.list_checkpoints() == []
        # every stage was told who asked, so the training run's start is audited as this admin's
        for argv in map(json.loads, (tmp_path / "argv.jsonl").read_text().splitlines()):
            assert argv[argv.index("--actor") + 1] == str(OPERATOR) and argv[argv.index("--guild") + 1] == str(GUILD)
    finally:
        await run.stop()
        await repo.close()
