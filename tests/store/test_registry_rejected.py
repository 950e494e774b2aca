"""The model registry's ``rejected`` status and its audited actions (SQLite and PostgreSQL): the migration that
added them turns the old ``retired`` + ``metrics.rejected`` rows into ``rejected`` and back; a rejected checkpoint is
made active only by force; promotions, rollbacks, the gate's rejections and training starts each leave one audit
row in the same transaction as the change, and none when the change is refused."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from store.db import downgrade, make_sync_engine, upgrade
from store.models import SYSTEM_MODERATOR, Checkpoint, ModerationAction
from store.repository import CheckpointRejected, ModelAudit, NotFound
from tests.fakes.botkit import rows_of

BEFORE = "a3c7e9f1b5d8"  # the revision before the rejected status
AT = "2026-12-07 10:00:00"


def _sql(url: str, *statements: str, params: dict | None = None) -> list:
    engine = make_sync_engine(url)
    try:
        with engine.begin() as conn:
            out = []
            for stmt in statements:
                result = conn.execute(text(stmt), params or {})
                out = list(result) if result.returns_rows else out
            return out
    finally:
        engine.dispose()


def _checkpoints(url: str) -> dict[str, tuple[str, dict]]:
    rows = _sql(url, "SELECT id, status, metrics FROM checkpoints")
    return {i: (s, m if isinstance(m, dict) else json.loads(m)) for i, s, m in rows}


def test_migration_round_trip_moves_rejected_rows_and_model_actions(db_url):
    upgrade(db_url, BEFORE)
    _sql(db_url, "INSERT INTO checkpoints (id, path, metrics, status, created_at) VALUES "
                 "('p', '/p', '{}', 'active', :at), "
                 "('r', '/r', '{\"rejected\": true, \"gate\": {\"promote\": false}}', 'retired', :at), "
                 "('o', '/o', '{\"rejected\": false}', 'retired', :at), "
                 "('c', '/c', '{}', 'candidate', :at)",
         "INSERT INTO moderation_actions (moderator_id, action, created_at) VALUES (5, 'approve', :at)",
         params={"at": AT})
    upgrade(db_url, "head")
    got = _checkpoints(db_url)
    assert {k: v[0] for k, v in got.items()} == {"p": "active", "r": "rejected", "o": "retired", "c": "candidate"}
    assert got["r"][1]["gate"] == {"promote": False}  # the gate's report is kept
    # the new values are allowed now; a rejected row made since has no metrics.rejected
    _sql(db_url, "INSERT INTO checkpoints (id, path, metrics, status, created_at) VALUES "
                 "('n', '/n', '{\"gate\": {\"promote\": false}}', 'rejected', :at)",
         "INSERT INTO moderation_actions (moderator_id, action, reason, created_at) VALUES "
         "(0, 'model_reject', 'checkpoint n', :at), (1, 'model_promote', 'checkpoint p', :at)", params={"at": AT})

    downgrade(db_url, BEFORE)
    got = _checkpoints(db_url)
    assert {k: v[0] for k, v in got.items()} == {"p": "active", "r": "retired", "o": "retired", "c": "candidate",
                                                 "n": "retired"}
    assert got["n"][1] == {"gate": {"promote": False}, "rejected": True}  # what the older code reads
    assert got["o"][1] == {"rejected": False}
    assert [a for (a,) in _sql(db_url, "SELECT action FROM moderation_actions")] == ["approve"]
    with pytest.raises(IntegrityError):  # the old constraint is back
        _sql(db_url, "UPDATE checkpoints SET status = 'rejected' WHERE id = 'c'")

    upgrade(db_url, "head")
    assert {k: v[0] for k, v in _checkpoints(db_url).items()} == {
        "p": "active", "r": "rejected", "o": "retired", "c": "candidate", "n": "rejected"}
    with pytest.raises(IntegrityError):  # the rebuilt table kept its one-active index
        _sql(db_url, "UPDATE checkpoints SET status = 'active' WHERE id = 'c'")
    with pytest.raises(IntegrityError):  # and the action constraint still refuses unknown actions
        _sql(db_url, "INSERT INTO moderation_actions (moderator_id, action, created_at) VALUES (1, 'model_x', :at)",
             params={"at": AT})


async def _audit(repo) -> list[tuple[int, int | None, str, str | None]]:
    return [(a.moderator_id, a.guild_id, a.action, a.reason) for a in await rows_of(repo, ModerationAction)]


async def test_rejected_checkpoint_is_made_active_only_by_force_and_every_change_is_audited(repo):
    admin = ModelAudit(4242, 2000)
    await repo.register_checkpoint("p", "/p")
    await repo.set_active_checkpoint("p")  # no ``by``: not audited (a first registration)
    await repo.register_checkpoint("c", "/c", parent_id="p")
    rejected = await repo.reject_checkpoint("c", {"gate": {"promote": False}}, by=ModelAudit(SYSTEM_MODERATOR),
                                            reason="the gate rejected it (bias)")
    assert (rejected.status, rejected.metrics) == ("rejected", {"gate": {"promote": False}})
    assert await _audit(repo) == [(0, None, "model_reject", "checkpoint c; the gate rejected it (bias)")]

    with pytest.raises(CheckpointRejected):
        await repo.set_active_checkpoint("c", by=admin)
    assert (await repo.get_active_checkpoint()).id == "p"
    assert len(await _audit(repo)) == 1  # a refused change leaves no audit row
    with pytest.raises(NotFound):
        await repo.set_active_checkpoint("nope", by=admin)
    assert len(await _audit(repo)) == 1

    forced = await repo.set_active_checkpoint("c", force=True, by=admin, note="forced: the gate rejected it")
    assert (forced.status, forced.metrics["forced"]) == ("active", True)
    assert (await repo.get_checkpoint("p")).status == "retired"
    assert (await _audit(repo))[-1] == (4242, 2000, "model_promote",
                                        "checkpoint c (was p); forced: the gate rejected it")
    # re-evaluating a checkpoint that is no candidate only updates its metrics, with no audit row
    again = await repo.reject_checkpoint("c", {"kl": 3.0}, by=ModelAudit(SYSTEM_MODERATOR))
    assert again.status == "active" and again.metrics["kl"] == 3.0 and len(await _audit(repo)) == 2

    run = await repo.create_training_run("feedback", input_checkpoint_id="c", by=admin)
    assert (await _audit(repo))[-1] == (4242, 2000, "model_train",
                                        f"training run {run.id} (feedback) from checkpoint c")
    await repo.create_training_run("vqgan")  # no ``by``: not audited
    assert len(await _audit(repo)) == 3
    assert {c.id: c.status for c in await rows_of(repo, Checkpoint)} == {"p": "retired", "c": "active"}


async def test_a_passing_rerun_withdraws_the_rejection_in_the_same_transaction(repo):
    gate = ModelAudit(SYSTEM_MODERATOR, 2000)
    await repo.register_checkpoint("p", "/p")
    await repo.set_active_checkpoint("p")
    await repo.register_checkpoint("c", "/c", parent_id="p")
    await repo.reject_checkpoint("c", {"gate": {"promote": False}}, by=gate, reason="the gate rejected it")
    # the audit row cannot be written (no moderator): the status and the metrics stay as they were
    with pytest.raises(IntegrityError):
        await repo.reinstate_checkpoint("c", {"gate": {"promote": True}}, by=ModelAudit(None))
    kept = await repo.get_checkpoint("c")
    assert (kept.status, kept.metrics) == ("rejected", {"gate": {"promote": False}})
    assert len(await _audit(repo)) == 1

    again = await repo.reinstate_checkpoint("c", {"gate": {"promote": True}, "kl": 2.0}, by=gate,
                                            reason="the gate passed it on a re-run")
    assert (again.status, again.metrics) == ("candidate", {"gate": {"promote": True}, "kl": 2.0})
    assert (await _audit(repo))[-1] == (
        0, 2000, "model_reject", "checkpoint c; rejection withdrawn, a candidate again: the gate passed it on a re-run")
    # a candidate again: made active without force, and not marked forced
    active = await repo.set_active_checkpoint("c", by=ModelAudit(4242, 2000))
    assert active.status == "active" and "forced" not in active.metrics
    # a pass on a row that was never rejected only merges the metrics, with no audit row
    assert (await repo.reinstate_checkpoint("c", {"kl": 1.0}, by=gate)).status == "active"
    assert (await repo.reinstate_checkpoint("p", {"kl": 0.0}, by=gate)).status == "retired"
    assert len(await _audit(repo)) == 3
    with pytest.raises(NotFound):
        await repo.reinstate_checkpoint("nope", {}, by=gate)


async def test_activation_refuses_when_the_active_checkpoint_is_not_the_expected_one(repo):
    from store.repo.registry import ActiveChanged

    admin = ModelAudit(4242, 2000)
    for cid in ("a", "b", "c"):
        await repo.register_checkpoint(cid, f"/{cid}")
    with pytest.raises(ActiveChanged, match="'a'"):  # nothing is active yet
        await repo.set_active_checkpoint("b", expect_active="a", by=admin)
    await repo.set_active_checkpoint("a", expect_active=None, by=admin)
    await repo.set_active_checkpoint("b", expect_active="a", by=admin, action="model_rollback")
    assert (await _audit(repo))[-1] == (4242, 2000, "model_rollback", "checkpoint b (was a)")
    for stale in ("a", None):  # someone read "a" (or nothing) as active: "b" came first, nothing changes
        with pytest.raises(ActiveChanged, match="'b'"):
            await repo.set_active_checkpoint("c", expect_active=stale, by=admin)
    assert {c.id: c.status for c in await rows_of(repo, Checkpoint)} == {"a": "retired", "b": "active",
                                                                         "c": "candidate"}
    assert len(await _audit(repo)) == 2


async def test_a_forced_activation_of_what_the_gate_did_not_pass_is_marked_forced(repo):
    admin = ModelAudit(4242, 2000)
    await repo.register_checkpoint("base", "/base")
    await repo.set_active_checkpoint("base")
    await repo.register_checkpoint("ungated", "/u", parent_id="base")
    await repo.register_checkpoint("failed", "/f", parent_id="base", metrics={"gate": {"promote": False}})
    await repo.register_checkpoint("passed", "/p", parent_id="base", metrics={"gate": {"promote": True}})
    for cid in ("ungated", "failed"):
        assert (await repo.set_active_checkpoint(cid, force=True, by=admin)).metrics.get("forced") is True, cid
    # a force that overrode nothing, and a plain activation (a rollback to the ungated base), are not forced
    assert "forced" not in (await repo.set_active_checkpoint("passed", force=True, by=admin)).metrics
    assert "forced" not in (await repo.set_active_checkpoint("base", by=admin)).metrics
    assert {c.id: bool(c.metrics.get("forced")) for c in await rows_of(repo, Checkpoint)} == {
        "base": False, "ungated": True, "failed": True, "passed": False}
