"""The model checkpoint registry and training runs."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from store.models.base import Base, check_in, utcnow
from store.models.generations import Status


class CheckpointStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    REJECTED = "rejected"  # the promotion gate turned it down (promoted only by force, never rolled back to)
    RETIRED = "retired"


class Checkpoint(Base):
    """Model checkpoint registry; at most one row is ``active`` (the one the engine should serve). A ``candidate``
    becomes ``rejected`` when the gate turns it down, or ``active`` when promoted; an active one is ``retired`` when
    another takes its place."""

    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=CheckpointStatus.CANDIDATE.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        check_in("status", CheckpointStatus, "status"),
        Index(
            "uq_checkpoints_one_active",
            "status",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )


class TrainingRun(Base):
    """One training / fine-tuning run: what went in, what came out, where the log is."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # e.g. vqgan, dallebart, clip, feedback
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED.value)
    input_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    output_checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    log_path: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (check_in("status", Status, "status"),)
