"""The model registry: checkpoints (``candidate`` → ``active`` → ``retired``; at most one active, the one the
engine should serve) and the training runs that produce them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import and_, select, update

from store.models import Checkpoint, CheckpointStatus, Status, TrainingRun
from store.repo.base import NotFound, RepositoryBase, check_choice


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
        async with self.sessions.begin() as s:
            row = await s.get(Checkpoint, checkpoint_id, with_for_update=True)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id!r} is not registered")
            row.metrics = {**row.metrics, **dict(metrics)}
        return row

    async def set_active_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        """Make one checkpoint ``active``; the previously active one becomes ``retired``."""
        async with self.sessions.begin() as s:
            row = await s.get(Checkpoint, checkpoint_id, with_for_update=True)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id!r} is not registered")
            await s.execute(
                update(Checkpoint)
                .where(and_(Checkpoint.status == CheckpointStatus.ACTIVE.value, Checkpoint.id != checkpoint_id))
                .values(status=CheckpointStatus.RETIRED.value)
            )
            await s.flush()
            row.status = CheckpointStatus.ACTIVE.value
        return row

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
    ) -> TrainingRun:
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
