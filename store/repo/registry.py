"""The model registry: checkpoints (``candidate`` → ``active`` → ``retired``, or ``candidate`` → ``rejected`` by the
gate, and back to ``candidate`` when a re-run of the gate passes it; at most one active, the one the engine should
serve) and the training runs that produce them.

The actions that change the served model (a fine-tune started, a promotion, a rollback, the gate's verdict when it
changes a status) are audited as :class:`~store.models.ModerationAction` rows (``model_*``) in the same transaction
as the change, naming who asked (:class:`ModelAudit`). The gate's verdicts are ``model_reject`` rows (the schema has
no other gate action): a rejection, or a rejection withdrawn by a passing re-run, which its reason says."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from store.models import Checkpoint, CheckpointStatus, ModAction, ModerationAction, Status, TrainingRun
from store.repo.base import NotFound, RepositoryBase, check_choice


@dataclass(frozen=True)
class ModelAudit:
    """Who asked for a model action: an audited moderator id (a Discord admin's user id;
    :data:`~store.models.OPERATOR_MODERATOR` at the terminal or command line; :data:`~store.models.SYSTEM_MODERATOR`
    for the bot itself, e.g. the gate) and the guild the command came from (None: none, the operator's)."""

    moderator_id: int
    guild_id: int | None = None


class CheckpointRejected(ValueError):
    """A rejected checkpoint was to be made active without ``force``."""


class ActiveChanged(ValueError):
    """The active checkpoint was not the one the caller had read (another promotion or rollback came first)."""


def gate_passed(row: Checkpoint) -> bool | None:
    """The gate's verdict on a checkpoint: False when it is ``rejected`` or its latest gate report says not to
    promote it (a rejected candidate force-promoted, then retired, is ``retired`` but still gate-failed), True when the
    report passed it, None when it was never evaluated."""
    if row.status == CheckpointStatus.REJECTED.value:
        return False
    gate = (row.metrics or {}).get("gate")
    return None if gate is None else bool(gate.get("promote"))


def _audit(s: AsyncSession, by: ModelAudit | None, action: ModAction | str, reason: str) -> None:
    if by is not None:
        s.add(ModerationAction(moderator_id=by.moderator_id, guild_id=by.guild_id, action=ModAction(action).value,
                               reason=reason))


class RegistryRepository(RepositoryBase):
    """Checkpoints and training runs."""

    # --- checkpoints ---------------------------------------------------------------------------------------

    async def register_checkpoint(
        self,
        checkpoint_id: str,
        path: str,
        *,
        parent_id: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Add a checkpoint as a ``candidate``."""
        row = Checkpoint(
            id=checkpoint_id,
            path=str(path),
            parent_id=parent_id,
            metrics=dict(metrics or {}),
            status=CheckpointStatus.CANDIDATE.value,
            created_at=self.now(),
        )
        async with self.sessions.begin() as s:
            s.add(row)
        return row

    async def get_checkpoint(self, checkpoint_id: str) -> Checkpoint | None:
        async with self._read() as s:
            return await s.get(Checkpoint, checkpoint_id)

    async def list_checkpoints(self, status: str | None = None) -> list[Checkpoint]:
        stmt = select(Checkpoint).order_by(Checkpoint.created_at, Checkpoint.id)
        if status is not None:
            stmt = stmt.where(Checkpoint.status == status)
        async with self._read() as s:
            return list((await s.execute(stmt)).scalars())

    async def update_checkpoint_metrics(self, checkpoint_id: str, metrics: Mapping[str, Any]) -> Checkpoint:
        """Merge ``metrics`` into the checkpoint's metrics."""
        return await self._merge_metrics(checkpoint_id, metrics)

    async def _merge_metrics(self, checkpoint_id: str, metrics: Mapping[str, Any], *,
                             move: tuple[CheckpointStatus, CheckpointStatus] | None = None,
                             by: ModelAudit | None = None, reason: str = "") -> Checkpoint:
        """Merge ``metrics`` into the checkpoint's (row locked); with ``move`` (from, to), a row in status ``from``
        goes to ``to`` and that change is audited as ``model_reject`` with ``by`` and ``reason``, one transaction."""
        async with self.sessions.begin() as s:
            row = await s.get(Checkpoint, checkpoint_id, with_for_update=True)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id!r} is not registered")
            row.metrics = {**row.metrics, **dict(metrics)}
            if move is not None and row.status == move[0].value:
                row.status = move[1].value
                _audit(s, by, ModAction.MODEL_REJECT, reason)
        return row

    async def set_active_checkpoint(self, checkpoint_id: str, *, force: bool = False, by: ModelAudit | None = None,
                                    action: ModAction = ModAction.MODEL_PROMOTE, note: str | None = None,
                                    expect_active: str | None | EllipsisType = ...) -> Checkpoint:
        """Make one checkpoint ``active``; the previously active one becomes ``retired``. A ``rejected`` one only
        with ``force``; a forced one the gate did not pass (rejected, gate-failed or never evaluated) gets
        ``metrics.forced``. With ``by``, the change is audited as ``action`` (a promotion or a rollback) in the same
        transaction; ``note`` is added to the audit row's reason. ``expect_active`` (an id, or None for "nothing"):
        the checkpoint the caller read as active; if another one is active in this transaction, :class:`ActiveChanged`
        and nothing changes (a concurrent promotion is not silently retired)."""
        async with self.sessions.begin() as s:
            row = await s.get(Checkpoint, checkpoint_id, with_for_update=True)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id!r} is not registered")
            if row.status == CheckpointStatus.REJECTED.value and not force:
                raise CheckpointRejected(f"checkpoint {checkpoint_id!r} was rejected by the gate")
            # lock the active row, so a concurrent change of the served model waits for this one (PostgreSQL)
            await s.execute(select(Checkpoint.id).where(Checkpoint.status == CheckpointStatus.ACTIVE.value)
                            .with_for_update())
            # what is retired is what was active when it was written: the audit's "was" and the check use that
            retired = (await s.execute(
                update(Checkpoint)
                .where(and_(Checkpoint.status == CheckpointStatus.ACTIVE.value, Checkpoint.id != checkpoint_id))
                .values(status=CheckpointStatus.RETIRED.value)
                .returning(Checkpoint.id)
            )).scalars().all()
            before = retired[0] if retired else (checkpoint_id if row.status == CheckpointStatus.ACTIVE.value
                                                 else None)
            if expect_active is not ... and before != expect_active:
                raise ActiveChanged(f"the active checkpoint is {before!r}, not {expect_active!r} (it changed "
                                    "meanwhile); nothing was changed")
            if force and not gate_passed(row):
                row.metrics = {**row.metrics, "forced": True}
            await s.flush()
            row.status = CheckpointStatus.ACTIVE.value
            reason = f"checkpoint {checkpoint_id}" + (f" (was {before})" if before and before != checkpoint_id else "")
            _audit(s, by, action, reason + (f"; {note}" if note else ""))
        return row

    async def reject_checkpoint(self, checkpoint_id: str, metrics: Mapping[str, Any], *,
                                by: ModelAudit | None = None, reason: str | None = None) -> Checkpoint:
        """The gate's rejection: merge ``metrics`` (its report) and make a ``candidate`` ``rejected``, audited as
        ``model_reject`` with ``by`` in the same transaction. A row that is no candidate any more (already rejected,
        active or retired) only gets the metrics."""
        return await self._merge_metrics(checkpoint_id, metrics,
                                         move=(CheckpointStatus.CANDIDATE, CheckpointStatus.REJECTED), by=by,
                                         reason=f"checkpoint {checkpoint_id}" + (f"; {reason}" if reason else ""))

    async def reinstate_checkpoint(self, checkpoint_id: str, metrics: Mapping[str, Any], *,
                                   by: ModelAudit | None = None, reason: str | None = None) -> Checkpoint:
        """The gate's pass: merge ``metrics`` (its report); a ``rejected`` row (an earlier run failed it) becomes a
        ``candidate`` again, audited with ``by`` in the same transaction (``model_reject``, the gate's verdicts'
        action; the reason says the rejection was withdrawn). Any other row only gets the metrics."""
        return await self._merge_metrics(checkpoint_id, metrics,
                                         move=(CheckpointStatus.REJECTED, CheckpointStatus.CANDIDATE), by=by,
                                         reason=f"checkpoint {checkpoint_id}; rejection withdrawn, a candidate again"
                                         + (f": {reason}" if reason else ""))

    async def retire_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        """Take a checkpoint out of service (an active one leaves no active checkpoint behind)."""
        async with self.sessions.begin() as s:
            row = await s.get(Checkpoint, checkpoint_id, with_for_update=True)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id!r} is not registered")
            row.status = CheckpointStatus.RETIRED.value
        return row

    async def get_active_checkpoint(self) -> Checkpoint | None:
        stmt = select(Checkpoint).where(Checkpoint.status == CheckpointStatus.ACTIVE.value)
        async with self._read() as s:
            return (await s.execute(stmt)).scalar_one_or_none()

    # --- training runs -------------------------------------------------------------------------------------

    async def create_training_run(
        self,
        kind: str,
        *,
        config: Mapping[str, Any] | None = None,
        input_checkpoint_id: str | None = None,
        log_path: str | None = None,
        status: str = Status.RUNNING,
        by: ModelAudit | None = None,
    ) -> TrainingRun:
        """Open a training run; with ``by``, audited as ``model_train`` in the same transaction."""
        check_choice("status", status, Status)
        row = TrainingRun(
            kind=kind,
            config=dict(config or {}),
            status=str(status),
            input_checkpoint_id=input_checkpoint_id,
            metrics={},
            started_at=self.now() if status == Status.RUNNING else None,
            log_path=log_path,
        )
        async with self.sessions.begin() as s:
            s.add(row)
            await s.flush()
            _audit(s, by, ModAction.MODEL_TRAIN, f"training run {row.id} ({kind})"
                   + (f" from checkpoint {input_checkpoint_id}" if input_checkpoint_id else ""))
        return row

    async def finish_training_run(
        self,
        run_id: int,
        status: str,
        *,
        metrics: Mapping[str, Any] | None = None,
        output_checkpoint_id: str | None = None,
    ) -> TrainingRun:
        check_choice("status", status, Status)
        async with self.sessions.begin() as s:
            row = await s.get(TrainingRun, run_id, with_for_update=True)
            if row is None:
                raise NotFound(f"training run {run_id} does not exist")
            row.status = str(status)
            row.finished_at = self.now()
            if metrics is not None:
                row.metrics = {**row.metrics, **dict(metrics)}
            if output_checkpoint_id is not None:
                row.output_checkpoint_id = output_checkpoint_id
        return row

    async def get_training_run(self, run_id: int) -> TrainingRun | None:
        async with self._read() as s:
            return await s.get(TrainingRun, run_id)
