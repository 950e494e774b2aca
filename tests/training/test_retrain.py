"""Retraining from feedback through the model registry: a fine-tune registers a candidate with its training run and
data manifest; a cancelled one (SIGTERM, as /dalle-admin model cancels) leaves no half-registered checkpoint; the
gate's verdict decides promotion, rollback goes back to the parent (SQLite and PostgreSQL); and a hot swap under a
stream of requests through the real bot service loses none, each result naming the checkpoint that made it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store.db import upgrade
from store.models import OPERATOR_MODERATOR, SYSTEM_MODERATOR, Checkpoint, ModerationAction, TrainingRun
from store.repository import ModelAudit, Repository
from tests.fakes.botkit import RecordingPublisher, rows_of
from tests.training.test_preference import _export
from training import retrain
from training.__main__ import install_checkpoint, main


def _run(url: str, fn):
    async def go():
        repo = Repository.from_url(url)
        try:
            return await fn(repo)
        finally:
            await repo.close()

    return asyncio.run(go())


def test_cancelled_training_run_leaves_no_half_registered_checkpoint(demo, sqlite_url, tmp_path):
    upgrade(sqlite_url, "head")
    _export(demo, tmp_path / "data")
    out = tmp_path / "cand"
    cmd = [sys.executable, "-m", "training", "feedback", "finetune", "--database-url", sqlite_url, "--parent",
           str(demo), "--data", str(tmp_path / "data"), "--out", str(out), "--steps", "100000", "--batch-size", "8",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "cand-train" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert "cancelled" in json.loads(stdout)
    assert not out.exists() and not (tmp_path / "cand.partial").exists()
    checkpoints = _run(sqlite_url, lambda repo: rows_of(repo, Checkpoint))
    runs = _run(sqlite_url, lambda repo: rows_of(repo, TrainingRun))
    assert [c.id for c in checkpoints] == [retrain.checkpoint_id_of(demo)]  # the parent only
    assert [(r.status, r.output_checkpoint_id) for r in runs] == [("cancelled", None)]
    assert runs[0].finished_at is not None and runs[0].input_checkpoint_id == checkpoints[0].id


def _report(candidate: str, promote: bool) -> dict:
    metrics = {k: {"mean": v} for k, v in (("fidelity", 0.4), ("bias_share", 0.2), ("tv_to_uniform", 0.1),
                                           ("colour_adherence", 0.9))}
    checks = [{"name": "fidelity", "pass": True, "detail": ""}, {"name": "bias", "pass": promote, "detail": ""}]
    return {"candidate": candidate, "promote": promote, "checks": checks, "policy": {}, "kl": {"kl": 3.0},
            "candidate_metrics": metrics}


def test_finetune_registers_a_candidate_and_the_gate_decides(demo, sqlite_url, tmp_path, capsys):
    upgrade(sqlite_url, "head")
    _export(demo, tmp_path / "data")
    base = ["feedback", "--database-url", sqlite_url]
    assert main([*base, "finetune", "--parent", str(demo), "--data", str(tmp_path / "data"), "--out",
                 str(tmp_path / "c1"), "--steps", "2", "--batch-size", "8", "--no-progress"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["checkpoint"] == "c1" and done["steps"] == 2
    row = _run(sqlite_url, lambda repo: repo.get_checkpoint("c1"))
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert (row.status, row.parent_id) == ("candidate", retrain.checkpoint_id_of(demo))
    assert row.metrics["training_run"] == done["training_run"]
    assert row.metrics["data"]["content_sha256"] == manifest["content_sha256"]
    run = _run(sqlite_url, lambda repo: repo.get_training_run(done["training_run"]))
    assert (run.status, run.output_checkpoint_id, run.kind) == ("done", "c1", "feedback")
    # the operator started it, and the parent it registered became active because nothing was: both audited
    activated, started = _run(sqlite_url, lambda repo: rows_of(repo, ModerationAction))
    parent_id = retrain.checkpoint_id_of(demo)
    assert (activated.moderator_id, activated.action) == (OPERATOR_MODERATOR, "model_promote")
    assert activated.reason == f"checkpoint {parent_id}; registered while nothing was active"
    assert (started.moderator_id, started.action) == (OPERATOR_MODERATOR, "model_train")
    assert started.reason == f"training run {run.id} (feedback) from checkpoint {parent_id}"
    # not evaluated yet: no promotion
    assert main([*base, "promote", "--checkpoint", "c1"]) == 2
    assert "has not been evaluated" in capsys.readouterr().err
    _run(sqlite_url, lambda repo: retrain.record_gate(repo, _report("c1", False)))
    assert main([*base, "promote", "--checkpoint", "c1"]) == 2
    assert "rejected by the gate" in capsys.readouterr().err
    assert main([*base, "list"]) == 0
    listed = {c["id"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert listed["c1"]["status"] == "rejected" and listed["c1"]["gate"] == "rejected"
    assert listed[retrain.checkpoint_id_of(demo)]["status"] == "active"


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_promote_and_rollback_in_the_registry(repo, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "c").mkdir()
    await repo.register_checkpoint("p", str(tmp_path / "p"))
    await repo.set_active_checkpoint("p")
    await repo.register_checkpoint("c", str(tmp_path / "c"), parent_id="p")
    await retrain.record_gate(repo, _report("c", True))
    assert (await retrain.promote(repo, "c")).status == "active"
    assert (await repo.get_checkpoint("p")).status == "retired"
    with pytest.raises(ValueError, match="already active"):
        await retrain.promote(repo, "c")
    parent, old = await retrain.rollback(repo)
    assert (parent.id, old.id) == ("p", "c")
    assert (await repo.get_active_checkpoint()).id == "p"
    with pytest.raises(ValueError, match="no parent"):
        await retrain.rollback(repo)
    # a rejected candidate can still be promoted by hand, and says so
    await repo.register_checkpoint("r", str(tmp_path / "c"), parent_id="p")
    await retrain.record_gate(repo, _report("r", False), guild_id=2000)
    assert (await repo.get_checkpoint("r")).status == "rejected"
    with pytest.raises(ValueError, match="rejected by the gate"):
        await retrain.promote(repo, "r")
    assert (await repo.get_active_checkpoint()).id == "p"
    forced = await retrain.promote(repo, "r", force=True, by=ModelAudit(77, 2000))
    assert forced.status == "active" and forced.metrics["forced"] is True
    # every change was audited: the operator (the default), the gate as the bot itself, the admin who forced it
    assert [(a.moderator_id, a.guild_id, a.action, a.reason) for a in await rows_of(repo, ModerationAction)] == [
        (OPERATOR_MODERATOR, None, "model_promote", "checkpoint c (was p)"),
        (OPERATOR_MODERATOR, None, "model_rollback", "checkpoint p (was c); rolled back from c"),
        (SYSTEM_MODERATOR, 2000, "model_reject", "checkpoint r; the gate rejected it (bias)"),
        (77, 2000, "model_promote", "checkpoint r (was p); forced: the gate rejected it"),
    ]


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_rollback_never_goes_to_a_rejected_checkpoint(repo, tmp_path):
    for name in ("g", "r", "child"):
        (tmp_path / name).mkdir()
    await repo.register_checkpoint("g", str(tmp_path / "g"))
    await repo.set_active_checkpoint("g")
    await repo.register_checkpoint("r", str(tmp_path / "r"), parent_id="g")
    await retrain.record_gate(repo, _report("r", False))
    # a fine-tune made from the rejected candidate (--parent DIR), promoted after passing the gate
    await repo.register_checkpoint("child", str(tmp_path / "child"), parent_id="r")
    await retrain.record_gate(repo, _report("child", True))
    await retrain.promote(repo, "child")
    now, old = await retrain.rollback(repo, by=ModelAudit(77, 2000))
    assert (now.id, old.id) == ("g", "child")
    assert {c.id: c.status for c in await repo.list_checkpoints()} == {"g": "active", "r": "rejected",
                                                                      "child": "retired"}
    last = (await rows_of(repo, ModerationAction))[-1]
    assert (last.moderator_id, last.action, last.reason) == (
        77, "model_rollback", "checkpoint g (was child); rolled back from child, passing over rejected r")
    # nothing but rejected ancestors: refused, nothing changes
    await repo.register_checkpoint("orphan", str(tmp_path / "r"))
    await retrain.record_gate(repo, _report("orphan", False))
    await repo.register_checkpoint("leaf", str(tmp_path / "child"), parent_id="orphan")
    await retrain.record_gate(repo, _report("leaf", True))
    await retrain.promote(repo, "leaf")
    before = len(await rows_of(repo, ModerationAction))
    with pytest.raises(ValueError, match="did not reject"):
        await retrain.rollback(repo)
    assert (await repo.get_active_checkpoint()).id == "leaf"
    assert len(await rows_of(repo, ModerationAction)) == before


def test_cli_audits_promote_and_rollback_by_the_actor_or_the_operator(sqlite_url, tmp_path, capsys):
    upgrade(sqlite_url, "head")
    (tmp_path / "p").mkdir()

    async def setup(repo):
        await repo.register_checkpoint("p", str(tmp_path / "p"))
        await repo.set_active_checkpoint("p")
        await repo.register_checkpoint("bad", str(tmp_path / "p"), parent_id="p")
        await retrain.record_gate(repo, _report("bad", False))

    _run(sqlite_url, setup)
    base = ["feedback", "--database-url", sqlite_url]
    assert main([*base, "promote", "--checkpoint", "bad"]) == 2
    assert "rejected by the gate" in capsys.readouterr().err
    assert main([*base, "promote", "--checkpoint", "bad", "--force", "--actor", "4242", "--guild", "2000"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == "bad"
    assert main([*base, "rollback"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] == "p"
    rows = _run(sqlite_url, lambda repo: rows_of(repo, ModerationAction))
    assert [(a.moderator_id, a.guild_id, a.action) for a in rows] == [
        (SYSTEM_MODERATOR, None, "model_reject"), (4242, 2000, "model_promote"),
        (OPERATOR_MODERATOR, None, "model_rollback")]
    assert "forced" in rows[1].reason
    assert main([*base, "list"]) == 0
    listed = {c["id"]: c["status"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert listed == {"p": "active", "bad": "retired"}


async def test_hot_swap_under_a_stream_of_requests_loses_none(demo, sqlite_url, tmp_path):
    from bot.ratelimit import LimitPolicy, RateLimiter
    from bot.scheduler import Scheduler
    from bot.service import GenerationService
    from engine.client import InProcessEngine
    from engine.pipeline import load_pipeline

    upgrade(sqlite_url, "head")
    cand = tmp_path / "cand"
    install_checkpoint(demo, cand)
    meta = json.loads((cand / "checkpoint.json").read_text())
    (cand / "checkpoint.json").write_text(json.dumps({**meta, "id": "swapped-in"}))
    parent_id = retrain.checkpoint_id_of(demo)
    repo = Repository.from_url(sqlite_url)
    engine = InProcessEngine(load_pipeline(demo), warmup=False)
    pub = RecordingPublisher()
    limiter = RateLimiter(policy=LimitPolicy(user="1000 per minute", guild="1000 per minute", daily_quota=None))
    svc = GenerationService(repo, engine, pub, output_dir=tmp_path / "out", limiter=limiter,
                            scheduler=Scheduler(per_user_cap=50), concurrency=2, progress_interval=0.0)
    await svc.start()
    try:
        await retrain.ensure_registered(repo, demo)
        await repo.register_checkpoint("swapped-in", str(cand), parent_id=parent_id)
        await retrain.record_gate(repo, _report("swapped-in", True))
        ids = []
        for k in range(12):
            adm = await svc.submit(user_id=1 + k % 3, prompt=f"a small circle {k}", n=2)
            assert adm.ok, adm.message
            ids.append(adm.generation_id)
            if k == 5:  # promotion, then the running engine swaps while requests are queued and running
                row = await retrain.promote(repo, "swapped-in")
                assert (await engine.reload(row.path)).checkpoint_id == "swapped-in"
        outcomes = await pub.wait_for(12, timeout=300)
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
        gens = [await repo.get_generation(i) for i in ids]
        assert all(g.status == "done" for g in gens)
        named = [g.checkpoint_id for g in gens]
        assert set(named) <= {parent_id, "swapped-in"} and named[-1] == "swapped-in"
        assert named[0] == parent_id
        late = await svc.submit(user_id=9, prompt="a star", n=1)
        await pub.wait_for(13, timeout=120)
        assert (await repo.get_generation(late.generation_id)).checkpoint_id == "swapped-in"
        assert (await repo.get_active_checkpoint()).id == "swapped-in"
    finally:
        await svc.stop(grace=1)
        await engine.close()
        await repo.close()
    assert os.environ.get("DATABASE_URL") != sqlite_url


def _audit_rows(rows) -> list[tuple[int, int | None, str, str | None]]:
    return [(a.moderator_id, a.guild_id, a.action, a.reason) for a in rows]


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_passing_rerun_of_the_gate_makes_a_rejected_checkpoint_a_candidate_again(repo, tmp_path):
    for name in ("p", "r"):
        (tmp_path / name).mkdir()
    await repo.register_checkpoint("p", str(tmp_path / "p"))
    await repo.set_active_checkpoint("p")
    await repo.register_checkpoint("r", str(tmp_path / "r"), parent_id="p")
    await retrain.record_gate(repo, _report("r", False), guild_id=2000)
    assert retrain.describe(await repo.get_checkpoint("r"))["status"] == "rejected"
    # `feedback evaluate` again, and this time the gate passes it
    await retrain.record_gate(repo, _report("r", True), guild_id=2000)
    listed = retrain.describe(await repo.get_checkpoint("r"))
    assert (listed["status"], listed["gate"]) == ("candidate", "passed") and listed["forced"] is False
    row = await retrain.promote(repo, "r")  # no --force needed, and no "forced" note or mark
    assert row.status == "active" and "forced" not in row.metrics
    await retrain.record_gate(repo, _report("r", True))  # a pass on a non-rejected row: metrics only
    assert _audit_rows(await rows_of(repo, ModerationAction)) == [
        (SYSTEM_MODERATOR, 2000, "model_reject", "checkpoint r; the gate rejected it (bias)"),
        (SYSTEM_MODERATOR, 2000, "model_reject",
         "checkpoint r; rejection withdrawn, a candidate again: the gate passed it on a re-run"),
        (OPERATOR_MODERATOR, None, "model_promote", "checkpoint r (was p)"),
    ]
    # and rollback from a child of it lands on it
    (tmp_path / "child").mkdir()
    await repo.register_checkpoint("child", str(tmp_path / "child"), parent_id="r")
    await retrain.record_gate(repo, _report("child", True))
    await retrain.promote(repo, "child")
    assert (await retrain.rollback(repo))[0].id == "r"


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_ensure_registered_audits_the_activation_it_makes(repo, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.json").write_text(json.dumps({"id": name}))
    assert (await retrain.ensure_registered(repo, tmp_path / "a")).status == "active"  # the operator by default
    assert _audit_rows(await rows_of(repo, ModerationAction)) == [
        (OPERATOR_MODERATOR, None, "model_promote", "checkpoint a; registered while nothing was active")]
    # something is active: registered only, nothing audited; an existing row is returned as it is
    assert (await retrain.ensure_registered(repo, tmp_path / "b")).status == "candidate"
    assert (await retrain.ensure_registered(repo, tmp_path / "a")).status == "active"
    assert len(await rows_of(repo, ModerationAction)) == 1
    await repo.retire_checkpoint("a")
    row = await retrain.ensure_registered(repo, tmp_path / "b", by=ModelAudit(SYSTEM_MODERATOR, 2000))
    assert row.status == "active"
    assert _audit_rows(await rows_of(repo, ModerationAction))[-1] == (
        SYSTEM_MODERATOR, 2000, "model_promote", "checkpoint b; registered while nothing was active")
    # one the gate turned down (forced once, retired since) is not made active just because nothing is
    await repo.update_checkpoint_metrics("b", {"gate": {"promote": False}})
    await repo.retire_checkpoint("b")
    assert (await retrain.ensure_registered(repo, tmp_path / "b")).status == "retired"
    assert await repo.get_active_checkpoint() is None and len(await rows_of(repo, ModerationAction)) == 2


class _PromoteMeanwhile:
    """The repository, but another admin's promotion of ``other`` commits while rollback walks the parents."""

    def __init__(self, repo, other: str) -> None:
        self.repo, self.other, self.done = repo, other, False

    def __getattr__(self, name):
        return getattr(self.repo, name)

    async def get_checkpoint(self, checkpoint_id):
        if not self.done:
            self.done = True
            await retrain.promote(self.repo, self.other, by=ModelAudit(55, 7000))
        return await self.repo.get_checkpoint(checkpoint_id)


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_rollback_refuses_when_a_promotion_came_in_between(repo, tmp_path):
    for name in ("p", "c", "d"):
        (tmp_path / name).mkdir()
    await repo.register_checkpoint("p", str(tmp_path / "p"))
    await repo.set_active_checkpoint("p")
    for cid in ("c", "d"):
        await repo.register_checkpoint(cid, str(tmp_path / cid), parent_id="p")
        await retrain.record_gate(repo, _report(cid, True))
    await retrain.promote(repo, "c")
    with pytest.raises(ValueError, match="rollback from 'c' refused: the active checkpoint is 'd'"):
        await retrain.rollback(_PromoteMeanwhile(repo, "d"), by=ModelAudit(77, 2000))
    # the concurrent promotion stands; the refused rollback left no audit row
    assert {c.id: c.status for c in await repo.list_checkpoints()} == {"p": "retired", "c": "retired", "d": "active"}
    assert [a.action for a in await rows_of(repo, ModerationAction)] == ["model_promote", "model_promote"]
    # run again, it rolls back from what is active now, and the reason names that one twice, consistently
    now, old = await retrain.rollback(repo, by=ModelAudit(77, 2000))
    assert (now.id, old.id) == ("p", "d")
    assert _audit_rows(await rows_of(repo, ModerationAction))[-1] == (
        77, 2000, "model_rollback", "checkpoint p (was d); rolled back from d")


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_rollback_waits_for_an_uncommitted_promotion_then_refuses(repo, tmp_path):
    """Real concurrency: another process's promotion of ``d`` holds its transaction open while rollback reads ``c``
    as active; the rollback's activation waits for it (row lock / SQLite's write lock), then sees ``d`` and
    refuses, instead of retiring ``d`` or failing on the one-active index."""
    from sqlalchemy import update

    for name in ("p", "c", "d"):
        (tmp_path / name).mkdir()
    await repo.register_checkpoint("p", str(tmp_path / "p"))
    await repo.set_active_checkpoint("p")
    for cid in ("c", "d"):
        await repo.register_checkpoint(cid, str(tmp_path / cid), parent_id="p")
        await retrain.record_gate(repo, _report(cid, True))
    await retrain.promote(repo, "c")
    read = asyncio.Event()

    class Signalled(_PromoteMeanwhile):
        async def get_checkpoint(self, checkpoint_id):
            read.set()  # rollback has read the active row and walks the parents
            return await self.repo.get_checkpoint(checkpoint_id)

    async with repo.sessions.begin() as s:
        await s.execute(update(Checkpoint).where(Checkpoint.id == "c").values(status="retired"))
        await s.execute(update(Checkpoint).where(Checkpoint.id == "d").values(status="active"))
        await s.flush()
        task = asyncio.create_task(retrain.rollback(Signalled(repo, "d")))
        await asyncio.wait_for(read.wait(), 30)
        await asyncio.sleep(0.5)
        assert not task.done()  # waiting for this transaction
    with pytest.raises(ValueError, match="rollback from 'c' refused: the active checkpoint is 'd'"):
        await asyncio.wait_for(task, 30)
    assert {c.id: c.status for c in await repo.list_checkpoints()} == {"p": "retired", "c": "retired", "d": "active"}
    assert [a.action for a in await rows_of(repo, ModerationAction)] == ["model_promote"]


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_rollback_passes_over_a_forced_checkpoint_the_gate_failed(repo, tmp_path):
    for name in ("g", "f", "x"):
        (tmp_path / name).mkdir()
    await repo.register_checkpoint("g", str(tmp_path / "g"))
    await repo.set_active_checkpoint("g")
    await repo.register_checkpoint("f", str(tmp_path / "f"), parent_id="g")
    await retrain.record_gate(repo, _report("f", False))
    await retrain.promote(repo, "f", force=True)  # served despite the gate, then replaced by its child
    await repo.register_checkpoint("x", str(tmp_path / "x"), parent_id="f")
    await retrain.record_gate(repo, _report("x", True))
    await retrain.promote(repo, "x")
    assert (await repo.get_checkpoint("f")).status == "retired"
    now, old = await retrain.rollback(repo)
    assert (now.id, old.id) == ("g", "x")
    assert (await rows_of(repo, ModerationAction))[-1].reason == \
        "checkpoint g (was x); rolled back from x, passing over rejected f"
    # a forced promotion of an un-gated checkpoint is marked too, and rollback may land on an un-gated one
    await repo.register_checkpoint("u", str(tmp_path / "x"), parent_id="g")
    forced = await retrain.promote(repo, "u", force=True)
    assert forced.metrics["forced"] is True and retrain.describe(forced)["forced"] is True
    assert (await retrain.rollback(repo))[0].id == "g"
