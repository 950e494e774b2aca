"""The model registry: checkpoints (one active at most) and training runs."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from store.models import Checkpoint
from store.repository import NotFound


async def test_checkpoint_registry(repo):
    assert await repo.get_active_checkpoint() is None
    await repo.register_checkpoint("demo", "engine/assets/demo", metrics={"loss": 3.0})
    await repo.register_checkpoint("ft-1", "runs/ft-1", parent_id="demo")
    assert (await repo.set_active_checkpoint("demo")).status == "active"
    await repo.set_active_checkpoint("ft-1")
    active = await repo.get_active_checkpoint()
    assert active.id == "ft-1" and active.parent_id == "demo"
    assert {c.id: c.status for c in await repo.list_checkpoints()} == {"demo": "retired", "ft-1": "active"}
    merged = await repo.update_checkpoint_metrics("demo", {"clip": 0.3})
    assert merged.metrics == {"loss": 3.0, "clip": 0.3}
    got = await repo.get_checkpoint("demo")
    assert (got.path, got.status, got.metrics) == ("engine/assets/demo", "retired", {"loss": 3.0, "clip": 0.3})
    assert await repo.get_checkpoint("nope") is None
    assert [c.id for c in await repo.list_checkpoints(status="candidate")] == []
    with pytest.raises(NotFound):
        await repo.set_active_checkpoint("nope")
    with pytest.raises(IntegrityError):  # the database itself allows one active checkpoint
        async with repo.sessions.begin() as s:
            await s.execute(text("UPDATE checkpoints SET status = 'active' WHERE id = 'demo'"))
    async with repo.sessions() as s:
        assert (await s.execute(select(Checkpoint.id).where(Checkpoint.status == "active"))).scalars().all() == [
            "ft-1"
        ]


async def test_retire_checkpoint(repo):
    await repo.register_checkpoint("demo", "engine/assets/demo")
    await repo.set_active_checkpoint("demo")
    assert (await repo.retire_checkpoint("demo")).status == "retired"
    assert await repo.get_active_checkpoint() is None


async def test_training_runs(repo):
    await repo.register_checkpoint("demo", "engine/assets/demo")
    run = await repo.create_training_run("feedback", config={"lr": 1e-5}, input_checkpoint_id="demo",
                                         log_path="runs/1.log")
    assert run.status == "running" and run.started_at is not None
    await repo.register_checkpoint("ft-2", "runs/ft-2", parent_id="demo")
    done = await repo.finish_training_run(run.id, "done", metrics={"loss": 1.5}, output_checkpoint_id="ft-2")
    got = await repo.get_training_run(run.id)
    assert done.finished_at is not None and got.metrics == {"loss": 1.5} and got.output_checkpoint_id == "ft-2"
    assert got.config == {"lr": 1e-5}
